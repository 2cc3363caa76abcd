"""The one message shape of the request plane: `Annotated {data, id, event, comment}`.

Control events (`ack`, `keepalive`, `end`, `handoff`) never reach the caller of a stream: the first
three exist so a client can tell a slow worker from a dead one; `handoff` is a router's last word on a
stream, saying which instance answers it from then on (requestplane.Handoff).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
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
EVENT_HANDOFF = "handoff"
CONTROL_EVENTS = frozenset({EVENT_ACK, EVENT_KEEPALIVE, EVENT_END, EVENT_HANDOFF})


class ErrorCode(StrEnum):
    """Why a stream failed: the one thing code may decide on (retry or not), never the message text."""

    NO_RESPONDERS = "no_responders"  # NATS 503: nobody subscribed to the subject (a dead worker)
    NO_ANSWER = "no_answer"  # no ack within the idle timeout
    SILENT = "silent"  # acked, then silent past the idle timeout: the worker died or hung
    WORKER_ERROR = "worker_error"  # the handler raised
    SHUTTING_DOWN = "shutting_down"  # the worker is stopping and aborted the request
    BAD_REQUEST = "bad_request"  # the request is invalid: another worker would refuse it too
    CANCELLED = "cancelled"  # the caller cancelled the request
    WORKER_LOST = "worker_lost"  # the instance's registration vanished mid-stream (it died or was revoked)
    ENGINE_DEAD = "engine_dead"  # the worker's vLLM engine core died; the worker exits and is replaced
    MESSAGES_LOST = "messages_lost"  # a gap in the stream's sequence numbers (NATS dropped some: reconnect)


# Codes that mean the instance was lost (Dynamo migrates on the same four: cannot connect, disconnected,
# timeout, engine shutdown), never that the request is at fault: another instance may serve it, from the
# start before any token, or continued (prompt + tokens so far) after some.
RETRYABLE = frozenset({ErrorCode.NO_RESPONDERS, ErrorCode.NO_ANSWER, ErrorCode.SILENT, ErrorCode.SHUTTING_DOWN,
                       ErrorCode.WORKER_LOST, ErrorCode.ENGINE_DEAD, ErrorCode.MESSAGES_LOST})


def instance_lost(code: str | None) -> bool:
    """Whether a stream's error says its instance was lost (so the stream may go on elsewhere)."""
    try:
        return code is not None and ErrorCode(code) in RETRYABLE
    except ValueError:  # a code from a newer peer: not known to be safe
        return False


def retryable(code: str | None, tokens_sent: bool) -> bool:
    """Retry only before anything reached the caller (no duplicated tokens) and only for a lost worker."""
    return not tokens_sent and instance_lost(code)


class StreamError(Exception):
    """Raised by a handler to end its stream with a typed error, e.g. a router passing on a worker's code."""

    def __init__(self, text: str, code: str = ErrorCode.WORKER_ERROR) -> None:
        super().__init__(text)
        self.code = str(code)


@dataclass
class Annotated:
    """Field order matches the client's printout, which existing scripts parse:
    Annotated(data=' Well', event=None, comment=[], id=None)."""

    data: Any = None
    event: str | None = None
    comment: list[str] = field(default_factory=list)
    id: str | None = None
    code: str | None = field(default=None, repr=False)  # an ErrorCode on error events

    def is_error(self) -> bool:
        return self.event == EVENT_ERROR

    def encode(self) -> bytes:
        obj = {"data": self.data, "event": self.event, "comment": self.comment, "id": self.id}
        if self.code is not None:
            obj["code"] = self.code
        return _encode(obj)

    @classmethod
    def decode(cls, raw: bytes) -> Annotated:
        obj = _decode(raw)
        return cls(
            data=obj.get("data"),
            event=obj.get("event"),
            comment=list(obj.get("comment") or []),
            id=obj.get("id"),
            code=obj.get("code"),
        )

    @classmethod
    def error(cls, text: str, code: str = ErrorCode.WORKER_ERROR, id: str | None = None) -> Annotated:
        return cls(event=EVENT_ERROR, comment=[text], id=id, code=str(code))
