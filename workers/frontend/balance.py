"""Connections spread evenly over a frontend's `processes: N`, on their one shared listening socket.

Why: on one shared socket the kernel wakes every process and whichever runs first accepts, so a burst lands
unevenly (64 connections over 4 processes: up to 38 on one, `bench/results/frontend-spread-cpu.md`). On one
H100 (`bench/gpu/results/ISSUE19.md`, runs 9-10) the busiest of 4 processes was about twice as busy as their
mean under waves of 64 and 256, and frontend-n's TTFT p90 was 1.4-2.5x the NATS path's while its p50 was
lower: the requests that landed on the crowded process waited behind the others' rendering.

How: each process accepts with its own loop (readable, then a fresh decision, then a non-blocking accept, then
`connect_accepted_socket` with uvicorn's HTTP protocol, made as uvicorn's startup makes it; no TLS here, as in
uvicorn's config the frontend builds), and takes the next connection only while it holds no more than the least
loaded live process plus `SLACK`, and one more for each `MAX_WAIT_S` the queue has not emptied (the process whose
turn it is does not keep up: the others help, the more the longer it lasts, so the rule adds little to the tail it
is there to shorten). Letting every process take the whole queue after one wait undid the spread on a loaded
2-core machine (largest share of a burst of 64 over the even one 1.69 instead of 1.0), where the least loaded
process is often slow. The processes publish their open connections in a small shared file (one slot each: count
and a heartbeat, written by its owner only); a slot whose heartbeat is older than `STALE_S` (a dead or frozen
process) is ignored, and a process that stops accepting (draining, or its accept loop failed) marks its slot not
live at once. What a process leaves in the queue another accepts: the socket stays the one shared socket, so a
process killed -9 takes none of the queued connections with it (the reason SO_REUSEPORT was not kept, see
processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import select
import socket
import time
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A slot: open connections, heartbeat (time.monotonic_ns(): one clock for the whole host), as two aligned 8-byte
# integers, each written in one store (a reader may see a new count with the last heartbeat: one decision off)
SLOT_BYTES = 16
SLACK = 1  # connections a process may hold above the least loaded live one and still take the next
STALE_S = 0.1  # a slot not refreshed for this long belongs to a dead or frozen process: ignored
MAX_WAIT_S = 0.01  # each such wait of a queue not emptied lets a process run one more ahead of its share
TICK_S = 0.02  # how often a process refreshes its slot while nothing else happens
POLL_S = 0.002  # how often a process over its share looks again while a connection waits in the queue
NOT_LIVE = 0  # the heartbeat of a slot whose process does not accept (never written, draining, failed)


class GroupLoad:
    """The open connections of each process of a group, in a file every process maps (slot k: process k)."""

    def __init__(self, path: Path, index: int) -> None:
        self.index = index
        self._fd = os.open(path, os.O_RDWR)
        self.count = os.fstat(self._fd).st_size // SLOT_BYTES  # the group's size: one slot per process
        if not 0 <= index < self.count:
            os.close(self._fd)
            raise ValueError(f"{path}: no slot {index} in a group of {self.count}")
        self._map = mmap.mmap(self._fd, SLOT_BYTES * self.count)
        self._words = memoryview(self._map).cast("q")  # slot k: words 2k (count) and 2k + 1 (heartbeat)
        self._closed = False

    @staticmethod
    def create(folder: str, count: int) -> Path:
        """The group's file (zeroed: no slot is live until its process writes it)."""
        path = Path(folder) / "accept-load"
        path.write_bytes(bytes(SLOT_BYTES * count))
        return path

    def publish(self, connections: int, now_ns: int) -> None:
        if not self._closed:
            self._words[2 * self.index] = connections
            self._words[2 * self.index + 1] = now_ns

    def withdraw(self) -> None:
        """This process accepts no more: the others stop counting it at once."""
        self.publish(0, NOT_LIVE)

    def may_accept(self, connections: int, now_ns: int, extra: int = 0) -> bool:
        """Whether this process, holding `connections`, is within SLACK (+ `extra`) of the least loaded live
        process."""
        least = connections
        stale = int(STALE_S * 1e9)
        for k in range(self.count):
            if k == self.index:
                continue
            held, beat = self._words[2 * k], self._words[2 * k + 1]
            if beat != NOT_LIVE and now_ns - beat <= stale:
                least = min(least, held)
        return connections <= least + SLACK + extra

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._words.release()
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


