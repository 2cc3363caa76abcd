"""Connections spread evenly over a frontend's `processes: N`, on their one shared listening socket.

Why: on one shared socket the kernel wakes every process and whichever runs first accepts, so a burst lands
unevenly (64 connections over 4 processes: up to 38 on one, `bench/results/frontend-spread-cpu.md`). On one
H100 (`bench/gpu/results/ISSUE19.md`, runs 9-10) the busiest of 4 processes was about twice as busy as their
mean under waves of 64 and 256, and frontend-n's TTFT p90 was 1.4-2.5x the NATS path's while its p50 was
lower: the requests that landed on the crowded process waited behind the others' rendering.

How: each process accepts with its own loop (`loop.sock_accept`, then `connect_accepted_socket` with
uvicorn's protocol, so HTTP is served exactly as uvicorn serves it), and takes the next connection only
while it holds no more than the least loaded live process plus `SLACK`. The processes publish their open
connections in a small shared file (one slot each: count and a heartbeat time, written by its owner only);
a slot whose heartbeat is older than `STALE_S` (a dead or frozen process) is ignored, so one that dies
holding few connections does not hold the others back for longer than that. What a process leaves in the
queue another accepts: the socket stays the one shared socket, so a process killed -9 takes none of the
queued connections with it (the reason SO_REUSEPORT was not kept, see processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SLOT = struct.Struct("<qd")  # open connections, heartbeat (time.monotonic(): one clock for the whole host)
SLACK = 1  # connections a process may hold above the least loaded live one before it lets the others take
STALE_S = 0.1  # a slot not refreshed for this long belongs to a dead or frozen process: ignored
TICK_S = 0.02  # how often a process refreshes its slot while nothing else happens
POLL_S = 0.002  # how often a process holding its share looks again whether it may accept


class GroupLoad:
    """The open connections of each process of a group, in a file every process maps (slot k: process k)."""

    def __init__(self, path: Path, index: int) -> None:
        self.index = index
        self._fd = os.open(path, os.O_RDWR)
        self.count = os.fstat(self._fd).st_size // SLOT.size  # the group's size: one slot per process
        if not 0 <= index < self.count:
            os.close(self._fd)
            raise ValueError(f"{path}: no slot {index} in a group of {self.count}")
        self._map = mmap.mmap(self._fd, SLOT.size * self.count)

    @staticmethod
    def create(folder: str, count: int) -> Path:
        """The group's file (zeroed: no slot is live until its process writes it)."""
        path = Path(folder) / "accept-load"
        path.write_bytes(bytes(SLOT.size * count))
        return path

    def publish(self, connections: int, now: float) -> None:
        SLOT.pack_into(self._map, SLOT.size * self.index, connections, now)

    def may_accept(self, connections: int, now: float) -> bool:
        """Whether this process, holding `connections`, is within SLACK of the least loaded live process."""
        least = connections
        for k in range(self.count):
            if k == self.index:
                continue
            held, beat = SLOT.unpack_from(self._map, SLOT.size * k)
            if now - beat <= STALE_S:
                least = min(least, held)
        return connections <= least + SLACK

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


class BalancedAcceptor:
    """Accepts on `sock` while this process holds its share (GroupLoad); stands where uvicorn keeps its
    asyncio servers (`close`, `wait_closed`)."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol], load: GroupLoad,
                 connections: Sized) -> None:
        self.sock = sock
        self.factory = protocol_factory
        self.load = load
        self.connections = connections  # uvicorn's server_state.connections: the open ones, kept by uvicorn
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> BalancedAcceptor:
        self.sock.setblocking(False)
        self._tasks = [asyncio.create_task(self._accept_loop(), name="frontend-accept"),
                       asyncio.create_task(self._heartbeat(), name="frontend-accept-heartbeat")]
        return self

    async def _heartbeat(self) -> None:
        while True:
            self.load.publish(len(self.connections), time.monotonic())
            await asyncio.sleep(TICK_S)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while True:
                now = time.monotonic()
                held = len(self.connections)
                self.load.publish(held, now)
                if self.load.may_accept(held, now):
                    break
                await asyncio.sleep(POLL_S)
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # e.g. EMFILE: said, and tried again rather than ending the accepting
                log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.load.publish(len(self.connections) + 1, time.monotonic())  # counted before uvicorn sees it
            try:
                await loop.connect_accepted_socket(self.factory, conn)
            except OSError as exc:  # the client went away between accept and setup
                log.debug("an accepted connection could not be set up: %s", exc)
                conn.close()

    def close(self) -> None:
        """Stop accepting (uvicorn's shutdown); the connections open go on until they end."""
        for task in self._tasks:
            task.cancel()
        self.load.publish(0, 0.0)  # not live any more: the others stop counting this process

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.load.close()


def protocol_factory(server: Any) -> Callable[[], asyncio.Protocol]:
    """uvicorn's HTTP protocol for one accepted connection, made as uvicorn's own startup makes it."""
    config = server.config

    def create() -> asyncio.Protocol:
        return config.http_protocol_class(config=config, server_state=server.server_state,
                                          app_state=server.lifespan.state)

    return create
