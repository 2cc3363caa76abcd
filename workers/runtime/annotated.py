"""The one message shape of the request plane: `Annotated {data, id, event, comment}`.

Control events (`ack`, `keepalive`, `end`) never reach the caller of a stream: they exist so a
client can tell a slow worker from a dead one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

# msgspec (already a vLLM dependency) encodes several times faster than json + asdict, and this runs
# once per generated token per stream.
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

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
        return _encode({"data": self.data, "event": self.event, "comment": self.comment, "id": self.id})

    @classmethod
    def decode(cls, raw: bytes) -> Annotated:
        obj = _decode(raw)
        return cls(
            data=obj.get("data"),
            event=obj.get("event"),
            comment=list(obj.get("comment") or []),
            id=obj.get("id"),
        )

    @classmethod
    def error(cls, text: str, id: str | None = None) -> Annotated:
        return cls(event=EVENT_ERROR, comment=[text], id=id)
