"""Waiting with a deadline without losing the task's cancellation.

Why: before Python 3.12, `asyncio.wait_for` returns the awaited result and drops a cancel that arrives
in the instant that result comes in (cpython gh-86296, fixed in 3.12 by building it on
`asyncio.timeout`). A loop task cancelled at shutdown in that instant runs on for ever, and whoever
awaits it hangs: CI saw a follower of etcd that `task.cancel()` could not stop, because aetcd waits for
each watch's creation with `asyncio.wait_for`.

`wait_for` here is `asyncio.timeout` around the await from 3.11.3 on (no inner task, so nothing to drop;
before 3.11.3 a timeout that expires while the task handles another cancel came out as CancelledError,
cpython gh-102780), and `asyncio.wait_for` before. For the waits inside libraries we call: note
`cancel_requests()` before one and call `raise_if_cancelled_since(that)` after it, and a task that was
asked to cancel meanwhile (Task.cancelling, 3.11+) stops there.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 11, 3):
    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        """`asyncio.wait_for`, raising TimeoutError after `timeout` seconds, keeping a cancel that comes
        as `aw` finishes."""
        async with asyncio.timeout(timeout):
            return await aw
else:  # pragma: no cover - no (fixed) asyncio.timeout: this wait_for may drop a cancel (module docstring)
    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        return await asyncio.wait_for(aw, timeout)


def cancel_requests() -> int:
    """How many times this task was asked to cancel and has not taken it back (0 where Python cannot tell,
    3.10)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0


def raise_if_cancelled_since(before: int) -> None:
    """Raise CancelledError if this task was asked to cancel since `before` (cancel_requests()) and is still
    running: a wait inside a library dropped the cancel. Counting from `before` leaves alone a task that
    handled an earlier cancel and goes on."""
    if cancel_requests() > before:
        raise asyncio.CancelledError
