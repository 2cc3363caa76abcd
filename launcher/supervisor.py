"""Start processes in dependency order, gate on etcd registration, restart with backoff, drain and stop.

The decision logic (`Supervisor.step`) takes the time, the backend, the process table (`Trees`)
and the live registrations as inputs and waits for nothing, so tests drive it with a fake clock,
a fake backend and fake process trees, and no sleeping. `run` is the thin loop around it that
talks to etcd, takes `launcher restart` requests and writes state.json.

Stopping is a state the loop ticks through, never a wait: SIGTERM to the process group and every
tree member at t (state `draining`: a worker unregisters and finishes its requests within its
drain_timeout), SIGKILL at t + drain_timeout + DRAIN_MARGIN (or `down --grace`), and the process
is gone once no member of its tree (every pid seen, guarded by its start time) is alive, as found
on a later tick. Meanwhile every other process is polled and state.json written on every tick.
The leftovers of a crashed process (an EngineCore outliving its parent) get SIGKILL at once, and
its restart waits until they are gone: a GPU must be free before the replacement starts.

`step` still runs on one worker thread: a backend call (tmux) may take up to its own timeout,
and the event loop must see SIGTERM at once (state.json says `stopping` within a tick) and keep
its etcd calls bounded.

    python -m launcher.supervisor RUN_DIR      # what `launcher up` leaves running in the background
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from launcher import proctree, restart
from launcher.backends.base import Backend
from launcher.plan import ProcessSpec
from launcher.redact import install_log_filter
from launcher.state import RunDir, read_json, write_json
from workers.runtime import exitcodes
from workers.runtime.aio import wait_for

log = logging.getLogger("launcher.supervisor")

TICK = 0.25
STOP_GRACE = 10.0  # SIGTERM -> SIGKILL for a process that never registered: it has nothing to drain
KILL_WAIT = 10.0  # after SIGKILL, a member still alive (stuck in the kernel) is given up on and reported
# max_restarts bounds a crash loop, not a deployment's lifetime: a process that stays ready this long has its
# restart count (and so its backoff) reset, as Kubernetes resets a container's after 10 minutes of running.
STABLE_AFTER = 600.0
# A starting process with a member runnable (state R) that gets no CPU at all for this long is stuck in the
# kernel, not slow: on 2 busy cores every runnable task still gets seconds of CPU in 30 s. Seen on this
# project's CI VMs (kernel 6.18): a worker importing torch stuck in sched_setaffinity (affine_move_task) for
# 8 minutes, deaf to SIGKILL, while its ready_timeout ran. Such a start is abandoned and made again at once.
STUCK_AFTER = 30.0
STUCK_STARTS = 3  # fresh starts for one start's stuck runs; then its ready_timeout decides
ETCD_TIMEOUT = 2.0  # one list or revoke; the next tick tries again
MAX_JOBS = 5  # restart jobs kept in state.json, the running one last

PENDING, STARTING, READY, BACKOFF, EXITED, FAILED, DRAINING, STOPPED = (
    "pending", "starting", "ready", "backoff", "exited", "failed", "draining", "stopped")
SETTLED = {READY, EXITED, FAILED, STOPPED}
# A restart job's phases per process (besides READY and FAILED), and the job's own states.
WAITING, RESTARTING, SKIPPED = "waiting", "restarting", "skipped"
RUNNING, DONE, REJECTED = "running", "done", "rejected"


def log_tail(path: Path, lines: int = 15) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


@dataclass
class Stop:
    """A stop under way: SIGTERM sent at `term_at`, SIGKILL due at `kill_at`; `then`: the state once gone
    (stopped; failed or backoff after a ready timeout; pending for a restart asked by `launcher restart`)."""

    term_at: float
    kill_at: float
    then: str
    killed_at: float | None = None


@dataclass
class ProcState:
    name: str
    state: str = PENDING
    pid: int | None = None
    create_time: float | None = None
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0  # by the restart policy, ever (what `status` shows)
    in_a_row: int = 0  # of those, since it last stayed ready STABLE_AFTER: counts against max_restarts
    manual_restarts: int = 0  # asked by `launcher restart` (never counts against max_restarts)
    exit_code: int | None = None
    message: str = ""
    leftovers_since: float | None = None  # when a (re)start first found its last run's tree still alive
    last_exit: str = ""  # why it last ended (kept once a restart is ready: `status` still says why it restarted)
    next_start_at: float = 0.0
    lease_ids: list[int] = field(default_factory=list)
    pids_seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time, every tree member ever
    log_tail: list[str] = field(default_factory=list)
    stop: Stop | None = None
    cpu_seen: dict[int, tuple[float, float]] = field(default_factory=dict)  # starting: pid -> (cpu s, since)
    stuck_starts: int = 0  # runs of this start abandoned as stuck in the kernel


@dataclass
class RestartJob:
    """One `launcher restart`: each process waiting -> restarting -> ready | failed (skipped once a
    rolling restart failed); the job running -> done | failed, or rejected at once (`message` says why)."""

    id: str
    processes: list[str]
    rolling: bool
    state: str = RUNNING
    phase: dict[str, str] = field(default_factory=dict)
    message: str = ""


def leftovers(pids_seen: dict[int, float]) -> list[psutil.Process]:
    """Members of a process tree, ever seen, that are still alive (same pid *and* start time)."""
    out = []
    for pid, created in pids_seen.items():
        if proctree.is_same_process(pid, created):
            with contextlib.suppress(psutil.NoSuchProcess):
                out.append(psutil.Process(pid))
    return out


class Trees(Protocol):
    """The process table as the supervisor sees it. Every call returns at once: nothing here waits."""

    def members(self, pid: int, create_time: float | None) -> dict[int, float]:
        """pid -> create time of every live member of the tree of `pid` ({} if `pid` is no longer ours)."""
        ...

    def alive(self, pids_seen: dict[int, float]) -> list[int]:
        """Those of `pids_seen` still alive (a zombie is not)."""
        ...

    def signal(self, p: ProcState, sig: signal.Signals) -> None:
        """`sig` to the process group of `p.pid` and every live member of `p.pids_seen`."""
        ...

    def cpu(self, pid: int) -> tuple[str, float] | None:
        """(state letter, CPU seconds used) of a live process, None if it is gone."""
        ...


class OsTrees:
    """`Trees` over the real process table (psutil)."""

    def members(self, pid: int, create_time: float | None) -> dict[int, float]:
        if not proctree.is_same_process(pid, create_time):
            return {}  # ended, and its pid may be someone else's by now
        out = {}
        for proc in proctree.tree(pid):
            started = proctree.create_time(proc.pid)
            if started is not None:
                out[proc.pid] = started
        return out

    def alive(self, pids_seen: dict[int, float]) -> list[int]:
        return [proc.pid for proc in leftovers(pids_seen)]

    def signal(self, p: ProcState, sig: signal.Signals) -> None:
        proctree.signal_tree(p.pid, sig, extra=leftovers(p.pids_seen), create_time=p.create_time)

    def cpu(self, pid: int) -> tuple[str, float] | None:
        return proctree.cpu(pid)


class Supervisor:
    """Decisions over process states, one `step` at a time; it never sleeps or waits. Its I/O goes through
    what is injected: the clock, the `Backend` (start a process, poll its exit), `Trees` (a process tree's
    members, liveness, signals: the OS by default), plus reading the tail of a process's log file when it
    fails. The loop around it (`main`) does the rest: etcd, state.json, restart requests."""

    def __init__(self, specs: list[ProcessSpec], backend: Backend, log_for: Callable[[str], Path],
                 clock: Callable[[], float] = time.time, trees: Trees | None = None) -> None:
        self.specs = {s.name: s for s in specs}
        self.order = [s.name for s in specs]
        self.backend = backend
        self.log_for = log_for
        self.clock = clock
        self.trees: Trees = trees or OsTrees()
        self.procs = {s.name: ProcState(s.name) for s in specs}
        self.jobs: list[RestartJob] = []

    # --- decisions -------------------------------------------------------------------------
    def step(self, registered: dict[str, list[int]] | None) -> list[int]:
        """One pass over every process; waits for nothing. `registered`: process name -> lease ids of its
        live keys (already filtered to the current pid), or None when etcd could not be read (readiness
        and known leases stay as they were). Returns leases to revoke (of processes that ended)."""
        now = self.clock()
        revoke: list[int] = []
        for name in self.order:
            spec, p = self.specs[name], self.procs[name]
            if p.state == DRAINING:
                revoke += self._tick_stop(p, now)
            if p.state in (PENDING, BACKOFF):  # also right after a restart's drain: it starts at once
                self._maybe_start(spec, p, now)
            elif p.state in (STARTING, READY):
                revoke += self._watch(spec, p, now, registered)
        self._tick_job(now)
        return revoke

    def _watch(self, spec: ProcessSpec, p: ProcState, now: float, registered: dict[str, list[int]] | None
               ) -> list[int]:
        """A running process: its exit, its registration, its ready_timeout."""
        code = self.backend.poll(p.name) if p.pid is not None else None
        if code is not None:
            return self._on_exit(spec, p, code, now)
        if registered is None:
            return []  # etcd unknown: neither ready nor timed out on its account
        if p.name in registered:
            p.lease_ids = list(registered[p.name])
            if p.state == STARTING:
                p.state, p.ready_at, p.message = READY, now, ""
                p.stuck_starts, p.cpu_seen = 0, {}
            elif p.in_a_row and p.ready_at is not None and now - p.ready_at >= STABLE_AFTER:
                log.info("%s: ready for %.0f s: max_restarts counts from 0 again", p.name, STABLE_AFTER)
                p.in_a_row = 0
        elif p.state == READY:
            p.lease_ids = []
        elif p.started_at is not None and now - p.started_at > spec.ready_timeout:
            self._on_ready_timeout(spec, p, now)
        elif p.stuck_starts < STUCK_STARTS and (stuck := self._stuck_member(p, now)) is not None:
            self._start_again(p, now, stuck)
        return []

    def _stuck_member(self, p: ProcState, now: float) -> int | None:
        """A member of a starting process's tree that has been runnable without any CPU for STUCK_AFTER."""
        assert p.pid is not None
        members = self.trees.members(p.pid, p.create_time)
        for pid in list(p.cpu_seen):
            if pid not in members:
                del p.cpu_seen[pid]
        for pid in members:
            got = self.trees.cpu(pid)
            if got is None:
                continue
            state, used = got
            seen = p.cpu_seen.get(pid)
            if state != "R" or seen is None or used != seen[0]:
                p.cpu_seen[pid] = (used, now)
            elif now - seen[1] >= STUCK_AFTER:
                return pid
        return None

    def _start_again(self, p: ProcState, now: float, stuck: int) -> None:
        """Abandon a run stuck in the kernel (SIGKILL sent, but such a process may not die for minutes) and
        start a fresh one at once; the stuck pids are forgotten, and named in the log and the message."""
        self._remember(p)
        self.trees.signal(p, signal.SIGKILL)
        left = sorted(set(self.trees.alive(p.pids_seen)) | {stuck, p.pid or stuck})
        log.warning("%s: pid %d runnable with no CPU for %.0f s (stuck in the kernel): SIGKILL sent to pids %s, "
                    "starting it again", p.name, stuck, STUCK_AFTER, ", ".join(map(str, left)))
        for pid in left:
            p.pids_seen.pop(pid, None)
        p.stuck_starts += 1
        p.cpu_seen = {}
        p.state, p.next_start_at = PENDING, now
        p.message = f"started again: pid {stuck} was stuck in the kernel (runnable, no CPU for {STUCK_AFTER:.0f} s)"

    def _on_ready_timeout(self, spec: ProcessSpec, p: ProcState, now: float) -> None:
        p.log_tail = log_tail(self.log_for(p.name))
        missed = f"did not register in etcd within its ready_timeout of {spec.ready_timeout:.0f} s"
        if p.restarts and self._restart_later(spec, p, now):
            # It served before: a restart that hangs (seen once: a silent child for 300 s)
            # is a fault to recover from under the restart policy, not the end of the service.
            p.message = f"{missed}; {p.message}"
        else:  # the first start: the user is waiting on `up`, and a wrong setup would loop
            p.state = FAILED
            p.message = f"{missed}; see the log tail (raise ready_timeout if loading is just slow)"
        self._begin_stop(p, now, then=p.state, grace=self._kill_after(spec, p))

    def _restart_later(self, spec: ProcessSpec, p: ProcState, now: float) -> bool:
        """Back off and restart `p` if its policy allows another restart; False when it does not."""
        wants_restart = spec.restart_policy in ("always", "on-failure")
        if not wants_restart or p.in_a_row >= spec.max_restarts:
            return False
        delay = min(spec.backoff * (2 ** p.in_a_row), spec.backoff_max)
        p.restarts += 1
        p.in_a_row += 1
        p.state, p.next_start_at = BACKOFF, now + delay
        p.message = f"restart {p.in_a_row}/{spec.max_restarts} in {delay:.1f} s"
        return True

    def _maybe_start(self, spec: ProcessSpec, p: ProcState, now: float) -> None:
        deps = [self.procs[d] for d in spec.depends_on if d in self.procs]
        failed = [d.name for d in deps if d.state in (FAILED, STOPPED, EXITED)]
        if failed:  # also from BACKOFF: waiting for a dependency that will never be ready is a hang
            p.state, p.message = FAILED, f"not started: {', '.join(failed)} failed"
            return
        if any(d.state != READY for d in deps) or now < p.next_start_at:
            return
        left = self.trees.alive(p.pids_seen)
        stuck = ""
        if left:  # its last run's tree (an EngineCore) may still hold the device: kill again, start once gone
            p.leftovers_since = p.leftovers_since if p.leftovers_since is not None else now
            if now - p.leftovers_since < KILL_WAIT:
                self.trees.signal(p, signal.SIGKILL)
                why = f"{exitcodes.describe(p.exit_code)}; " if p.exit_code is not None else ""
                p.message = (f"{why}waiting for {len(left)} process(es) of its last run to exit "
                             f"(pids {', '.join(map(str, left))}, SIGKILL sent)")
                return
            # Seen here: a process stuck in the kernel (state R, no CPU) survives SIGKILL for minutes. The
            # service must not wait on it forever: start anyway, forget those pids, and say so.
            stuck = f"; pids {', '.join(map(str, left))} of its last run survived SIGKILL for {KILL_WAIT:.0f} s"
            log.warning("%s: %s (stuck in the kernel?): starting it anyway", p.name, stuck[2:])
            for pid in left:
                p.pids_seen.pop(pid, None)
        p.leftovers_since = None
        p.exit_code, p.lease_ids = None, []
        try:
            p.pid = self.backend.start(spec, self.log_for(spec.name))
        except Exception as exc:  # the backend could not start it at all (no tmux, name taken, bad argv)
            p.pid, p.state = None, FAILED
            p.message = f"could not start: {type(exc).__name__}: {exc}"
            return
        p.create_time = proctree.create_time(p.pid)
        p.pids_seen[p.pid] = p.create_time or 0.0
        if p.state == BACKOFF:
            p.message = f"restart {p.in_a_row}/{spec.max_restarts}"
        elif p.manual_restarts and not p.stuck_starts:
            p.message = "restarted by `launcher restart`"
        p.message += stuck
        p.state, p.started_at, p.ready_at = STARTING, now, None

    def _on_exit(self, spec: ProcessSpec, p: ProcState, code: int, now: float) -> list[int]:
        revoke, p.lease_ids = p.lease_ids, []
        p.exit_code = code
        p.log_tail = log_tail(self.log_for(spec.name))
        # A dead parent can leave its EngineCore behind holding the device: SIGKILL its process group
        # and every member seen, now; the restart (_maybe_start) waits until they are gone.
        self.trees.signal(p, signal.SIGKILL)
        why = exitcodes.describe(code)  # `status` says why: e.g. code 75, the engine core died
        p.last_exit = why
        wants_restart = spec.restart_policy == "always" or (spec.restart_policy == "on-failure" and code != 0)
        if wants_restart and self._restart_later(spec, p, now):
            p.message = f"{why}; {p.message}"
        elif wants_restart:
            p.state = FAILED
            p.message = f"{why}; gave up after {p.in_a_row} restart(s) in a row (max_restarts)"
        else:
            p.state = EXITED if code == 0 else FAILED
            p.message = why
        return revoke

    # --- stopping: a state the loop ticks through -----------------------------------------------
    @staticmethod
    def _kill_after(spec: ProcessSpec, p: ProcState, grace: float | None = None) -> float:
        """Seconds from SIGTERM to SIGKILL: `down --grace` when given; else the drain deadline of a process
        that registered (it may have requests in flight), and at most STOP_GRACE for one that never did."""
        if grace is not None:
            return grace
        return spec.kill_after if p.state == READY else min(STOP_GRACE, spec.kill_after)

    def _begin_stop(self, p: ProcState, now: float, then: str, grace: float) -> None:
        """SIGTERM now, SIGKILL at now + grace (a later tick); state `then` once the whole tree is gone."""
        self._remember(p)  # before the signal: children that re-parent away must still be waited for
        p.stop = Stop(term_at=now, kill_at=now + grace, then=then)
        p.state = DRAINING
        self.trees.signal(p, signal.SIGTERM)

    def _tick_stop(self, p: ProcState, now: float) -> list[int]:
        stop = p.stop
        if stop is None:
            return []
        code = self.backend.poll(p.name) if p.pid is not None else None
        if code is not None:
            p.exit_code = code
        main_gone = p.pid is None or code is not None
        left = self.trees.alive(p.pids_seen)
        if main_gone and not left:
            return self._end_stop(p, now)
        if stop.killed_at is None and (now >= stop.kill_at or main_gone):
            # Past its deadline; or its main process ended and left children (an EngineCore) behind.
            self.trees.signal(p, signal.SIGKILL)
            stop.killed_at = now
        elif stop.killed_at is not None and now - stop.killed_at >= KILL_WAIT:
            stuck = f"pids {', '.join(map(str, left))} survived SIGKILL for {KILL_WAIT:.0f} s (stuck in the kernel?)"
            return self._end_stop(p, now, stuck)
        return []

    def _end_stop(self, p: ProcState, now: float, note: str = "") -> list[int]:
        stop, p.stop = p.stop, None
        revoke, p.lease_ids = p.lease_ids, []
        if stop is None:
            return revoke
        p.state = stop.then
        if stop.then == PENDING:  # a restart asked by `launcher restart`: at once, no backoff
            p.next_start_at = now
        elif stop.then == STOPPED:
            how = exitcodes.describe(p.exit_code) if p.exit_code is not None else "gone"
            p.message = f"stopped: {how} {now - stop.term_at:.1f} s after SIGTERM"
        if note:
            p.message = f"{p.message}; {note}"
        return revoke

    def begin_stop_all(self, grace: float | None = None) -> None:
        """SIGTERM to every process at once; the loop then ticks (`step`) until `stopped()`.

        At once rather than in dependency order, because every process drains: a frontend stops taking
        requests and keeps relaying its streams, a router keeps relaying its own, and the workers behind
        them finish theirs, each within its own drain_timeout. So the stop takes the longest drain, not
        the sum of them; an order would only make the relays wait idle for streams that end anyway.
        `grace` (`launcher down --grace`): the kill deadline of every process instead of its own.
        """
        now = self.clock()
        self._end_job("the deployment is being stopped")
        for name in self.order:
            spec, p = self.specs[name], self.procs[name]
            if p.stop is not None:  # already draining (a restart, a ready timeout): it stops for good now
                p.stop.then = FAILED if p.stop.then == FAILED else STOPPED
                if grace is not None:
                    p.stop.kill_at = min(p.stop.kill_at, p.stop.term_at + grace)
            elif p.state in (STARTING, READY):
                self._begin_stop(p, now, STOPPED, self._kill_after(spec, p, grace))
            elif self.trees.alive(p.pids_seen):  # a crashed run's leftovers, SIGKILLed and not gone yet
                self._begin_stop(p, now, STOPPED if p.state in (PENDING, BACKOFF) else p.state, 0.0)
            elif p.state in (PENDING, BACKOFF):
                p.state, p.message = STOPPED, "stopped before it (re)started"

    def stopped(self) -> bool:
        """Every stop has ended: each tree is gone, or given up on after SIGKILL (and reported)."""
        return all(p.stop is None for p in self.procs.values())

    def stop_deadline(self) -> float:
        """When every stop under way must have ended (its SIGKILL, and KILL_WAIT after it)."""
        return max((p.stop.kill_at for p in self.procs.values() if p.stop is not None),
                   default=self.clock()) + KILL_WAIT

    # --- `launcher restart` ------------------------------------------------------------------
    def request_restart(self, job_id: str, processes: list[str], rolling: bool,
                        specs: list[ProcessSpec] | None = None) -> RestartJob:
        """Take a restart request: drain each process, start it again at once when gone, wait until it is
        READY. Rolling: one at a time. `specs`: a new plan (`restart --file`) for every process, the
        same names. The job comes back REJECTED (message: why) if it cannot be taken."""
        problem = self._restart_problem(processes, specs)
        job = RestartJob(id=job_id, processes=list(processes), rolling=rolling)
        self.jobs = [*self.jobs, job][-MAX_JOBS:]
        if problem:
            job.state, job.message = REJECTED, problem
            return job
        if specs is not None:
            self.specs, self.order = {s.name: s for s in specs}, [s.name for s in specs]
        job.phase = dict.fromkeys(processes, WAITING)
        for name in processes[:1] if rolling else processes:
            self._begin_restart(job, name, self.clock())
        return job

    def _restart_problem(self, processes: list[str], specs: list[ProcessSpec] | None) -> str | None:
        running = self._running_job()
        if running is not None:
            return f"restart {running.id} ({', '.join(running.processes)}) is still under way"
        if not processes:
            return "no process to restart"
        unknown = [n for n in processes if n not in self.procs]
        if unknown:
            return f"no process {', '.join(unknown)} in this deployment"
        if specs is not None and sorted(s.name for s in specs) != sorted(self.procs):
            return "the new plan has other processes than the running one: `launcher down` and `up` to apply it"
        return None

    def _running_job(self) -> RestartJob | None:
        return next((j for j in self.jobs if j.state == RUNNING), None)

    def _begin_restart(self, job: RestartJob, name: str, now: float) -> None:
        spec, p = self.specs[name], self.procs[name]
        job.phase[name] = RESTARTING
        p.manual_restarts += 1
        p.message = "restarting (asked by `launcher restart`)"
        if p.stop is not None:
            p.stop.then = PENDING
        elif p.state in (STARTING, READY):
            self._begin_stop(p, now, PENDING, self._kill_after(spec, p))
        else:  # nothing runs (failed, exited, backing off): start it, once its last tree is gone
            p.state, p.next_start_at = PENDING, now

    def _tick_job(self, now: float) -> None:
        job = self._running_job()
        if job is None:
            return
        for name, phase in job.phase.items():
            state = self.procs[name].state
            if phase == RESTARTING and state == READY:
                job.phase[name] = READY
            elif phase == RESTARTING and state in (FAILED, EXITED, STOPPED, BACKOFF):
                job.phase[name] = FAILED  # it ended before it registered again
        failed = [n for n, ph in job.phase.items() if ph == FAILED]
        waiting = [n for n, ph in job.phase.items() if ph == WAITING]
        if job.rolling and failed:
            for name in waiting:
                job.phase[name] = SKIPPED
            waiting = []
        if RESTARTING in job.phase.values():
            return
        if waiting:  # rolling: the previous one is READY again
            self._begin_restart(job, waiting[0], now)
            return
        job.state = FAILED if failed else DONE
        job.message = "; ".join(f"{n} did not come back: {self.procs[n].message}" for n in failed)
        skipped = [n for n, ph in job.phase.items() if ph == SKIPPED]
        if skipped:
            job.message += f"; rollout stopped, not restarted: {', '.join(skipped)}"

    def _end_job(self, reason: str) -> None:
        job = self._running_job()
        if job is not None:
            job.state, job.message = FAILED, reason
            for name, phase in job.phase.items():
                if phase == WAITING:
                    job.phase[name] = SKIPPED

    # --- process trees ---------------------------------------------------------------------
    def remember_trees(self) -> None:
        """Record every member of every tree: `down` must find children that re-parented away."""
        for p in self.procs.values():
            if p.state in (STARTING, READY, DRAINING):
                self._remember(p)

    def _remember(self, p: ProcState) -> None:
        if p.pid is not None:
            for pid, created in self.trees.members(p.pid, p.create_time).items():
                p.pids_seen.setdefault(pid, created)

    # --- views -----------------------------------------------------------------------------
    def settled(self) -> bool:
        return all(p.state in SETTLED for p in self.procs.values())

    def snapshot(self) -> dict[str, Any]:
        return {name: asdict(self.procs[name]) for name in self.order}

    def jobs_snapshot(self) -> list[dict[str, Any]]:
        return [asdict(j) for j in self.jobs]


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


