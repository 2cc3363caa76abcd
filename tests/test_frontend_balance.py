"""How a frontend's processes share the connections of their one socket (workers.frontend.balance): the rule
each process applies before it accepts, on a real shared file, and the accepting itself over real sockets, on
asyncio's loop and on uvloop (the frontend's). The whole group runs for real in test_frontend_e2e.py
(`processes: 2`, a child killed -9)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from workers.frontend import balance
from workers.frontend.balance import SLACK, STALE_S, BalancedAcceptor, GroupLoad

MS = 1_000_000
LOOPS = ["asyncio", "uvloop"]


def run_on(loop: str, main: Coroutine[Any, Any, Any]) -> Any:
    """asyncio's own loop, or uvloop (the frontend's, as vLLM's; it comes with vLLM)."""
    if loop == "asyncio":
        return asyncio.run(main)
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (vLLM brings it)")
    return uvloop.run(main)


def group(folder: Path, count: int) -> list[GroupLoad]:
    path = GroupLoad.create(str(folder), count)
    return [GroupLoad(path, k) for k in range(count)]


def test_a_process_accepts_while_within_slack_of_the_least_loaded_live_one(tmp_path: Path) -> None:
    a, b, c = group(tmp_path, 3)
    now = 100_000 * MS
    a.publish(5, now)
    b.publish(2, now)
    c.publish(9, now)
    assert b.may_accept(2, now), "the least loaded process always may"
    assert a.may_accept(2 + SLACK, now) and not a.may_accept(3 + SLACK, now)
    assert not c.may_accept(9, now)
    # later, b's slot was not refreshed (b died or froze): its 2 no longer holds the others back; a's counts
    later = now + int(STALE_S * 1e9) + 10 * MS
    a.publish(5, later)
    assert not c.may_accept(9, later)
    a.publish(8, later)
    assert c.may_accept(9, later)


def test_a_process_alone_or_among_withdrawn_ones_always_accepts(tmp_path: Path) -> None:
    a, b = group(tmp_path, 2)
    now = 5_000 * MS
    assert a.may_accept(1000, now), "b never wrote its slot: not live"
    b.publish(0, now)
    assert not a.may_accept(1000, now)
    b.withdraw()  # what a draining process, or one whose accepting failed, does
    assert a.may_accept(1000, now)


def test_a_slot_outside_the_group_is_refused(tmp_path: Path) -> None:
    path = GroupLoad.create(str(tmp_path), 2)
    with pytest.raises(ValueError, match="no slot 2"):
        GroupLoad(path, 2)


async def _connect(port: int, n: int) -> None:
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()


async def _until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def counting(accepted: list[int], k: int) -> type[asyncio.Protocol]:
    class Counting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            accepted[k] += 1
            transport.close()

    return Counting


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loaded_process_leaves_the_queued_connections_to_the_other(tmp_path: Path, loop: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two acceptors on one listening socket, each with its own descriptor of it as each process of a group
    has, one already holding more than its share: every connection made while that lasts is taken by the
    other. (The loaded one is the one the loop would wake first: without the rule it takes them all.)"""
    monkeypatch.setattr(balance, "STALE_S", 30.0)  # a stalled test loop must not make a slot look dead

    async def run() -> list[int]:
        listener = socket.create_server(("127.0.0.1", 0))
        loads = group(tmp_path, 2)
        accepted = [0, 0]
        held: list[set[object]] = [set(), {object() for _ in range(SLACK + 3)}]  # process 1 holds SLACK + 3
        acceptors = [BalancedAcceptor(listener.dup(), counting(accepted, k), loads[k], held[k]).start()
                     for k in (0, 1)]
        await asyncio.sleep(0.05)  # both published their slots
        await _connect(listener.getsockname()[1], 6)
        await _until(lambda: sum(accepted) == 6)
        for acceptor in acceptors:
            acceptor.close()
        await asyncio.gather(*(acceptor.wait_closed() for acceptor in acceptors))
        for sock in [listener, *(acceptor.sock for acceptor in acceptors)]:
            sock.close()
        return accepted

    assert run_on(loop, run()) == [6, 0]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_waits_briefly_for_a_busy_process_whose_turn_it_is(tmp_path: Path, loop: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The least loaded process is live but takes nothing (its loop is busy: here it has no acceptor at all):
    the process over its share takes the queued connections after MAX_WAIT_S each, instead of leaving them."""
    monkeypatch.setattr(balance, "STALE_S", 30.0)

    async def run() -> tuple[int, float]:
        listener = socket.create_server(("127.0.0.1", 0))
        over, least = group(tmp_path, 2)
        least.publish(0, time.monotonic_ns())
        accepted = [0]
        acceptor = BalancedAcceptor(listener.dup(), counting(accepted, 0), over,
                                    {object() for _ in range(SLACK + 3)}).start()
        started = time.monotonic()
        await _connect(listener.getsockname()[1], 3)
        await _until(lambda: accepted[0] == 3)
        took = time.monotonic() - started
        acceptor.close()
        await acceptor.wait_closed()
        listener.close()
        acceptor.sock.close()
        return accepted[0], took

    accepted, took = run_on(loop, run())
    assert accepted == 3, "the connections were left in the queue"
    assert took >= 3 * balance.MAX_WAIT_S * 0.9, "it took them at once: the least loaded process was not waited for"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_that_fails_to_set_up_is_closed_and_accepting_goes_on(tmp_path: Path, loop: str) -> None:
    async def run() -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        (load,) = group(tmp_path, 1)
        made = [0]

        class FailsOnce(asyncio.Protocol):
            def __init__(self) -> None:
                made[0] += 1
                if made[0] == 1:
                    raise RuntimeError("a bug in one connection's setup")

            def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
                transport.close()

        acceptor = BalancedAcceptor(listener.dup(), FailsOnce, load, set()).start()
        await _connect(listener.getsockname()[1], 3)
        await _until(lambda: made[0] == 3)
        alive = not acceptor._tasks[0].done()
        acceptor.close()
        await acceptor.wait_closed()
        listener.close()
        acceptor.sock.close()
        return made[0] if alive else -1

    assert run_on(loop, run()) == 3
