"""The socket side of `processes: N` (workers.frontend.processes), on real sockets of this host: a group's
processes each bind the port with SO_REUSEPORT, and the port is still refused to anyone else."""

from __future__ import annotations

import errno
import socket

import pytest

from launcher.services import free_port
from workers.frontend.processes import claim_port, listening_socket


def test_a_claimed_port_is_refused_to_another_deployment_but_joined_by_the_group() -> None:
    port = free_port()
    first = claim_port("127.0.0.1", port)
    try:
        with pytest.raises(OSError) as plain:  # a one-process frontend of another deployment
            listening_socket("127.0.0.1", port)
        assert plain.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError) as group:  # another group's first process: it claims first
            claim_port("127.0.0.1", port)
        assert group.value.errno == errno.EADDRINUSE
        listening_socket("127.0.0.1", port, shared=True).close()  # one of our own children joins
    finally:
        first.close()
    claim_port("127.0.0.1", port).close()  # and the port is free again once the group is gone


def test_a_burst_of_connections_reaches_every_process_of_the_group() -> None:
    """64 connections at once to 4 sockets: each socket gets some. On one shared socket, the process that
    wakes first takes every queued connection (a burst of 16 landed [15, 1, 0, 0] on 4 processes)."""
    port = free_port()
    socks = [claim_port("127.0.0.1", port)]
    socks += [listening_socket("127.0.0.1", port, shared=True) for _ in range(3)]
    clients = []
    try:
        for _ in range(64):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
        counts = []
        for s in socks:
            s.setblocking(False)
            n = 0
            while True:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            counts.append(n)
        assert sum(counts) == 64, counts
        assert min(counts) > 0, f"a process got no connection of the burst: {counts}"
    finally:
        for c in clients:
            c.close()
        for s in socks:
            s.close()
