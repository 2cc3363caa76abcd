"""NATS request plane: one request in, a stream of Annotated messages out to the reply inbox.

nats-py has no multi-reply request call, so the client gives each request its own inbox under one
wildcard subscription per connection (inbox.py) and the worker publishes to it, every stream of a
connection through one coalescing writer (sender.py). The worker acknowledges at once and sends a
keepalive every KEEPALIVE_INTERVAL while it works; a client that hears nothing for `idle_timeout` seconds
reports an error instead of hanging (the worker died, or nobody serves the subject).

Handoff: a handler may end its stream by handing the request to another instance (the KV router does, so
that tokens go from the worker to the caller without passing through it). Its last message (`handoff`)
names the instance and its subject; the request goes there with the caller's reply inbox, and `stream`
reads that instance's messages from then on (numbered from 0, cancelled on its subject, lost when it is).
A caller that leaves before it read the handoff cancels on the first subject: that server passes the
cancel on to where it handed the stream (for EARLY_CANCEL_TTL).
A forwarded request may carry `routed` ({"by": inbox, "id": n}): the serving EndpointServer publishes
the id to that inbox when the request ends, however it ends, and lists the ids in flight
(`routed_in_flight`), so the router that sent it knows its requests' ends without seeing their tokens.
It also publishes "<id> first" once, with the request's first message (its first token: the prefill is
done), so the router knows which prefills are still queued on each worker (`routed_report`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import msgspec
import nats
import nats.errors
import pydantic
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from workers.runtime.aio import wait_for
from workers.runtime.annotated import (
    CONTROL_EVENTS,
    EVENT_ACK,
    EVENT_END,
    EVENT_HANDOFF,
    Annotated,
    ErrorCode,
    StreamError,
)
from workers.runtime.inbox import InboxMux, ReplierLost, Replies, ReplyTimeout
from workers.runtime.sender import SEQ_HEADER, Sender
from workers.runtime.settings import ServiceRefused, ServiceUnavailable, subject_token
from workers.runtime.tls import TlsFiles, client_identity, describe, inbox_prefix

log = logging.getLogger(__name__)

KEEPALIVE_INTERVAL = 1.0
DEFAULT_IDLE_TIMEOUT = 5.0
# A cancel that arrives before its request (still queued in NATS) is remembered this long.
EARLY_CANCEL_TTL = 60.0

Handler = Callable[[dict[str, Any]], AsyncIterator[Any]]
ROUTED = "routed"  # a forwarded request's {"by": inbox, "id": n}: where its end is reported (module docstring)
_FIRST = b" first"


def routed_report(rid: int, first: bool = False) -> bytes:
    """What a worker publishes to a routed request's `by` inbox: "17" at its end, "17 first" at its first message."""
    return str(rid).encode() + (_FIRST if first else b"")


def parse_routed_report(data: bytes) -> tuple[int, bool]:
    """(id, is the first-message report) of `routed_report`'s bytes; ValueError for anything else."""
    first = data.endswith(_FIRST)
    return int(data[:-len(_FIRST)] if first else data), first


@dataclass(frozen=True)
class Handoff:
    """A handler's last item when another instance is to answer the request (the module docstring):
    `request` is published to `subject` (that of instance `instance`) with the caller's reply inbox, and
    `routing` (why it went there) is attached to the stream's final chunk on the caller's side."""

    instance: int
    subject: str
    request: dict[str, Any]
    routing: dict[str, Any] | None = None

    def message(self) -> bytes:
        return Annotated(event=EVENT_HANDOFF, data={"instance": self.instance, "subject": self.subject,
                                                    "routing": self.routing}).encode()


# msgspec decodes a request (a 512-token prompt is 512 ints) several times faster than json.loads.
_decode_request = msgspec.json.Decoder(dict[str, Any]).decode
_encode_request = msgspec.json.Encoder().encode

class StreamTracker:
    """The streams a client has open, by the instance answering them, so that an instance known to be
    gone (its registration deleted: the supervisor revokes a dead process's lease at once) ends its
    streams now with `worker_lost`, instead of after `idle_timeout` of silence."""

    def __init__(self) -> None:
        self._open: dict[int, set[Replies]] = {}

    def add(self, instance: int, replies: Replies) -> None:
        self._open.setdefault(instance, set()).add(replies)

    def discard(self, instance: int, replies: Replies) -> None:
        streams = self._open.get(instance)
        if streams is not None:
            streams.discard(replies)
            if not streams:
                del self._open[instance]

    def lost(self, instance: int, why: str) -> int:
        """End every stream `instance` answers; returns how many there were."""
        streams = self._open.pop(instance, set())
        for replies in streams:
            replies.fail(why)
        return len(streams)


