"""One wildcard reply subscription per connection, replies dispatched to each request by its token.

Why: a subscription per request (nats-py's new_inbox + subscribe, then unsubscribe) costs a SUB and
an UNSUB on the server for every request, a Subscription with its own queue, and an
`asyncio.wait_for` per message read. nats-py's own request() avoids this with one `_INBOX.<id>.*`
subscription and a map from token to waiter; this does the same for streamed replies.

The idle timeout is a timer armed only while a reader waits on an empty queue (no task per message).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg


class ReplyTimeout(Exception):
    """Nothing arrived on a reply inbox within the idle timeout."""


class ReplierLost(Exception):
    """The instance answering this inbox is known to be gone (`Replies.fail`): no need to wait it out."""


class Replies:
    """The messages of one request's inbox, in arrival order."""

    __slots__ = ("_lost", "_mux", "_queue", "_token", "_waiter", "subject")

    def __init__(self, mux: InboxMux, token: str) -> None:
        self.subject = mux.prefix + token
        self._token = token
        self._mux = mux
        self._queue: deque[Msg] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: str | None = None

    def fail(self, why: str) -> None:
        """The replier is gone: what already arrived is still read, then `next` raises ReplierLost."""
        self._lost = why
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def rearm(self) -> None:
        """Another instance answers from now on (a handoff): forget that the previous one was lost."""
        self._lost = None

    def _deliver(self, msg: Msg) -> None:
        self._queue.append(msg)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout: float) -> Msg:
        """The next message; ReplyTimeout after `timeout` seconds of silence, ReplierLost once `fail`ed."""
        if not self._queue and self._lost is not None:
            raise ReplierLost(self._lost)
        if not self._queue:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._queue:
                if self._lost is not None:
                    raise ReplierLost(self._lost)
                raise ReplyTimeout
        return self._queue.popleft()

    def close(self) -> None:
        self._mux._open.pop(self._token, None)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class InboxMux:
    """The reply subscription of one connection; `for_connection` makes (once) and returns it."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self.prefix = nc.new_inbox() + "."
        self._open: dict[str, Replies] = {}
        self._next = 0
        self._sub: Any = None

    @classmethod
    async def for_connection(cls, nc: NATS) -> InboxMux:
        mux = _BY_CONN.get(nc)
        if mux is not None:
            return mux
        lock = _LOCKS.setdefault(nc, asyncio.Lock())
        async with lock:
            mux = _BY_CONN.get(nc)
            if mux is None:
                mux = cls(nc)
                mux._sub = await nc.subscribe(mux.prefix + "*", cb=mux._dispatch, pending_msgs_limit=0,
                                              pending_bytes_limit=0)
                _BY_CONN[nc] = mux
        return mux

    def open(self) -> Replies:
        self._next += 1
        token = format(self._next, "x")
        replies = Replies(self, token)
        self._open[token] = replies
        return replies

    async def _dispatch(self, msg: Msg) -> None:
        replies = self._open.get(msg.subject[len(self.prefix):])
        if replies is not None:  # else: a late message for a request that already ended
            replies._deliver(msg)


_BY_CONN: weakref.WeakKeyDictionary[NATS, InboxMux] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[NATS, asyncio.Lock] = weakref.WeakKeyDictionary()
