"""N frontend processes on one port, as `vllm serve --api-server-count N` runs them.

The first process (the one the supervisor starts) binds the listening socket and starts N-1 children of the same
module that inherit it (`--listen-fd`). Every process accepts on that one socket, while it holds no more than its
share (see below). Why one inherited socket, not SO_REUSEPORT: a port bound with SO_REUSEPORT can be bound again by
any process of the same user, so a second deployment given the same port by mistake would silently take part of
this one's traffic; an inherited socket makes that mistake an EADDRINUSE, as it is with one process. And a process
that dies takes the connections queued on its own SO_REUSEPORT socket with it (reset), where on one shared socket
another process accepts them: SO_REUSEPORT was tried (with a plain bind first, to keep the EADDRINUSE), and
`test_frontend_e2e`'s kill -9 of a child then saw a request fail. On one shared socket the process that wakes first
would accept everything queued (a burst of 64 over 4 processes peaked at 1.75x the even share on one process, 1.25x
with SO_REUSEPORT, and 9 bursts of 20 left a process idle: `bench/results/frontend-spread-cpu.md`), so each process
takes the next connection only while it holds its share (`workers.frontend.balance`: no more than the least loaded
live process plus one, and one more for each 10 ms the queue has not emptied).

Each child builds its own vLLM OpenAI layer, NATS connection and view of etcd, and only starts accepting
once it can serve; it says so on a pipe (`--ready-fd`), and the parent registers the frontend in etcd only
when it and every child serve. The parent forwards SIGTERM/SIGINT to the children (the supervisor signals
the process it started, not its children), waits for them to drain, restarts a child that dies while the
group serves, and exits if children keep dying before they serve (a setup error: the supervisor's restart
policy takes over). Metrics: prometheus_client's multiprocess mode over a folder the parent makes and
removes, so `/metrics` from any process counts the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from workers.frontend import metrics
from workers.frontend.balance import GroupLoad

log = logging.getLogger(__name__)

MODULE = "workers.frontend.server"
QUICK_DEATHS = 3  # children dying in a row before they serve: the group gives up
RESPAWN_DELAY = 1.0


AUTO_CORES_PER_PROCESS = 8
AUTO_MAX = 8


def auto_processes(cores: int) -> int:
    """`processes: auto`: one per 8 cores, 1 to 8. Each process is one Python event loop (HTTP, vLLM's render
    and derender), and the engines, the router and NATS need the other cores; on a 16-core H100 host, 8
    processes did worse than 4 (bench/gpu/results/ISSUE19.md)."""
    return max(1, min(AUTO_MAX, cores // AUTO_CORES_PER_PROCESS))


CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def _quota_cores(cpu_max: Path) -> int | None:
    """cgroup v2 `cpu.max` ("150000 100000": 1.5 CPUs, counted as 2; "max ...": none)."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" or int(period) <= 0 else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cores(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The cores this process may run on: its CPU affinity, capped by the CPU quota of its cgroup v2 and of
    every cgroup above it (a container's CPU limit, systemd's CPUQuota), so `auto` follows the host or pod
    the frontend runs in. Without cgroup v2 (v1, or unreadable), the affinity alone."""
    cores = len(os.sched_getaffinity(0))
    try:
        own = next(line[3:].strip() for line in self_cgroup.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        own = "/"
    folder = cgroup_root / own.lstrip("/")
    while True:
        quota = _quota_cores(folder / "cpu.max")
        if quota is not None:
            cores = min(cores, quota)
        if folder == cgroup_root or cgroup_root not in folder.parents:
            return cores
        folder = folder.parent


def int_or_auto(value: str) -> int | str:
    """`--processes N` or `--processes auto` (resolved where the frontend runs: `auto_processes`)."""
    return value if value == "auto" else int(value)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening as uvicorn's own would be (SO_REUSEADDR, backlog 2048), inheritable by children."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False


@dataclass
class ServerGroup:
    """The parent's side: the socket, the children, the shared metrics folder."""

    count: int  # processes in all, this one included
    argv: list[str]  # this process's own arguments, given again to each child
    sock: socket.socket
    metrics_dir: str = ""
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str = ""
    load_path: Path = Path()  # each process's open connections (workers.frontend.balance), in metrics_dir

    @classmethod
    def open(cls, count: int, argv: list[str], host: str, port: int) -> ServerGroup:
        """Bind the port and switch this process's metrics to the group's folder (before any metric exists)."""
        sock = listening_socket(host, port)
        folder = tempfile.mkdtemp(prefix="frontend-metrics-")
        metrics.use_multiprocess(folder)
        children = [Child(k) for k in range(1, count)]
        return cls(count, argv, sock, folder, children, load_path=GroupLoad.create(folder, count))

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self._keep(child)) for child in self.children]

    async def _spawn(self, child: Child) -> int:
        """Start one child; returns the read end of its ready pipe."""
        r, w = os.pipe()
        argv = [sys.executable, "-m", MODULE, *self.argv, "--processes", "1",
                "--listen-fd", str(self.sock.fileno()), "--ready-fd", str(w),
                "--group-load", str(self.load_path), "--group-index", str(child.index)]
        try:
            child.proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(self.sock.fileno(), w),
                                                              env={**os.environ, metrics.MULTIPROC_ENV:
                                                                   self.metrics_dir})
        finally:
            os.close(w)
        log.info("frontend process %d/%d started (pid %d)", child.index + 1, self.count, child.proc.pid)
        return r

    async def _keep(self, child: Child) -> None:
        """Run one child for the group's life: start it, hear that it serves, start it again if it dies."""
        quick = 0
        while not self.stopping:
            r = await self._spawn(child)
            assert child.proc is not None
            said = await asyncio.to_thread(_read_byte, r)  # b"" when it died first
            if said and not self.stopping:
                child.ready, quick = True, 0
                log.info("frontend process %d/%d serves (pid %d)", child.index + 1, self.count, child.proc.pid)
                if all(c.ready for c in self.children):
                    self.all_ready.set()
            code = await child.proc.wait()
            child.ready = False
            metrics.process_dead(child.proc.pid)
            if self.stopping:
                return
            quick = 0 if said else quick + 1
            log.warning("frontend process %d/%d (pid %d) exited with code %s%s; starting it again",
                        child.index + 1, self.count, child.proc.pid, code, "" if said else " before it served")
            if quick >= QUICK_DEATHS:
                self.failed = (f"frontend process {child.index + 1}/{self.count} exited {quick} times before "
                               "it served (see its log lines above)")
                log.error("%s: the frontend stops", self.failed)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            await asyncio.sleep(RESPAWN_DELAY)

    def forward(self, sig: int) -> None:
        """A stop signal reached the parent: each child gets it too, once, and drains on its own."""
        self.stopping = True
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    async def wait_children(self, timeout: float) -> None:
        """Every child ended (drained); those still there at `timeout` are killed."""
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.returncode is None]
        if procs:
            _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=timeout)
            for p in procs:
                if p.returncode is None:
                    log.warning("frontend child pid %d still running %.0f s after the stop: killed", p.pid, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            if late:
                await asyncio.wait(late, timeout=5)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _read_byte(fd: int) -> bytes:
    try:
        return os.read(fd, 1)
    finally:
        os.close(fd)


def tell_parent(ready_fd: int) -> None:
    """A child serves: one byte on its ready pipe."""
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"1")
    with contextlib.suppress(OSError):
        os.close(ready_fd)


async def exit_with_parent(on_orphaned: asyncio.Event) -> None:
    """A child whose parent is gone (killed -9) stops too, rather than serving on as an orphan."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the frontend's first process (pid %d) is gone: this child stops", parent)
    on_orphaned.set()
