"""Start processes in dependency order, gate on etcd registration, restart with backoff, stop cleanly.

The decision logic (`Supervisor.step`) takes the time, the backend and the live registrations as
inputs and does no I/O of its own, so tests drive it with a fake clock and a fake backend and no
sleeping. `run` is the thin loop around it that talks to etcd and writes state.json.

The loop never blocks: `step` (which may wait for a process tree to die, or call tmux) and every
other blocking call run on one worker thread, in order, while the event loop only awaits them; etcd
calls have timeouts. So SIGTERM is seen at once (state.json says `stopping` within a tick), and an
etcd that does not answer leaves readiness as it was instead of stalling supervision.

    python -m launcher.supervisor RUN_DIR      # what `launcher up` leaves running in the background
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from launcher import proctree
from launcher.backends.base import Backend
from launcher.plan import ProcessSpec
from launcher.redact import install_log_filter
from launcher.state import RunDir, read_json, write_json

log = logging.getLogger("launcher.supervisor")

TICK = 0.25
STOP_GRACE = 10.0
ETCD_TIMEOUT = 2.0  # one list or revoke; the next tick tries again

PENDING, STARTING, READY, BACKOFF, EXITED, FAILED, STOPPING, STOPPED = (
    "pending", "starting", "ready", "backoff", "exited", "failed", "stopping", "stopped")
SETTLED = {READY, EXITED, FAILED, STOPPED}


def log_tail(path: Path, lines: int = 15) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


@dataclass
class ProcState:
    name: str
    state: str = PENDING
    pid: int | None = None
    create_time: float | None = None
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    message: str = ""
    next_start_at: float = 0.0
    lease_ids: list[int] = field(default_factory=list)
    pids_seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time, every tree member ever
    log_tail: list[str] = field(default_factory=list)


def leftovers(pids_seen: dict[int, float]) -> list[psutil.Process]:
    """Members of a process tree, ever seen, that are still alive (same pid *and* start time)."""
    out = []
    for pid, created in pids_seen.items():
        if proctree.is_same_process(pid, created):
            with contextlib.suppress(psutil.NoSuchProcess):
                out.append(psutil.Process(pid))
    return out


class Supervisor:
    """Pure decisions over process states. `now` is injected; the backend is any `Backend`."""

    def __init__(self, specs: list[ProcessSpec], backend: Backend, log_for: Callable[[str], Path],
                 clock: Callable[[], float] = time.time) -> None:
        self.specs = {s.name: s for s in specs}
        self.order = [s.name for s in specs]
        self.backend = backend
        self.log_for = log_for
        self.clock = clock
        self.procs = {s.name: ProcState(s.name) for s in specs}

    # --- decisions -------------------------------------------------------------------------
    def step(self, registered: dict[str, list[int]] | None) -> list[int]:
        """One pass over every process. `registered`: process name -> lease ids of its live keys
        (already filtered to the current pid), or None when etcd could not be read (readiness and
        known leases stay as they were). Returns leases to revoke (of processes that died)."""
        now = self.clock()
        revoke: list[int] = []
        for name in self.order:
            spec, p = self.specs[name], self.procs[name]
            if p.state in (PENDING, BACKOFF):
                self._maybe_start(spec, p, now)
            elif p.state in (STARTING, READY):
                code = self.backend.poll(name) if p.pid is not None else None
                if code is not None:
                    revoke += self._on_exit(spec, p, code, now)
                elif registered is None:
                    continue  # etcd unknown: neither ready nor timed out on its account
                elif name in registered:
                    p.lease_ids = list(registered[name])
                    if p.state == STARTING:
                        p.state, p.ready_at, p.message = READY, now, ""
                elif p.state == READY:
                    p.lease_ids = []
                elif p.started_at is not None and now - p.started_at > spec.ready_timeout:
                    self._stop_one(p)
                    p.log_tail = log_tail(self.log_for(name))
                    missed = f"did not register in etcd within its ready_timeout of {spec.ready_timeout:.0f} s"
                    if p.restarts and self._restart_later(spec, p, now):
                        # It served before: a restart that hangs (seen once: a silent child for 300 s)
                        # is a fault to recover from under the restart policy, not the end of the service.
                        p.message = f"{missed}; {p.message}"
                    else:  # the first start: the user is waiting on `up`, and a wrong setup would loop
                        p.state = FAILED
                        p.message = f"{missed}; see the log tail (raise ready_timeout if loading is just slow)"
        return revoke

    def _restart_later(self, spec: ProcessSpec, p: ProcState, now: float) -> bool:
        """Back off and restart `p` if its policy allows another restart; False when it does not."""
        wants_restart = spec.restart_policy in ("always", "on-failure")
        if not wants_restart or p.restarts >= spec.max_restarts:
            return False
        delay = min(spec.backoff * (2 ** p.restarts), spec.backoff_max)
        p.restarts += 1
        p.state, p.next_start_at = BACKOFF, now + delay
        p.message = f"restart {p.restarts}/{spec.max_restarts} in {delay:.1f} s"
        return True

    def _maybe_start(self, spec: ProcessSpec, p: ProcState, now: float) -> None:
        deps = [self.procs[d] for d in spec.depends_on if d in self.procs]
        failed = [d.name for d in deps if d.state in (FAILED, STOPPED, EXITED)]
        if failed:  # also from BACKOFF: waiting for a dependency that will never be ready is a hang
            p.state, p.message = FAILED, f"not started: {', '.join(failed)} failed"
            return
        if any(d.state != READY for d in deps) or now < p.next_start_at:
            return
        p.exit_code, p.lease_ids = None, []
        try:
            p.pid = self.backend.start(spec, self.log_for(spec.name))
        except Exception as exc:  # the backend could not start it at all (no tmux, name taken, bad argv)
            p.pid, p.state = None, FAILED
            p.message = f"could not start: {type(exc).__name__}: {exc}"
            return
        p.create_time = proctree.create_time(p.pid)
        p.pids_seen[p.pid] = p.create_time or 0.0
        p.state, p.started_at, p.ready_at = STARTING, now, None
        p.message = "" if p.restarts == 0 else f"restart {p.restarts}/{spec.max_restarts}"

    def _on_exit(self, spec: ProcessSpec, p: ProcState, code: int, now: float) -> list[int]:
        revoke, p.lease_ids = p.lease_ids, []
        p.exit_code = code
        p.log_tail = log_tail(self.log_for(spec.name))
        # A dead parent can leave its EngineCore behind holding the device: clear the tree now.
        self._reap_leftovers(p)
        wants_restart = spec.restart_policy == "always" or (spec.restart_policy == "on-failure" and code != 0)
        if wants_restart and self._restart_later(spec, p, now):
            p.message = f"exited with code {code}; {p.message}"
        elif wants_restart:
            p.state = FAILED
            p.message = f"exited with code {code}; gave up after {p.restarts} restart(s) (max_restarts)"
        else:
            p.state = EXITED if code == 0 else FAILED
            p.message = f"exited with code {code}"
        return revoke

    # --- process trees ---------------------------------------------------------------------
    def remember_trees(self) -> None:
        """Record every member of every tree: `down` must find children that re-parented away."""
        for p in self.procs.values():
            if p.pid is not None and p.state in (STARTING, READY):
                for child in proctree.tree(p.pid):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.pids_seen.setdefault(child.pid, child.create_time())

    def _reap_leftovers(self, p: ProcState) -> None:
        left = leftovers(p.pids_seen)
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        proctree.wait_gone(left, timeout=5)

    def _stop_one(self, p: ProcState, grace: float = STOP_GRACE) -> None:
        if p.pid is not None:
            proctree.stop_tree(p.pid, grace=grace, extra=leftovers(p.pids_seen), create_time=p.create_time)
            self.backend.poll(p.name)  # reap

    def stop_all(self, grace: float = STOP_GRACE) -> list[int]:
        """Reverse start order; returns the leases to revoke."""
        revoke: list[int] = []
        self.remember_trees()
        for name in reversed(self.order):
            p = self.procs[name]
            if p.state in (STARTING, READY, BACKOFF, PENDING):
                p.state = STOPPING
        for name in reversed(self.order):
            p = self.procs[name]
            if p.state == STOPPING:
                self._stop_one(p, grace)
                revoke += p.lease_ids
                p.lease_ids, p.state = [], STOPPED
        return revoke

    # --- views -----------------------------------------------------------------------------
    def settled(self) -> bool:
        return all(p.state in SETTLED for p in self.procs.values())

    def snapshot(self) -> dict[str, Any]:
        return {name: asdict(self.procs[name]) for name in self.order}


def registered_by_process(regs: list[Any], procs: dict[str, ProcState]) -> dict[str, list[int]]:
    """Only registrations from the current pid count: a dead predecessor's key is not readiness."""
    out: dict[str, list[int]] = {}
    for reg in regs:
        p = procs.get(reg.process)
        if p is not None and p.pid is not None and reg.pid == p.pid:
            out.setdefault(reg.process, []).append(reg.lease_id)
    return out


