"""The one message shape of the request plane: `Annotated {data, id, event, comment}`.

Control events (`ack`, `keepalive`, `end`) never reach the caller of a stream: they exist so a
client can tell a slow worker from a dead one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

EVENT_ERROR = "error"
EVENT_ACK = "ack"
EVENT_KEEPALIVE = "keepalive"
EVENT_END = "end"
CONTROL_EVENTS = frozenset({EVENT_ACK, EVENT_KEEPALIVE, EVENT_END})


@dataclass
class Annotated:
    """Field order matches the seed's printout: Annotated(data=' Well', event=None, comment=[], id=None)."""

    data: Any = None
    event: str | None = None
    comment: list[str] = field(default_factory=list)
    id: str | None = None

    def is_error(self) -> bool:
        return self.event == EVENT_ERROR

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Annotated:
        obj = json.loads(raw)
        return cls(
            data=obj.get("data"),
            event=obj.get("event"),
            comment=list(obj.get("comment") or []),
            id=obj.get("id"),
        )

    @classmethod
    def error(cls, text: str, id: str | None = None) -> Annotated:
        return cls(event=EVENT_ERROR, comment=[text], id=id)
