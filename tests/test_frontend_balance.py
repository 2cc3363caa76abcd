"""How a frontend's processes share the connections of their one socket (workers.frontend.balance): the rule
each process applies before it accepts, on a real shared file, and the accepting itself over real sockets.
The whole group runs for real in test_frontend_e2e.py (`processes: 2`, a child killed -9)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from workers.frontend.balance import SLACK, STALE_S, BalancedAcceptor, GroupLoad


def group(folder: Path, count: int) -> list[GroupLoad]:
    path = GroupLoad.create(str(folder), count)
    return [GroupLoad(path, k) for k in range(count)]


def test_a_process_accepts_while_within_slack_of_the_least_loaded_live_one(tmp_path: Path) -> None:
    a, b, c = group(tmp_path, 3)
    now = 100.0
    a.publish(5, now)
    b.publish(2, now)
    c.publish(9, now)
    assert b.may_accept(2, now), "the least loaded process always may"
    assert a.may_accept(2 + SLACK, now) and not a.may_accept(3 + SLACK, now)
    assert not c.may_accept(9, now)
    # later, b's slot was not refreshed (b died or froze): its 2 no longer holds the others back; a's counts
    later = now + STALE_S + 0.01
    a.publish(5, later)
    assert not c.may_accept(9, later)
    a.publish(8, later)
    assert c.may_accept(9, later)


def test_a_process_alone_or_among_dead_ones_always_accepts(tmp_path: Path) -> None:
    a, b = group(tmp_path, 2)
    assert a.may_accept(1000, 5.0), "b never wrote its slot: not live"
    b.publish(0, 5.0)
    b.publish(0, 0.0)  # what a stopping process writes (BalancedAcceptor.close)
    assert a.may_accept(1000, 5.0)


def test_a_slot_outside_the_group_is_refused(tmp_path: Path) -> None:
    path = GroupLoad.create(str(tmp_path), 2)
    with pytest.raises(ValueError, match="no slot 2"):
        GroupLoad(path, 2)


def test_a_loaded_process_leaves_the_queued_connections_to_the_other(tmp_path: Path) -> None:
    """Two acceptors on one listening socket, one already holding more than its share: every connection made
    while that lasts is taken by the other. (The loaded one is the one the loop would wake first: without the
    rule it takes them all.)"""

    async def run() -> tuple[int, int]:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        loads = group(tmp_path, 2)
        accepted = [0, 0]
        busy: set[object] = {object() for _ in range(SLACK + 3)}  # process 1 holds SLACK + 3 connections
        held: list[set[object]] = [set(), busy]

        def factory(k: int) -> type[asyncio.Protocol]:
            class Counting(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    accepted[k] += 1
                    transport.close()

            return Counting

        # each its own descriptor of the one socket, as each process of a group has
        acceptors = [BalancedAcceptor(listener.dup(), factory(k), loads[k], held[k]).start() for k in (0, 1)]
        await asyncio.sleep(0.05)  # both published their slots
        for _ in range(6):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        deadline = asyncio.get_running_loop().time() + 10
        while sum(accepted) < 6 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for acceptor in acceptors:
            acceptor.close()
        await asyncio.gather(*(acceptor.wait_closed() for acceptor in acceptors))
        for sock in [listener, *(acceptor.sock for acceptor in acceptors)]:
            sock.close()
        return accepted[0], accepted[1]

    assert asyncio.run(run()) == (6, 0)