def make_backend(kind: str, run_dir: RunDir) -> Backend:
    if kind == "tmux":
        from launcher.backends.tmux import TmuxBackend

        return TmuxBackend(run_dir)
    from launcher.backends.subprocess import SubprocessBackend

    return SubprocessBackend()


async def run(run_dir: RunDir, stop: asyncio.Event | None = None) -> int:
    """The supervisor loop: until SIGTERM (or `stop`), then stop everything and exit."""
    from workers.runtime.registry import Registry

    plan = run_dir.plan()
    specs = [ProcessSpec.from_json(s) for s in plan["processes"]]
    backend = make_backend(plan.get("backend", "subprocess"), run_dir)
    sup = Supervisor(specs, backend, run_dir.log_path)
    namespace = plan["namespace"]
    registry = await Registry.connect(plan["etcd"])
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    write_json(run_dir.supervisor_pid_file, {"pid": os.getpid(), "create_time": proctree.create_time(os.getpid())})
    # One thread, so steps never overlap each other or stop_all; the loop itself only awaits.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor")

    def off_loop(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(worker, fn, *args)

    def write_state(**extra: Any) -> None:
        write_json(run_dir.state_file, {"supervisor_pid": os.getpid(), "updated": time.time(),
                                        "processes": sup.snapshot(), **extra})

    async def revoke(leases: list[int]) -> None:
        for lease in leases:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(registry.revoke(lease), ETCD_TIMEOUT)

    last_tree_scan = 0.0
    in_flight: asyncio.Future[Any] | None = None
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            try:
                regs: list[Any] | None = await asyncio.wait_for(registry.list(namespace), ETCD_TIMEOUT)
            except Exception as exc:  # etcd blip: keep supervising processes, readiness waits
                log.warning("etcd list failed: %s", exc or type(exc).__name__)
                regs = None
            registered = None if regs is None else registered_by_process(regs, sup.procs)
            in_flight = off_loop(sup.step, registered)
            await asyncio.wait({in_flight, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not in_flight.done():
                break  # stop asked while the step works: its leases are revoked below, after it
            leases, in_flight = in_flight.result(), None
            await revoke(leases)
            if time.monotonic() - last_tree_scan > 2.0:
                await off_loop(sup.remember_trees)
                last_tree_scan = time.monotonic()
            await off_loop(write_state)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopped), TICK)
    finally:
        log.info("stopping every process")
        with contextlib.suppress(RuntimeError):  # a step thread may be mid-change: the next write is whole
            write_state(stopping=True)  # at once: `status` and `down` see the stop begin
        stopped.cancel()
        # `launcher down --grace S` leaves its grace period here before signalling us.
        grace = float((read_json(run_dir.path / "stop.json", {}) or {}).get("grace", STOP_GRACE))
        leases = []
        if in_flight is not None:
            with contextlib.suppress(Exception):
                leases += await in_flight
        leases += await off_loop(sup.stop_all, grace)
        await revoke(leases)
        write_json(run_dir.state_file, {"supervisor_pid": None, "updated": time.time(),
                                        "processes": sup.snapshot()})
        with contextlib.suppress(Exception):
            await off_loop(backend.close)
        worker.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(registry.close(), ETCD_TIMEOUT)
        with contextlib.suppress(OSError):
            run_dir.supervisor_pid_file.unlink()
    return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()  # supervisor.log: no credential from an exception or a URL
    sys.exit(asyncio.run(run(RunDir(Path(sys.argv[1])))))


if __name__ == "__main__":
    main()