def endpoint_subject(namespace: str, component: str, endpoint: str) -> str:
    return ".".join(subject_token(p) for p in (namespace, component, endpoint))

def instance_subject(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{endpoint_subject(namespace, component, endpoint)}.{instance_id:x}"


def cancel_subject(subject: str) -> str:
    """Where a client cancels a stream it requested on `subject`: every server of that subject
    listens there, and the message is the stream's reply inbox."""
    return f"{subject}.cancel"


async def connect(server: str, name: str, timeout: float = 5.0, tls: TlsFiles | None = None) -> NATS:
    """Connect, failing fast with the address if nothing answers (nats-py would retry forever, since
    reconnects are unlimited); once connected, reconnect forever (NATS restarts are survived).

    A secured deployment (tls, default: LAUNCHER_TLS_* from the environment) connects over TLS with its
    client certificate, and reads replies on its identity's own inbox prefix (the only one its NATS user
    may subscribe to). A refused connection names the server and the reason, never a traceback."""
    files = tls if tls is not None else TlsFiles.from_env()
    await _probe(server, timeout)

    connected = False

    async def on_error(exc: Exception) -> None:
        # nats-py retries a refused first connection forever (reconnects are unlimited): raising from its
        # error callback is the way out, for refusals only; a server that restarts is still waited for.
        if not connected and isinstance(exc, REFUSALS + ((ConnectionResetError,) if files else ())):
            raise exc
        log.warning("NATS at %s: %s: %s", server, type(exc).__name__, exc)

    options: dict[str, Any] = {}
    if files is not None:
        options = {"tls": files.client_context(), "inbox_prefix": inbox_prefix(client_identity()).encode()}
    try:
        nc = await nats.connect(
            servers=[server],
            name=name,
            connect_timeout=timeout,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=on_error,
            **options,
        )
    except (ssl.SSLError, nats.errors.AuthorizationError, nats.errors.SecureConnRequiredError,
            ConnectionResetError) as exc:  # REFUSALS, written out for mypy
        raise ServiceRefused("NATS", server, _refusal(exc), "NATS_SERVER") from None
    connected = True
    return nc


async def flush_subscriptions(nc: NATS) -> None:
    """Return once the server has every subscription this connection made so far.

    `nc.flush()` alone does not promise that: nats-py writes its PING straight to the socket, while the
    SUBs queued before it wait for the connection's flusher task, so the PONG can come back before the
    server has them (measured: 4 of 50 fresh subscriptions answered no_responders to a request sent right
    after one flush, 0 of 50 after two). The first flush wakes the flusher, which writes the queued SUBs
    before that PONG can be read; the second flush's PING follows them on the wire.
    """
    await nc.flush()
    await nc.flush()


# What a NATS server answers a client it will not let in (not: a server that is down).
REFUSALS: tuple[type[Exception], ...] = (ssl.SSLError, nats.errors.AuthorizationError,
                                         nats.errors.SecureConnRequiredError)


def _refusal(exc: BaseException) -> str:
    if isinstance(exc, nats.errors.AuthorizationError):
        return "authorization violation (the server knows no user for this certificate)"
    if isinstance(exc, nats.errors.SecureConnRequiredError):
        return "it requires TLS, and no credentials were given"
    if isinstance(exc, ConnectionResetError):
        return "the server closed the connection during the TLS handshake (does it trust this certificate's CA?)"
    return describe(exc)


async def _probe(server: str, timeout: float) -> None:
    """A NATS server greets every connection with an INFO line."""
    url = urlparse(server if "://" in server else f"nats://{server}")
    try:
        reader, writer = await wait_for(
            asyncio.open_connection(url.hostname or "127.0.0.1", url.port or 4222), timeout)
        try:
            greeting = await wait_for(reader.read(5), timeout)
        finally:
            writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        raise ServiceUnavailable("NATS", server, f"{type(exc).__name__}: {exc}" if str(exc) else
                                 type(exc).__name__, "NATS_SERVER") from None
    if greeting != b"INFO ":
        raise ServiceUnavailable("NATS", server, "something answers there, but not a NATS server", "NATS_SERVER")

class EndpointServer:
    """Serves one endpoint on its shared subject (queue group) and its per-instance subject."""

    def __init__(self, nc: NATS, subject: str, instance_subject: str, handler: Handler) -> None:
        self._nc = nc
        self._subject = subject
        self._instance_subject = instance_subject
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams: dict[str, asyncio.Task[None]] = {}  # reply inbox -> the task streaming to it
        self._cancelled_early: dict[str, float] = {}  # reply inbox -> when its cancel arrived
        self._subs: list[Any] = []
        self._sender = Sender(nc, KEEPALIVE_INTERVAL)
        self.accepting = False  # subscribed to its request subjects (not yet draining)
        self._routed: dict[str, set[int]] = {}  # router's report inbox -> ids of its requests in flight here
        # reply inbox -> (the subject it was handed off to, when): a cancel that reaches us after the handoff (the
        # caller left before reading it) is passed on there, else that instance would generate for nobody.
        self._handed: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def routed_in_flight(self) -> dict[str, list[int]]:
        """Report inbox -> ids of the forwarded requests being served here (a router's check on lost ends)."""
        return {by: sorted(ids) for by, ids in self._routed.items()}

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float, hurry: asyncio.Event | None = None) -> int:
        """Take no new request, let those in flight finish for up to `timeout` s (or until `hurry`),
        then stop: what is left ends with `shutting_down`, which a frontend continues elsewhere.
        Returns how many requests were cut short. Cancel subscriptions stay until the end."""
        for sub in self._subs[:2]:  # the shared and the per-instance request subjects
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=2)  # the server has dropped them: nothing new can arrive now
        self.accepting = False
        if self._tasks:
            waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(asyncio.wait(set(self._tasks)))}
            if hurry is not None:
                waits.add(asyncio.ensure_future(hurry.wait()))
            _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for fut in pending:
                fut.cancel()
        left = len(self._tasks)
        await self.stop()
        return left

    async def start(self) -> None:
        self._subs.append(await self._nc.subscribe(self._subject, queue="workers", cb=self._on_msg))
        self._subs.append(await self._nc.subscribe(self._instance_subject, cb=self._on_msg))
        for subject in (self._subject, self._instance_subject):
            self._subs.append(await self._nc.subscribe(cancel_subject(subject), cb=self._on_cancel))
        # The server has the subscriptions before the caller registers this instance: a request sent the
        # moment the registration is seen must not find nobody listening (no_responders, a wasted retry).
        await flush_subscriptions(self._nc)
        self.accepting = True

    async def _on_cancel(self, msg: Msg) -> None:
        """The client went away: stop its stream (the handler's finally aborts the engine request)."""
        reply = msg.data.decode(errors="replace")
        task = self._streams.get(reply)
        if task is not None:
            log.info("stream to %s cancelled by its client", reply)
            task.cancel()
            return
        handed = self._handed.pop(reply, None)
        if handed is not None:
            log.info("stream to %s cancelled by its client after its handoff: passed on to %s", reply, handed[0])
            with contextlib.suppress(Exception):
                await self._nc.publish(cancel_subject(handed[0]), msg.data)
            return
        now = asyncio.get_running_loop().time()
        # Every instance hears a cancel sent to the shared subject; only one ever sees the request.
        # Remember it briefly in case the request is still on its way here.
        self._cancelled_early = {r: t for r, t in self._cancelled_early.items() if now - t < EARLY_CANCEL_TTL}
        self._cancelled_early[reply] = now

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
        if self._cancelled_early.pop(msg.reply, None) is not None:
            log.info("request to %s was cancelled before it arrived: dropped", msg.reply)
            return
        reply = msg.reply
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        self._streams[reply] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if self._streams.get(reply) is t:
                del self._streams[reply]

        task.add_done_callback(done)

    async def _serve(self, msg: Msg) -> None:
        # This task only feeds the engine's deltas to the outbox; the sender encodes and publishes.
        out = self._sender.open(msg.reply)
        routed: tuple[str, int] | None = None
        try:
            request = _decode_request(msg.data)
            routed = self._routed_by(request.pop(ROUTED, None))
            first = routed
            items = self._handler(request)
            async for item in items:
                if isinstance(item, Handoff):
                    out.hand_off(item.message(), item.subject, _encode_request(item.request))
                    self._handed_off(msg.reply, item.subject)
                    await items.aclose()  # type: ignore[attr-defined]
                    break
                out.put(item)
                if first is not None:
                    by, rid = first
                    first = None
                    with contextlib.suppress(Exception):
                        await self._nc.publish(by, routed_report(rid, first=True))
        except asyncio.CancelledError:
            # Cancelled by its client (nobody listens any more) or by stop(): either way, say so.
            out.put_raw(Annotated.error("worker shutting down: request aborted",
                                        code=ErrorCode.SHUTTING_DOWN).encode())
        except StreamError as exc:
            out.put_raw(Annotated.error(str(exc), code=exc.code).encode())
        except (pydantic.ValidationError, msgspec.DecodeError) as exc:
            out.put_raw(Annotated.error(f"bad request: {exc}", code=ErrorCode.BAD_REQUEST).encode())
        except Exception as exc:
            log.exception("request failed")
            out.put_raw(Annotated.error(f"{type(exc).__name__}: {exc}").encode())
        finally:
            out.end()
            if routed is not None:
                by, rid = routed
                ids = self._routed.get(by)
                if ids is not None:
                    ids.discard(rid)
                    if not ids:
                        del self._routed[by]
                with contextlib.suppress(Exception):
                    await self._nc.publish(by, routed_report(rid))

    def _handed_off(self, reply: str, subject: str) -> None:
        now = asyncio.get_running_loop().time()
        handed = self._handed
        while handed and now - next(iter(handed.values()))[1] >= EARLY_CANCEL_TTL:  # oldest first
            handed.popitem(last=False)
        handed[reply] = (subject, now)

    def _routed_by(self, routed: Any) -> tuple[str, int] | None:
        if not isinstance(routed, dict):
            return None
        by, rid = routed.get("by"), routed.get("id")
        if not isinstance(by, str) or not isinstance(rid, int):
            return None
        self._routed.setdefault(by, set()).add(rid)
        return by, rid

