"""The ports tests and benches hand to processes that bind them later (a frontend, after minutes of model
loading): they must stay free until then, which a port of the ephemeral range does not (any outgoing
connection may take it as its local port; a frontend's port was taken so in CI)."""

from __future__ import annotations

import socket

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


def test_a_port_held_by_an_outgoing_connection_is_never_chosen() -> None:
    """Open connections until some take local ports: none of those ports may be handed out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        clients = [socket.create_connection(server.getsockname()) for _ in range(32)]
        try:
            taken = {c.getsockname()[1] for c in clients}
            assert not taken & set(svc.free_ports(200))
        finally:
            for c in clients:
                c.close()
