"""A cancel that arrives as a wait's result comes in still stops the task (workers.runtime.aio).

Each test makes that instant deterministic: the awaited future gets its result and the task is cancelled
in the same turn of the loop, before the task runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from workers.runtime.aio import cancel_requests, raise_if_cancelled_since, wait_for


async def cancelled_as_its_wait_ends(wait: Callable[[asyncio.Future[int]], Awaitable[Any]]) -> str:
    """How a task that runs `wait(future)` and then carries on ends, when it is cancelled in the turn its
    future gets a result."""
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def task_body() -> str:
        await wait(future)
        return "ran on"

    task = asyncio.create_task(task_body())
    await asyncio.sleep(0)  # the task is waiting now
    future.set_result(1)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


def test_wait_for_keeps_a_cancel_that_comes_with_the_result() -> None:
    assert asyncio.run(cancelled_as_its_wait_ends(lambda f: wait_for(f, 10))) == "cancelled"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps the cancel from Python 3.12 on")
def test_the_library_wait_drops_it_and_raise_if_cancelled_since_stops_the_task() -> None:
    """asyncio.wait_for (what aetcd waits with) drops the cancel: the task runs on, unless it checks."""
    assert asyncio.run(cancelled_as_its_wait_ends(lambda f: asyncio.wait_for(f, 10))) == "ran on"

    async def checked(f: asyncio.Future[int]) -> None:
        asked = cancel_requests()
        await asyncio.wait_for(f, 10)
        raise_if_cancelled_since(asked)

    assert asyncio.run(cancelled_as_its_wait_ends(checked)) == "cancelled"


def test_a_task_nobody_cancelled_since_runs_on() -> None:
    """Neither a task never cancelled nor one that handled an earlier cancel (without uncancel) and goes on."""
    async def body() -> str:
        raise_if_cancelled_since(cancel_requests())
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # handled here, as a task may: cancelling() stays 1
            await asyncio.Event().wait()  # never set: only the cancel ends it
        asked = cancel_requests()
        await asyncio.sleep(0)  # a wait that nobody cancels
        raise_if_cancelled_since(asked)
        return "ran on"

    assert asyncio.run(body()) == "ran on"


def test_wait_for_still_times_out() -> None:
    async def body() -> None:
        await wait_for(asyncio.Event().wait(), 0.01)

    with pytest.raises(TimeoutError):
        asyncio.run(body())