def take_restart_request(run_dir: RunDir, sup: Supervisor) -> None:
    """The oldest `launcher restart` request waiting in the run dir, handed to the supervisor; its new
    plan (restart --file) becomes plan.json only if the supervisor took it."""
    try:
        found = restart.take_request(run_dir)
    except Exception:  # a request we cannot read must not end supervision; the CLI says it was not taken
        log.exception("could not read a restart request")
        return
    if found is None:
        return
    req, specs = found
    job = sup.request_restart(req.id, req.processes, req.rolling, specs)
    log.info("restart %s of %s%s: %s %s", req.id, ", ".join(req.processes), " (rolling)" if req.rolling else "",
             job.state, job.message)
    restart.settle_plan(run_dir, req, taken=job.state != REJECTED)


def stop_grace(run_dir: RunDir) -> float | None:
    """`launcher down --grace S` leaves S in stop.json before signalling us; None: each process's own deadline."""
    grace = (read_json(run_dir.path / "stop.json", {}) or {}).get("grace")
    return None if grace is None else float(grace)


async def run(run_dir: RunDir, stop: asyncio.Event | None = None) -> int:
    """The supervisor loop: until SIGTERM (or `stop`), then stop everything, ticking, and exit."""
    from workers.runtime.registry import Registry
    from workers.runtime.tls import TlsFiles

    plan = run_dir.plan()
    specs = [ProcessSpec.from_json(s) for s in plan["processes"]]
    backend = make_backend(plan.get("backend", "subprocess"), run_dir)
    sup = Supervisor(specs, backend, run_dir.log_path)
    namespace = plan["namespace"]
    tls = plan.get("tls")
    registry = await Registry.connect(plan["etcd"], tls=TlsFiles(**tls) if tls else None)
    stop = stop or asyncio.Event()
    wake = asyncio.Event()  # SIGUSR1: a `launcher restart` request waits in the run dir
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, wake.set)
    write_json(run_dir.supervisor_pid_file, {"pid": os.getpid(), "create_time": proctree.create_time(os.getpid())})
    # One thread, so steps never overlap each other or the stop; the loop itself only awaits.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervisor")

    def off_loop(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        return loop.run_in_executor(worker, functools.partial(fn, *args, **kwargs))

    def write_state(**extra: Any) -> None:
        write_json(run_dir.state_file, {"supervisor_pid": os.getpid(), "updated": time.time(),
                                        "processes": sup.snapshot(), "restart_jobs": sup.jobs_snapshot(), **extra})

    async def revoke(leases: list[int]) -> None:
        for lease in leases:
            with contextlib.suppress(Exception):
                await wait_for(registry.revoke(lease), ETCD_TIMEOUT)

    async def pause() -> None:
        """Until the next tick; a stop or a restart request (SIGUSR1) ends it early."""
        woken = asyncio.ensure_future(wake.wait())
        await asyncio.wait({stopped, woken}, timeout=TICK)
        woken.cancel()
        wake.clear()

    last_tree_scan = 0.0
    in_flight: asyncio.Future[Any] | None = None
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            try:
                regs: list[Any] | None = await wait_for(registry.list(namespace), ETCD_TIMEOUT)
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
            await off_loop(take_restart_request, run_dir, sup)
            if time.monotonic() - last_tree_scan > 2.0:
                await off_loop(sup.remember_trees)
                last_tree_scan = time.monotonic()
            await off_loop(write_state)
            await pause()
    finally:
        log.info("stopping every process")
        with contextlib.suppress(RuntimeError):  # a step thread may be mid-change: the next write is whole
            write_state(stopping=True)  # at once: `status` and `down` see the stop begin
        stopped.cancel()
        leases = []
        if in_flight is not None:
            with contextlib.suppress(Exception):
                leases += await in_flight
        await off_loop(sup.begin_stop_all, stop_grace(run_dir))
        await revoke(leases)
        await _tick_until_stopped(sup, off_loop, revoke, functools.partial(write_state, stopping=True))
        write_json(run_dir.state_file, {"supervisor_pid": None, "updated": time.time(),
                                        "processes": sup.snapshot(), "restart_jobs": sup.jobs_snapshot()})
        with contextlib.suppress(Exception):
            await off_loop(backend.close)
        worker.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await wait_for(registry.close(), ETCD_TIMEOUT)
        with contextlib.suppress(OSError):
            run_dir.supervisor_pid_file.unlink()
    return 0


async def _tick_until_stopped(sup: Supervisor, off_loop: Callable[..., asyncio.Future[Any]],
                              revoke: Callable[[list[int]], Any], write_state: Callable[[], None]) -> None:
    """Tick through every stop (SIGKILL at each deadline), revoking leases and writing state.json on each
    tick. A step that raises (a wedged tmux) is logged and tried again, until the last deadline."""
    deadline = sup.stop_deadline()
    while not sup.stopped():
        try:
            await revoke(await off_loop(sup.step, None))
        except Exception:
            log.exception("a step while stopping failed")
            if sup.clock() > deadline + TICK:
                break
        await off_loop(write_state)
        if not sup.stopped():
            await asyncio.sleep(TICK)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()  # supervisor.log: no credential from an exception or a URL
    sys.exit(asyncio.run(run(RunDir(Path(sys.argv[1])))))


if __name__ == "__main__":
    main()