class BalancedAcceptor:
    """Accepts on `sock` while this process holds its share (GroupLoad); stands where uvicorn keeps its
    asyncio servers (`close`, `wait_closed`).

    It waits for the socket to be readable (a reader on the loop), decides with a fresh look at the group, and
    then takes one connection with a non-blocking accept (another process may have taken it: it waits again), so
    a permission is never spent on a connection that comes later. A connection taken is set up in a task of its
    own that closing does not cancel: once accepted it is served (or drained) as uvicorn's server serves it."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol], load: GroupLoad,
                 connections: Sized) -> None:
        self.sock = sock
        self.factory = protocol_factory
        self.load = load
        self.connections = connections  # uvicorn's server_state.connections: the open ones, kept by uvicorn
        self._tasks: list[asyncio.Task[None]] = []
        self._setting_up: set[asyncio.Task[None]] = set()  # accepted, not yet in `connections`
        self._backing_off = False  # accept failed (EMFILE, ...): not live until it is tried again

    def start(self) -> BalancedAcceptor:
        self.sock.setblocking(False)
        accepting = asyncio.create_task(self._accept_loop(), name="frontend-accept")
        accepting.add_done_callback(self._accepting_ended)
        self._tasks = [accepting, asyncio.create_task(self._heartbeat(), name="frontend-accept-heartbeat")]
        return self

    def _held(self) -> int:
        return len(self.connections) + len(self._setting_up)

    def _accepting_ended(self, task: asyncio.Task[None]) -> None:
        """Accepting never ends but by close(): a bug that ended it is said, and this process withdraws from the
        group (a live slot that accepts nothing would hold the others back), so the others serve on."""
        if not task.cancelled() and task.exception() is not None:
            log.error("this frontend process stopped accepting connections", exc_info=task.exception())
        for other in self._tasks[1:]:
            other.cancel()
        self.load.withdraw()

    async def _heartbeat(self) -> None:
        while True:
            if not self._backing_off:
                self.load.publish(self._held(), time.monotonic_ns())
            await asyncio.sleep(TICK_S)

    async def _accept_loop(self) -> None:
        """Take each queued connection this process may take: while it holds its share, and one more for each
        MAX_WAIT_S the queue has not emptied (the process whose turn it is does not keep up: the others help,
        the more the longer it lasts, and go back to their share once the queue is seen empty)."""
        loop = asyncio.get_running_loop()
        queued_since: int | None = None  # since when the queue has been seen non-empty without a pause
        while True:
            if not _readable(self.sock):
                queued_since = None
                await _until_readable(loop, self.sock)
                continue
            now = time.monotonic_ns()
            held = self._held()
            self.load.publish(held, now)
            if queued_since is None:
                queued_since = now
            if not self.load.may_accept(held, now, extra=int((now - queued_since) / (MAX_WAIT_S * 1e9))):
                await asyncio.sleep(POLL_S)
                continue
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:  # another process took it
                continue
            except OSError as exc:  # e.g. EMFILE: said, not live meanwhile, tried again
                log.warning("accepting a connection failed: %s", exc)
                self._backing_off = True
                self.load.withdraw()
                await asyncio.sleep(0.1)
                self._backing_off = False
                continue
            setup = asyncio.create_task(self._set_up(loop, conn))
            self._setting_up.add(setup)
            setup.add_done_callback(self._setting_up.discard)
            self.load.publish(self._held(), time.monotonic_ns())
            await asyncio.sleep(0)  # the setup runs; the other processes' turns come

    async def _set_up(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(self.factory, conn)
        except Exception:  # the client went away between accept and setup, or a bug: this connection only
            log.warning("an accepted connection could not be set up", exc_info=True)
            conn.close()

    def close(self) -> None:
        """Stop accepting (uvicorn's shutdown); the connections open, or being set up, go on until they end. The
        socket's reader is removed now: uvicorn closes this descriptor next, while other processes hold the
        socket, and a reader left registered would wake this process for every queued connection while it
        drains."""
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.load.withdraw()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, *self._setting_up, return_exceptions=True)
        self.load.close()


def _readable(sock: socket.socket) -> bool:
    """Whether a connection waits in the listening socket's queue (without taking it)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


async def _until_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if sock.fileno() == fd:  # (closed meanwhile by uvicorn: close() removed the reader already)
            loop.remove_reader(fd)


def protocol_factory(server: Any) -> Callable[[], asyncio.Protocol]:
    """uvicorn's HTTP protocol for one accepted connection, made as uvicorn's own startup makes it."""
    config = server.config

    def create() -> asyncio.Protocol:
        return config.http_protocol_class(config=config, server_state=server.server_state,
                                          app_state=server.lifespan.state)

    return create
