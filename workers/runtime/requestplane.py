"""NATS request plane: one request in, a stream of Annotated messages out to the reply inbox.

nats-py has no multi-reply request call, so the client gives each request its own inbox under one
wildcard subscription per connection (inbox.py) and the worker publishes to it, every stream of a
connection through one coalescing writer (sender.py). The worker acknowledges at once and sends a
keepalive every KEEPALIVE_INTERVAL while it works; a client that hears nothing for `idle_timeout` seconds
reports an error instead of hanging (the worker died, or nobody serves the subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from workers.runtime.annotated import (
    CONTROL_EVENTS,
    EVENT_ACK,
    EVENT_END,
    Annotated,
)
from workers.runtime.inbox import InboxMux, ReplyTimeout
from workers.runtime.sender import Sender
from workers.runtime.settings import subject_token

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 1.0
DEFAULT_IDLE_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]

# msgspec decodes a request (a 512-token prompt is 512 ints) several times faster than json.loads.
_decode_request = msgspec.json.Decoder(dict[str, Any]).decode
_encode_request = msgspec.json.Encoder().encode

def endpoint_subject(namespace: str, component: str, endpoint: str) -> str:
    return ".".join(subject_token(p) for p in (namespace, component, endpoint))

def instance_subject(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{endpoint_subject(namespace, component, endpoint)}.{instance_id:x}"

async def connect(server: str, name: str) -> NATS:
    """Connect once, failing fast: a worker with no NATS is useless, and the log must say why."""
    return await nats.connect(
        servers=[server],
        name=name,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
    )

class EndpointServer:
    """Serves one endpoint on its shared subject (queue group) and its per-instance subject."""

    def __init__(self, nc: NATS, subject: str, instance_subject: str, handler: Handler) -> None:
        self._nc = nc
        self._subject = subject
        self._instance_subject = instance_subject
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Any] = []
        self._sender = Sender(nc, KEEPALIVE_INTERVAL)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        self._subs.append(await self._nc.subscribe(self._subject, queue="workers", cb=self._on_msg))
        self._subs.append(await self._nc.subscribe(self._instance_subject, cb=self._on_msg))

    async def stop(self) -> None:
        """Stop taking requests, then tell every open stream it ended with an error."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._sender.close()  # the streams' last words (errors, end markers) go out first

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("request on %s without a reply subject: dropped", msg.subject)
            return
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        # This task only feeds the engine's deltas to the outbox; the sender encodes and publishes.
        out = self._sender.open(msg.reply)
        try:
            request = _decode_request(msg.data)
            async for item in self._handler(request):
                out.put(item)
        except asyncio.CancelledError:
            out.put_raw(Annotated.error("worker shutting down: request aborted").encode())
        except Exception as exc:
            log.exception("request failed")
            out.put_raw(Annotated.error(f"{type(exc).__name__}: {exc}").encode())
        finally:
            out.end()

async def stream(
    nc: NATS,
    subject: str,
    request: dict[str, Any],
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> AsyncIterator[Annotated]:
    """Yield the worker's responses; end with an error Annotated instead of hanging.

    The stream ends after the worker's end marker, or after an error, whichever is first.
    """
    replies = (await InboxMux.for_connection(nc)).open()
    try:
        await nc.publish(subject, _encode_request(request), reply=replies.subject)
        acked = False
        while True:
            try:
                msg = await replies.next(idle_timeout)
            except ReplyTimeout:
                if not acked:
                    yield Annotated.error(f"no worker answered on {subject} within {idle_timeout:.0f} s")
                else:
                    yield Annotated.error(
                        f"worker on {subject} went silent for {idle_timeout:.0f} s (it died or hung)"
                    )
                return
            if not msg.data:
                # nats-server answers a request nobody is subscribed to with an empty 503 status message.
                status = (msg.headers or {}).get("Status", "")
                yield Annotated.error(f"no worker serves {subject} (NATS status {status or 'empty'})")
                return
            item = Annotated.decode(msg.data)
            if item.event == EVENT_ACK:
                acked = True
            if item.event == EVENT_END:
                return
            if item.event in CONTROL_EVENTS:
                continue
            yield item
            if item.is_error():
                return
    finally:
        replies.close()