async def stream(
    nc: NATS,
    subject: str,
    request: dict[str, Any],
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    tracker: StreamTracker | None = None,
    instance: int | None = None,
    on_handoff: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[Annotated]:
    """Yield the worker's responses; end with an error Annotated instead of hanging.

    With a `tracker` and the `instance` that answers `subject`, the stream ends with `worker_lost` as
    soon as the tracker is told that instance is gone.

    A handoff (module docstring) is followed: from then on the stream is the new instance's (its
    numbering, its cancel subject, its loss in the tracker), `on_handoff` is told (instance, subject,
    routing), and the handoff's `routing` is attached to the final chunk (the one with finish_reason).

    The stream ends after the worker's end marker, or after an error, whichever is first. A caller
    that stops iterating early (a client that disconnected, a request that was cancelled, a silent
    worker given up on) makes this publish a cancel, so the worker aborts the request instead of
    generating for nobody.
    """
    replies = (await InboxMux.for_connection(nc)).open()
    track = (tracker, instance) if tracker is not None and instance is not None else None
    if track is not None:
        track[0].add(track[1], replies)
    finished = False
    try:
        await nc.publish(subject, _encode_request(request), reply=replies.subject)
        acked = False
        expected = 0  # the next message's number (sender.SEQ_HEADER)
        routing: Any = None
        while True:
            try:
                msg = await replies.next(idle_timeout)
            except ReplierLost as lost:
                yield Annotated.error(f"the instance serving {subject} is gone ({lost})", code=ErrorCode.WORKER_LOST)
                return
            except ReplyTimeout:
                if not acked:
                    yield Annotated.error(f"no worker answered on {subject} within {idle_timeout:.0f} s",
                                          code=ErrorCode.NO_ANSWER)
                else:
                    yield Annotated.error(
                        f"worker on {subject} went silent for {idle_timeout:.0f} s (it died or hung)",
                        code=ErrorCode.SILENT,
                    )
                return
            if not msg.data:
                # nats-server answers a request nobody is subscribed to with an empty 503 status message.
                status = (msg.headers or {}).get("Status", "")
                yield Annotated.error(f"no worker serves {subject} (NATS status {status or 'empty'})",
                                      code=ErrorCode.NO_RESPONDERS)
                return
            seq = (msg.headers or {}).get(SEQ_HEADER)
            if seq is not None and int(seq) != expected:
                yield Annotated.error(f"the stream from {subject} lost message(s) {expected}..{int(seq) - 1} "
                                      "(NATS dropped them: a reconnect?)", code=ErrorCode.MESSAGES_LOST)
                return
            expected += 1
            item = Annotated.decode(msg.data)
            if item.event == EVENT_HANDOFF:
                to = item.data if isinstance(item.data, dict) else {}
                if not isinstance(to.get("subject"), str) or not isinstance(to.get("instance"), int):
                    yield Annotated.error(f"{subject} handed the request off without saying to whom: {item.data!r}",
                                          code=ErrorCode.WORKER_ERROR)
                    finished = True
                    return
                if track is not None:
                    track[0].discard(track[1], replies)
                    track = (track[0], to["instance"])
                    track[0].add(track[1], replies)
                replies.rearm()  # a loss of the instance that handed off is not this stream's any more
                subject, expected, acked, routing = to["subject"], 0, False, to.get("routing")
                if on_handoff is not None:
                    on_handoff(to)
                continue
            if item.event == EVENT_ACK:
                acked = True
            if item.event == EVENT_END:
                finished = True
                return
            if item.event in CONTROL_EVENTS:
                continue
            if item.is_error():
                finished = True  # the worker ended it
            elif routing is not None and isinstance(item.data, dict) and "finish_reason" in item.data:
                item.data["routing"] = routing
            yield item
            if item.is_error():
                return
    finally:
        replies.close()
        if track is not None:
            track[0].discard(track[1], replies)
        if not finished:
            with contextlib.suppress(Exception):
                await nc.publish(cancel_subject(subject), replies.subject.encode())

