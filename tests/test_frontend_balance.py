"""How a frontend's processes share the connections of their one socket (workers.frontend.balance): the rule
each process applies before it accepts, on a real shared file, and the accepting itself over real sockets, on
asyncio's loop and on uvloop (the frontend's). The whole group runs for real in test_frontend_e2e.py
(`processes: 2`, a child killed -9)."""

from __future__ import annotations

import asyncio
import errno
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


async def _published(*loads: GroupLoad) -> None:
    """Until each acceptor has published its slot (is live to the others)."""
    await _until(lambda: all(slot_of(load)[1] != balance.NOT_LIVE for load in loads))


def slot_of(load: GroupLoad) -> tuple[int, int]:
    """(connections, heartbeat) of the load's process, as the other processes read it (one shared mapping)."""
    return load._words[2 * load.index], load._words[2 * load.index + 1]


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
    monkeypatch.setattr(balance, "MAX_WAIT_S", 30.0)  # ... nor the loaded process help (the next test's case)

    async def run() -> list[int]:
        listener = socket.create_server(("127.0.0.1", 0))
        loads = group(tmp_path, 2)
        accepted = [0, 0]
        held: list[set[object]] = [set(), {object() for _ in range(SLACK + 3)}]  # process 1 holds SLACK + 3
        acceptors = [BalancedAcceptor(listener.dup(), counting(accepted, k), loads[k], held[k]).start()
                     for k in (0, 1)]
        await _published(*loads)
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
def test_a_queue_the_least_loaded_process_does_not_take_is_taken_by_another_more_the_longer_it_waits(
        tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The least loaded process is live but takes nothing (its loop is busy: here it has no acceptor at all).
    The process over its share takes the queue, one more connection ahead of its share for each MAX_WAIT_S the
    queue has not emptied: the k-th connection it takes waits about k waits, not forever."""
    monkeypatch.setattr(balance, "STALE_S", 30.0)
    queued = 6

    async def run() -> list[float]:
        listener = socket.create_server(("127.0.0.1", 0))
        over, least = group(tmp_path, 2)
        least.publish(0, time.monotonic_ns())
        held: set[object] = set()
        made: list[float] = []

        class Held(asyncio.Protocol):  # counted as uvicorn counts an open connection
            def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
                made.append(time.monotonic())
                held.add(self)

        acceptor = BalancedAcceptor(listener.dup(), Held, over, held).start()
        await _published(over)
        started = time.monotonic()
        await _connect(listener.getsockname()[1], queued)
        await _until(lambda: len(made) == queued)
        acceptor.close()
        await acceptor.wait_closed()
        listener.close()
        acceptor.sock.close()
        return [t - started for t in made]

    waits = run_on(loop, run())
    assert len(waits) == queued, "the connections were left in the queue"
    wait = balance.MAX_WAIT_S
    # SLACK + 1 at once (within its share of a process holding 0), then one more per wait
    assert all(w < wait * 0.9 for w in waits[:SLACK + 1]), waits
    assert waits[-1] >= wait * (queued - SLACK - 1) * 0.9, f"{waits}: it took the queue without waiting"
    assert waits[-1] < wait * (queued - SLACK - 1) * 5 + 0.5, f"{waits}: it waited far longer than the bound"


@pytest.mark.parametrize("loop", LOOPS)
def test_the_wait_is_for_the_least_loaded_process(tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    """... and the process over its share did wait for it first: nothing is taken before MAX_WAIT_S."""
    monkeypatch.setattr(balance, "STALE_S", 30.0)

    async def run() -> float:
        listener = socket.create_server(("127.0.0.1", 0))
        over, least = group(tmp_path, 2)
        least.publish(0, time.monotonic_ns())
        made: list[float] = []

        class Timed(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
                made.append(time.monotonic())
                transport.close()

        acceptor = BalancedAcceptor(listener.dup(), Timed, over, {object() for _ in range(SLACK + 3)}).start()
        await _published(over)
        started = time.monotonic()
        await _connect(listener.getsockname()[1], 1)
        await _until(lambda: bool(made))
        took = made[0] - started
        acceptor.close()
        await acceptor.wait_closed()
        listener.close()
        acceptor.sock.close()
        return took

    assert run_on(loop, run()) >= balance.MAX_WAIT_S * 0.9


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


@pytest.mark.parametrize("loop", LOOPS)
def test_a_process_whose_accepting_fails_withdraws_from_the_group(tmp_path: Path, loop: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug that ends the accept loop: the process says so and marks its slot not live (a live slot that takes
    nothing would hold the others back), and its heartbeat stops."""

    def broken(sock: socket.socket) -> bool:
        raise RuntimeError("a bug in the accept loop")

    monkeypatch.setattr(balance, "_readable", broken)

    async def run() -> tuple[tuple[int, int], bool]:
        listener = socket.create_server(("127.0.0.1", 0))
        path = GroupLoad.create(str(tmp_path), 2)
        load = GroupLoad(path, 0)
        acceptor = BalancedAcceptor(listener, counting([0], 0), load, set()).start()
        await _until(lambda: all(t.done() for t in acceptor._tasks), timeout=5)
        heartbeat_stopped = acceptor._tasks[1].done()
        seen = slot_of(load)
        acceptor.close()
        await acceptor.wait_closed()
        listener.close()
        return seen, heartbeat_stopped

    seen, heartbeat_stopped = run_on(loop, run())
    assert seen[1] == balance.NOT_LIVE and heartbeat_stopped


class FailsFirstAccept:
    """A listening socket whose first accept fails as when the process is out of descriptors."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failed = False

    def fileno(self) -> int:
        return self.real.fileno()

    def setblocking(self, flag: bool) -> None:
        self.real.setblocking(flag)

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_process_that_cannot_accept_is_not_live_until_it_can(tmp_path: Path, loop: str) -> None:
    async def run() -> tuple[int, int]:
        listener = socket.create_server(("127.0.0.1", 0))
        path = GroupLoad.create(str(tmp_path), 2)
        accepted = [0]
        sock = FailsFirstAccept(listener)
        load = GroupLoad(path, 0)
        acceptor = BalancedAcceptor(sock, counting(accepted, 0), load, set())  # type: ignore[arg-type]
        acceptor.start()
        await _connect(listener.getsockname()[1], 1)
        await _until(lambda: sock.failed, timeout=5)
        await asyncio.sleep(balance.TICK_S * 2)  # heartbeats would have made it live again
        during = slot_of(load)[1]
        await _until(lambda: accepted[0] == 1)
        acceptor.close()
        await acceptor.wait_closed()
        listener.close()
        return during, accepted[0]

    during, accepted = run_on(loop, run())
    assert during == balance.NOT_LIVE, "live while it could not accept"
    assert accepted == 1, "it did not try again"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_closed_acceptor_does_not_spin_on_a_socket_other_processes_still_hold(tmp_path: Path, loop: str) -> None:
    """uvicorn's order: close() the server, then close this process's descriptor, while another process still
    holds the socket and a connection waits in its queue. The draining process must not wake for it."""

    async def run() -> float:
        listener = socket.create_server(("127.0.0.1", 0))
        (load,) = group(tmp_path, 1)
        acceptor = BalancedAcceptor(listener.dup(), counting([0], 0), load, set()).start()
        await _published(load)
        acceptor.close()
        acceptor.sock.close()
        await _connect(listener.getsockname()[1], 1)  # queued: nobody accepts any more
        cpu = time.process_time()
        await asyncio.sleep(0.3)
        used = time.process_time() - cpu
        await acceptor.wait_closed()
        listener.close()
        return used

    assert run_on(loop, run()) < 0.1
