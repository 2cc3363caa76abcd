"""One writer per connection for every stream a worker serves: coalesced, first tokens first.

Why: with a stream per request, each stream's task used to encode and publish every engine delta
itself, on the engine's output path. At high concurrency one engine step wakes hundreds of them and a
request's first token waited behind all the other streams' encoding and publishing before nats-py's
flusher wrote anything. Here a stream's task only hands its deltas over (`Outbox.put`, no await,
no encoding); one writer task per connection then

* publishes the streams whose first data message is waiting before any other stream's, and lets
  nats-py's flusher write those to the socket before it goes on with the rest;
* merges what a stream produced since its last send into one message when the engine ran ahead
  of the sending (text concatenated, token_ids extended): fewer, larger messages under load;
* sends keepalives for every open stream from one timer, instead of a task per request.

Order within a stream is kept: data, then an error or the end marker, exactly as put. A stream may instead
end by handing off (`Outbox.hand_off`: a router's): its last message says who answers from now on, and the
request is forwarded to that instance with the same reply inbox, from this connection and after that
message, so the caller reads the handoff before anything the new instance sends. Every message of a
stream carries its number (header `Seq`, from 0): core NATS drops what is published while the receiver's
subscription is not there (a reconnect after a NATS restart), and a receiver that did not count would stream
on with tokens missing and answer 200 (requestplane.stream turns a gap into `messages_lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS

from workers.runtime.aio import wait_for
from workers.runtime.annotated import EVENT_ACK, EVENT_END, EVENT_KEEPALIVE, Annotated

log = logging.getLogger(__name__)

SEQ_HEADER = "Seq"

ACK = Annotated(event=EVENT_ACK).encode()
END = Annotated(event=EVENT_END).encode()
KEEPALIVE = Annotated(event=EVENT_KEEPALIVE).encode()


def merge_into(acc: dict[str, Any], delta: dict[str, Any]) -> bool:
    """Fold `delta` into `acc` (both token chunks: text + token_ids); False when they cannot merge.

    Only plain token deltas merge; a chunk that ends the request (finish_reason) takes the later
    fields as they are, so the final bookkeeping still arrives in the last message.
    """
    if acc.get("finish_reason") is not None:
        return False
    ids, more = acc.get("token_ids"), delta.get("token_ids")
    if not isinstance(ids, list) or not isinstance(more, list):
        return False
    text, more_text = acc.get("text", ""), delta.get("text", "")
    if not isinstance(text, str) or not isinstance(more_text, str):
        return False
    for key, value in delta.items():
        if key == "token_ids":
            ids.extend(more)
        elif key == "text":
            acc["text"] = text + more_text
        elif key == "logprobs" and isinstance(acc.get("logprobs"), list) and isinstance(value, list):
            acc["logprobs"] = [*acc["logprobs"], *value]  # one entry per token, like token_ids
        else:
            acc[key] = value
    return True


@dataclass(frozen=True)
class _Forward:
    """A request published to another instance with this stream's reply inbox (the stream's end)."""

    subject: str
    payload: bytes


class _Owned(dict[str, Any]):
    """A pending data item the outbox copied, so merging into it changes nobody else's dict."""


