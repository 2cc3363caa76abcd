"""Waiting with a deadline without losing the task's cancellation.

Why: before Python 3.12, `asyncio.wait_for` returns the awaited result and drops a cancel that arrives
in the instant that result comes in (cpython gh-86296, fixed in 3.12 by building it on
`asyncio.timeout`). A loop task cancelled at shutdown in that instant runs on for ever, and whoever
awaits it hangs: CI saw a follower of etcd that `task.cancel()` could not stop, because aetcd waits for
each watch's creation with `asyncio.wait_for`.

`wait_for` here is `asyncio.timeout` around the await on 3.11 (no inner task, so nothing to drop), and
`asyncio.wait_for` on 3.10. `raise_dropped_cancel` is for the waits inside libraries we call: after
one, a task that was asked to cancel (Task.cancelling, 3.11+) stops there.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 11):
    async def wait_for(aw: Awaitable[T], timeout: float | None) -> T:
        """`asyncio.wait_for`, raising TimeoutError after `timeout` seconds, keeping a cancel that comes
        as `aw` finishes."""
        async with asyncio.timeout(timeout):
            return await aw
else:  # pragma: no cover - 3.10 has no asyncio.timeout; its wait_for may drop a cancel (module docstring)
    wait_for = asyncio.wait_for


def raise_dropped_cancel() -> None:
    """Raise CancelledError if this task was asked to cancel and is still running (a wait inside a
    library dropped the cancel). Python 3.10 cannot tell (no Task.cancelling): nothing happens there."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError
