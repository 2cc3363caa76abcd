"""The ports tests and benches hand to processes that bind them later (a frontend, after minutes of model
loading): they must stay free until then, which a port of the ephemeral range does not (any outgoing
connection may take it as its local port; a frontend's port was taken so in CI)."""

from __future__ import annotations

import socket

import pytest

from launcher import services as svc


def test_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = svc._ephemeral_range()
    first = svc.free_ports(20)
    second = svc.free_ports(20)
    assert len(set(first + second)) == 40  # never twice in one process, bound or not
    for port in first + second:
        assert not low <= port <= high, port
        with socket.socket() as s:  # each is free now
            s.bind(("127.0.0.1", port))


def test_a_port_held_by_a_listener_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        low, _ = svc._ephemeral_range()
        offered = iter([taken, low - 100])  # the held port first, then one below the ephemeral range
        monkeypatch.setattr(svc._pick, "randrange", lambda a, b: next(offered))
        assert svc.free_port() == low - 100


def test_a_block_is_consecutive_free_and_never_handed_out_again() -> None:
    base = svc.free_port_block(16)
    singles = set(svc.free_ports(200))
    assert not singles & set(range(base, base + 16))
    for port in range(base, base + 16):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("ephemeral", [(1024, 60999), (2000, 63000)])
def test_an_ephemeral_range_that_starts_low_leaves_the_ports_above_it(
        monkeypatch: pytest.MonkeyPatch, ephemeral: tuple[int, int]) -> None:
    monkeypatch.setattr(svc, "_ephemeral_range", lambda: ephemeral)
    ports = [*svc.free_ports(30), svc.free_port_block(16)]
    # above the range, and a block's ports stay within a topology's ports (le=65000)
    assert all(ephemeral[1] < p <= svc.TOP_PORT - svc.BLOCK_ROOM for p in ports), ports


def test_an_ephemeral_range_over_every_port_falls_back_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "_ephemeral_range", lambda: (1024, 65535))
    ports = svc.free_ports(5)
    assert len(set(ports)) == 5
    with pytest.raises(svc.ServiceError, match="consecutive ports"):
        svc.free_port_block(16)