class Outbox:
    """One stream's pending messages; filled by the stream's task, emptied by the Sender's writer."""

    __slots__ = ("_closed", "_pending", "_queued", "_sender", "_started", "last_sent", "reply", "seq")

    def __init__(self, sender: Sender, reply: str) -> None:
        self.reply = reply
        self._sender = sender
        # Entries in order: a dict is a data item that later deltas may merge into; bytes are final; a
        # _Forward is the request handed off, after the handoff message.
        self._pending: deque[dict[str, Any] | Any | bytes | _Forward] = deque()
        self._queued = False
        self._started = False  # a data message has gone out (later ones are not first tokens)
        self._closed = False
        self.last_sent = time.monotonic()
        self.seq = 0  # the number of the next message sent

    def put(self, item: Any) -> None:
        """A data item from the handler; merged into the last pending one when both are token deltas."""
        if isinstance(item, dict) and self._pending:
            last = self._pending[-1]
            if isinstance(last, dict):
                if not isinstance(last, _Owned):  # merge into a copy: the handler's dict stays as it was
                    last = _Owned(last)
                    if isinstance(last.get("token_ids"), list):
                        last["token_ids"] = list(last["token_ids"])
                    self._pending[-1] = last
                if merge_into(last, item):
                    return
        self._pending.append(item)
        self._sender.ready(self)

    def put_raw(self, payload: bytes) -> None:
        """An already-encoded message (error, control): sent after what is pending, never merged."""
        self._pending.append(payload)
        self._sender.ready(self)

    def end(self) -> None:
        """The end marker goes out after everything pending; then the stream is forgotten."""
        if not self._closed:
            self._closed = True
            self.put_raw(END)

    def hand_off(self, message: bytes, subject: str, payload: bytes) -> None:
        """End the stream with `message` (the handoff, numbered like the rest) instead of the end marker,
        then publish `payload` to `subject` with this stream's reply inbox: the instance there answers the
        caller from now on, numbering its own messages from 0."""
        if not self._closed:
            self._closed = True
            self._pending.append(message)
            self._pending.append(_Forward(subject, payload))
            self._sender.ready(self)

    @property
    def first(self) -> bool:
        return not self._started

    def take(self) -> list[bytes | _Forward]:
        """Everything pending, encoded, in order (called by the writer only)."""
        out: list[bytes | _Forward] = []
        while self._pending:
            entry = self._pending.popleft()
            if isinstance(entry, bytes | _Forward):
                out.append(entry)
            else:
                out.append(Annotated(data=entry).encode())
                self._started = True
        return out


class Sender:
    """The writer task of one NATS connection: see the module docstring."""

    def __init__(self, nc: NATS, keepalive_interval: float = 1.0) -> None:
        self._nc = nc
        self._keepalive_interval = keepalive_interval
        self._first: deque[Outbox] = deque()  # streams whose first data message waits: served first
        self._rest: deque[Outbox] = deque()
        self._open: set[Outbox] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    def open(self, reply: str) -> Outbox:
        """A new stream: its ack is the first thing it sends."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="sender-writer")
            self._ticker = asyncio.create_task(self._keepalive_loop(), name="sender-keepalive")
        box = Outbox(self, reply)
        self._open.add(box)
        box.put_raw(ACK)
        return box

    def ready(self, box: Outbox) -> None:
        if box._queued:
            return
        box._queued = True
        (self._first if box.first else self._rest).append(box)
        self._idle.clear()
        self._wake.set()

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until every pending message was handed to nats-py (e.g. before closing the connection)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        await self.drain()
        for task in (self._writer, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._writer = self._ticker = None

    async def _send(self, box: Outbox) -> None:
        box._queued = False
        payloads = box.take()
        for payload in payloads:
            try:
                if isinstance(payload, _Forward):
                    await self._nc.publish(payload.subject, payload.payload, reply=box.reply)
                    continue
                await self._nc.publish(box.reply, payload, headers={SEQ_HEADER: str(box.seq)})
                box.seq += 1
            except Exception as exc:  # connection closed or draining: this stream cannot be answered
                log.warning("dropping a reply to %s: %s", box.reply, exc)
                break
        box.last_sent = time.monotonic()
        if box._closed and not box._pending:
            self._open.discard(box)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._first or self._rest:
                if self._first:
                    while self._first:
                        await self._send(self._first.popleft())
                    # Let nats-py's flusher put the first tokens on the wire before the other streams.
                    await asyncio.sleep(0)
                    continue
                # One pass over the others; streams that fill up again meanwhile are queued anew.
                for _ in range(len(self._rest)):
                    await self._send(self._rest.popleft())
                    if self._first:
                        break
            self._idle.set()

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive_interval)
            quiet_since = time.monotonic() - self._keepalive_interval
            for box in list(self._open):
                if not box._closed and box.last_sent <= quiet_since and not box._pending:
                    box.put_raw(KEEPALIVE)
