"""Supervisor.step with an injected clock, a fake backend and fake process trees: order, readiness,
backoff, give-up, draining and stopping, leftovers, `launcher restart`.

No process is started and nothing sleeps: the clock is a number the test moves, the backend
records what it was asked and reports the exit codes the test decides, and it also plays the
process table (`Trees`): it records every signal and decides who survives it. Fake pids are above
the kernel's pid_max (2**22), so no psutil call can ever touch a real process.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.plan import ProcessSpec
from launcher.supervisor import (
    BACKOFF,
    DONE,
    DRAINING,
    EXITED,
    FAILED,
    KILL_WAIT,
    PENDING,
    READY,
    REJECTED,
    RESTARTING,
    SKIPPED,
    STABLE_AFTER,
    STARTING,
    STOP_GRACE,
    STOPPED,
    STUCK_AFTER,
    WAITING,
    ProcState,
    Supervisor,
    registered_by_process,
)
from workers.runtime import exitcodes
from workers.runtime.registry import Registration

FAKE_PID_BASE = 10_000_000  # > pid_max on Linux (4194304): no real process has such a pid
FAKE_CHILD_BASE = 20_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeBackend:
    """Records every start; a process 'exits' when the test puts its code in `exit_codes`.

    As the process table: records each signal; SIGTERM ends a process (code 0, as a worker that
    drained) and its children unless it is in `ignore_term`; SIGKILL ends everything; but children
    in `unkillable` survive both (stuck in the kernel until the test frees them).
    """

    starts: list[tuple[str, float]] = field(default_factory=list)
    started_specs: list[ProcessSpec] = field(default_factory=list)
    exit_codes: dict[str, int] = field(default_factory=dict)
    fail_start: dict[str, Exception] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    clock: Clock | None = None
    closed: bool = False
    signals: list[tuple[str, str, float]] = field(default_factory=list)  # (process, SIGTERM | SIGKILL, time)
    ignore_term: set[str] = field(default_factory=set)
    children: dict[str, list[int]] = field(default_factory=dict)  # process -> child pids of its current run
    alive_children: set[int] = field(default_factory=set)
    unkillable: set[int] = field(default_factory=set)
    cpu_of: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (state, CPU s); else sleeping
    deaf: set[str] = field(default_factory=set)  # processes whose current run survives SIGKILL (stuck)

    def now(self) -> float:
        return self.clock() if self.clock else 0.0

    def start(self, spec: ProcessSpec, log: Path) -> int:
        if spec.name in self.fail_start:
            raise self.fail_start[spec.name]
        self.starts.append((spec.name, self.now()))
        self.started_specs.append(spec)
        self.exit_codes.pop(spec.name, None)
        self.children[spec.name] = []
        pid = FAKE_PID_BASE + len(self.starts)
        self.pids[spec.name] = pid
        return pid

    def poll(self, name: str) -> int | None:
        return self.exit_codes.get(name)

    def close(self) -> None:
        self.closed = True

    def spawn_child(self, name: str) -> int:
        """A child of `name`'s current run (an EngineCore): alive until a signal ends it."""
        pid = FAKE_CHILD_BASE + len(self.alive_children) + len(self.unkillable) + 1
        self.children[name].append(pid)
        self.alive_children.add(pid)
        return pid

    # --- Trees ---
    def members(self, pid: int, create_time: float | None) -> dict[int, float]:
        name = next((n for n, p in self.pids.items() if p == pid), None)
        if name is None or name in self.exit_codes:
            return {}
        return {pid: 0.0, **{c: 0.0 for c in self.children[name] if c in self.alive_children}}

    def alive(self, pids_seen: dict[int, float]) -> list[int]:
        return [pid for pid in pids_seen if pid in self.alive_children]

    def signal(self, p: ProcState, sig: signal.Signals) -> None:
        self.signals.append((p.name, sig.name, self.now()))
        tree = {pid for pid in p.pids_seen if pid in self.alive_children}
        if sig == signal.SIGTERM and p.name not in self.ignore_term:
            self.exit_codes.setdefault(p.name, 0)
            self.alive_children -= tree - self.unkillable
        elif sig == signal.SIGKILL:
            if p.name not in self.deaf:
                self.exit_codes.setdefault(p.name, -9)
            self.alive_children -= tree - self.unkillable

    def cpu(self, pid: int) -> tuple[str, float] | None:
        return self.cpu_of.get(pid, ("S", 0.0))


def spec(name: str, tier: int = 2, depends_on: list[str] | None = None, **kw: object) -> ProcessSpec:
    return ProcessSpec(name=name, kind="monolith", argv=["true"], env={}, devices="-", tier=tier,
                       depends_on=depends_on or [], **kw)  # type: ignore[arg-type]


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make(specs: list[ProcessSpec], clock: Clock, tmp_path: Path) -> tuple[Supervisor, FakeBackend]:
    backend = FakeBackend(clock=clock)
    return Supervisor(specs, backend, lambda n: tmp_path / f"{n}.log", clock=clock, trees=backend), backend


def ready(sup: Supervisor, names: list[str]) -> dict[str, list[int]]:
    """Start every process and see it register (one lease each, 0x1, 0x2, ... in order)."""
    registered = {n: [i + 1] for i, n in enumerate(names)}
    sup.step({})
    sup.step(registered)
    assert all(sup.procs[n].state == READY for n in names), states(sup)
    return registered


def states(sup: Supervisor) -> dict[str, str]:
    return {n: p.state for n, p in sup.procs.items()}


def test_dependents_start_only_after_their_dependencies_registered(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("router", tier=0), spec("v-1", depends_on=["router"]),
                         spec("v-2", depends_on=["router"])], clock, tmp_path)
    sup.step({})
    assert [n for n, _ in backend.starts] == ["router"]
    assert states(sup) == {"router": STARTING, "v-1": PENDING, "v-2": PENDING}
    clock.advance(5)
    sup.step({})  # the router runs but has not registered: still nobody else
    assert [n for n, _ in backend.starts] == ["router"]
    sup.step({"router": [0xA]})
    assert sup.procs["router"].state == READY and sup.procs["router"].lease_ids == [0xA]
    sup.step({"router": [0xA]})
    assert [n for n, _ in backend.starts] == ["router", "v-1", "v-2"]
    sup.step({"router": [0xA], "v-1": [0xB], "v-2": [0xC]})
    assert set(states(sup).values()) == {READY}
    assert sup.settled()


def test_crash_loop_backs_off_exponentially_then_fails_with_code_and_log_tail(clock: Clock, tmp_path: Path) -> None:
    (tmp_path / "w.log").write_text("loading\nValueError: no such model\n")
    sup, backend = make([spec("w", max_restarts=3, backoff=1.0, backoff_max=30.0)], clock, tmp_path)
    delays = []
    sup.step({})
    for _ in range(3):
        backend.exit_codes["w"] = 1
        sup.step({})
        p = sup.procs["w"]
        assert p.state == BACKOFF and p.exit_code == 1
        delays.append(p.next_start_at - clock.now)
        starts_before = len(backend.starts)
        clock.advance(delays[-1] - 0.01)
        sup.step({})
        assert len(backend.starts) == starts_before, "restarted before its backoff ran out"
        clock.advance(0.01)
        sup.step({})
        assert len(backend.starts) == starts_before + 1
    assert delays == [1.0, 2.0, 4.0]
    backend.exit_codes["w"] = 1
    sup.step({})
    p = sup.procs["w"]
    assert p.state == FAILED and p.restarts == 3 and p.exit_code == 1
    assert "gave up after 3 restart(s)" in p.message
    assert p.log_tail[-1] == "ValueError: no such model"
    clock.advance(3600)
    sup.step({})
    assert len(backend.starts) == 4, "a failed process is never started again"


def test_backoff_is_capped(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", max_restarts=10, backoff=1.0, backoff_max=5.0)], clock, tmp_path)
    sup.step({})
    delays = []
    for _ in range(5):
        backend.exit_codes["w"] = 137
        sup.step({})
        delays.append(sup.procs["w"].next_start_at - clock.now)
        clock.advance(delays[-1])
        sup.step({})
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_death_of_a_ready_process_revokes_its_leases_and_restarts_it(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", backoff=2.0)], clock, tmp_path)
    sup.step({})
    assert sup.step({"w": [0x1, 0x2]}) == []
    backend.exit_codes["w"] = -9
    revoke = sup.step({"w": [0x1, 0x2]})  # etcd still lists the keys: the TTL has not run out
    assert revoke == [0x1, 0x2]
    assert sup.procs["w"].state == BACKOFF and sup.procs["w"].lease_ids == []
    clock.advance(2.0)
    sup.step({})
    assert sup.procs["w"].state == STARTING and sup.procs["w"].message == "restart 1/3"
    sup.step({"w": [0x3]})
    assert sup.procs["w"].state == READY and sup.procs["w"].restarts == 1


def test_max_restarts_counts_a_crash_loop_not_the_deployments_lifetime(clock: Clock, tmp_path: Path) -> None:
    """Crashes spread over days never exhaust max_restarts: once a restarted process has stayed ready for
    STABLE_AFTER, the next crash is restart 1 again, with the first backoff; status still counts them all."""
    sup, backend = make([spec("w", max_restarts=2, backoff=1.0)], clock, tmp_path)
    sup.step({})
    sup.step({"w": [1]})
    for day in range(4):
        backend.exit_codes["w"] = -9
        sup.step({})
        p = sup.procs["w"]
        assert p.state == BACKOFF and p.message == "killed by SIGKILL; restart 1/2 in 1.0 s", (day, p.message)
        clock.advance(1.0)
        sup.step({})
        sup.step({"w": [2 + day]})
        assert p.state == READY
        clock.advance(STABLE_AFTER - 1)
        sup.step({"w": [2 + day]})
        assert p.in_a_row == 1, "not stable long enough yet"
        clock.advance(1)
        sup.step({"w": [2 + day]})
        assert p.in_a_row == 0
    assert p.restarts == 4 and len(backend.starts) == 5
    # A crash loop still ends: two quick crashes after a stable run use both restarts, the third gives up.
    for _ in range(2):
        backend.exit_codes["w"] = 1
        sup.step({})
        clock.advance(p.next_start_at - clock.now)
        sup.step({})
        sup.step({"w": [9]})
    backend.exit_codes["w"] = 1
    sup.step({})
    assert p.state == FAILED and "gave up after 2 restart(s) in a row" in p.message


@pytest.mark.parametrize(("policy", "code", "expected"), [
    ("never", 0, EXITED), ("never", 1, FAILED), ("on-failure", 0, EXITED),
    ("on-failure", 1, BACKOFF), ("always", 0, BACKOFF),
])
def test_restart_policy(clock: Clock, tmp_path: Path, policy: str, code: int, expected: str) -> None:
    sup, backend = make([spec("w", restart_policy=policy)], clock, tmp_path)
    sup.step({})
    sup.step({"w": [1]})
    backend.exit_codes["w"] = code
    sup.step({})
    assert sup.procs["w"].state == expected
    assert sup.procs["w"].exit_code == code


def test_max_restarts_zero_fails_at_the_first_crash(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", max_restarts=0)], clock, tmp_path)
    sup.step({})
    backend.exit_codes["w"] = 2
    sup.step({})
    assert sup.procs["w"].state == FAILED and len(backend.starts) == 1


def test_ready_timeout_fails_with_a_message_and_the_log_tail(clock: Clock, tmp_path: Path) -> None:
    (tmp_path / "w.log").write_text("Loading weights...\n")
    sup, _backend = make([spec("w", ready_timeout=30.0)], clock, tmp_path)
    sup.step({})
    clock.advance(30.0)
    sup.step({})
    assert sup.procs["w"].state == STARTING
    clock.advance(0.5)
    sup.step({})
    p = sup.procs["w"]
    assert p.state == DRAINING, "stopped first: SIGTERM now, failed once it is gone"
    assert "did not register in etcd within its ready_timeout of 30 s" in p.message
    assert p.log_tail == ["Loading weights..."]
    sup.step({})
    assert p.state == FAILED and "did not register in etcd" in p.message


def test_a_restart_that_hangs_is_restarted_again_under_its_policy(clock: Clock, tmp_path: Path) -> None:
    """A worker that served, died and came back silent (never registers) is stopped at its ready_timeout
    and started again while restarts remain: the service recovers instead of staying down."""
    sup, backend = make([spec("w", ready_timeout=30.0, max_restarts=3, backoff=1.0)], clock, tmp_path)
    sup.step({})
    sup.step({"w": [1]})
    assert sup.procs["w"].state == READY
    backend.exit_codes["w"] = -9  # killed
    sup.step({})
    assert sup.procs["w"].state == BACKOFF
    clock.advance(1.0)
    sup.step({})
    assert sup.procs["w"].state == STARTING and len(backend.starts) == 2
    clock.advance(31.0)  # the restarted process never registers
    sup.step({})
    p = sup.procs["w"]
    assert p.state == DRAINING
    sup.step({})
    assert p.state == BACKOFF, p.message
    assert "did not register in etcd within its ready_timeout of 30 s; restart 2/3" in p.message
    clock.advance(2.0)
    sup.step({})
    sup.step({"w": [2]})
    assert sup.procs["w"].state == READY and len(backend.starts) == 3


def test_dependents_of_a_failed_process_fail_instead_of_waiting(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("router", tier=0, max_restarts=0), spec("v", depends_on=["router"])],
                        clock, tmp_path)
    sup.step({})
    backend.exit_codes["router"] = 1
    sup.step({})
    assert states(sup) == {"router": FAILED, "v": FAILED}
    assert sup.procs["v"].message == "not started: router failed"
    assert sup.settled()


def test_a_restarting_dependent_whose_dependency_fails_settles(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("router", tier=0, max_restarts=0), spec("v", depends_on=["router"])],
                        clock, tmp_path)
    sup.step({})
    sup.step({"router": [1]})
    sup.step({"router": [1]})
    assert states(sup) == {"router": READY, "v": STARTING}
    backend.exit_codes["v"] = 1
    sup.step({"router": [1]})
    assert sup.procs["v"].state == BACKOFF
    backend.exit_codes["router"] = 1
    sup.step({})
    assert states(sup) == {"router": FAILED, "v": FAILED}


def test_a_backend_that_cannot_start_marks_the_process_failed(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("v-1"), spec("v-2")], clock, tmp_path)
    backend.fail_start["v-1"] = RuntimeError("a live tmux session named 'v-1' already exists")
    sup.step({})
    assert sup.procs["v-1"].state == FAILED
    assert "a live tmux session named 'v-1' already exists" in sup.procs["v-1"].message
    assert sup.procs["v-2"].state == STARTING


def test_stop_all_terms_every_process_at_once_and_returns_every_lease(clock: Clock, tmp_path: Path) -> None:
    """No dependency order: every live process gets SIGTERM in the same tick and drains in parallel."""
    sup, backend = make([spec("router", tier=0), spec("v", depends_on=["router"], backoff=5.0),
                         spec("x", depends_on=["router"])], clock, tmp_path)
    sup.step({})
    sup.step({"router": [0xA]})
    sup.step({"router": [0xA]})
    sup.step({"router": [0xA], "x": [0xC]})
    backend.exit_codes["v"] = 1
    sup.step({"router": [0xA], "x": [0xC]})
    assert states(sup) == {"router": READY, "v": BACKOFF, "x": READY}
    backend.ignore_term.add("x")
    backend.signals.clear()  # v's crash: SIGKILL to what it may have left
    t0 = clock.now
    sup.begin_stop_all()
    assert backend.signals == [("router", "SIGTERM", t0), ("x", "SIGTERM", t0)]
    assert states(sup) == {"router": DRAINING, "v": STOPPED, "x": DRAINING}
    assert sup.step(None) == [0xA], "the router ended: its lease goes"
    assert states(sup) == {"router": STOPPED, "v": STOPPED, "x": DRAINING} and not sup.stopped()
    assert sup.procs["router"].message == "stopped: exited with code 0 0.0 s after SIGTERM"
    clock.advance(60)
    assert sup.step(None) == []  # x's SIGKILL (its deadline passed) is sent on this tick ...
    assert sup.step(None) == [0xC]  # ... and it is found gone on the next
    assert sup.stopped() and states(sup) == {"router": STOPPED, "v": STOPPED, "x": STOPPED}
    assert len(backend.starts) == 3, "nothing starts after the stop began"


def test_stop_is_sigterm_then_sigkill_at_the_drain_deadline_without_waiting(clock: Clock, tmp_path: Path) -> None:
    """TERM at t, nothing waits, KILL at t + drain_timeout + margin, state draining until then."""
    sup, backend = make([spec("w", drain_timeout=5.0)], clock, tmp_path)
    ready(sup, ["w"])
    backend.ignore_term.add("w")
    t0 = clock.now
    sup.begin_stop_all()
    assert backend.signals == [("w", "SIGTERM", t0)]
    kill_at = t0 + 5.0 + 10.0  # drain_timeout + DRAIN_MARGIN
    while clock.now < kill_at - 0.25:
        clock.advance(0.25)
        sup.step(None)
        assert sup.procs["w"].state == DRAINING and len(backend.signals) == 1
    clock.advance(0.25)
    sup.step(None)
    assert backend.signals[-1] == ("w", "SIGKILL", kill_at)
    clock.advance(0.25)
    sup.step(None)
    p = sup.procs["w"]
    assert p.state == STOPPED and p.exit_code == -9 and sup.stopped()
    assert p.message == "stopped: killed by SIGKILL 15.2 s after SIGTERM"


def test_down_grace_is_every_process_kill_deadline(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("a", drain_timeout=60.0), spec("b", drain_timeout=1.0)], clock, tmp_path)
    ready(sup, ["a", "b"])
    backend.ignore_term |= {"a", "b"}
    sup.begin_stop_all(grace=2.0)
    clock.advance(2.0)
    sup.step(None)
    assert [(n, sig) for n, sig, _ in backend.signals[2:]] == [("a", "SIGKILL"), ("b", "SIGKILL")]


def test_a_process_that_never_registered_gets_the_short_grace(clock: Clock, tmp_path: Path) -> None:
    """Nothing to drain: STOP_GRACE, not its drain deadline."""
    sup, backend = make([spec("w", drain_timeout=300.0)], clock, tmp_path)
    sup.step({})
    backend.ignore_term.add("w")
    sup.begin_stop_all()
    clock.advance(STOP_GRACE)
    sup.step(None)
    assert backend.signals[-1][1] == "SIGKILL"


def test_every_process_is_polled_on_every_tick_while_one_is_stopping(clock: Clock, tmp_path: Path) -> None:
    """A ready timeout stops `slow` (it ignores SIGTERM); meanwhile `fast` crashes, is seen at once and
    restarted, while `slow` is still draining; `slow` is killed at its deadline and ends failed."""
    sup, backend = make([spec("slow", ready_timeout=30.0), spec("fast", backoff=1.0)], clock, tmp_path)
    backend.ignore_term.add("slow")
    sup.step({})
    sup.step({"fast": [0xF]})
    clock.advance(30.5)
    sup.step({"fast": [0xF]})
    t0 = clock.now
    assert states(sup) == {"slow": DRAINING, "fast": READY}
    assert backend.signals == [("slow", "SIGTERM", t0)]
    backend.exit_codes["fast"] = exitcodes.ENGINE_DEAD
    clock.advance(0.25)
    assert sup.step({}) == [0xF]
    assert states(sup) == {"slow": DRAINING, "fast": BACKOFF}
    assert sup.procs["fast"].message == "exited with code 75 (its vLLM engine core died); restart 1/3 in 1.0 s"
    clock.advance(1.0)
    sup.step({})
    assert states(sup) == {"slow": DRAINING, "fast": STARTING}
    clock.advance(STOP_GRACE - 1.25)
    sup.step({})
    assert backend.signals[-1] == ("slow", "SIGKILL", t0 + STOP_GRACE)
    sup.step({})
    assert states(sup) == {"slow": FAILED, "fast": STARTING}
    assert "did not register in etcd within its ready_timeout of 30 s" in sup.procs["slow"].message


def test_leftovers_of_a_crash_get_sigkill_and_the_restart_waits_until_they_are_gone(clock: Clock, tmp_path: Path
                                                                                  ) -> None:
    """The EngineCore outlives its parent: SIGKILL at once, no waiting in the step, restart only once gone."""
    sup, backend = make([spec("w", backoff=1.0), spec("other")], clock, tmp_path)
    ready(sup, ["w", "other"])
    core = backend.spawn_child("w")
    sup.remember_trees()
    assert core in sup.procs["w"].pids_seen
    backend.unkillable.add(core)  # stuck for a while (a GPU context being torn down)
    backend.exit_codes["w"] = exitcodes.ENGINE_DEAD
    sup.step({"other": [2]})
    assert backend.signals == [("w", "SIGKILL", clock.now)]
    assert sup.procs["w"].state == BACKOFF
    for _ in range(8):  # well past the backoff: the core still lives, so no restart, and nothing blocks
        clock.advance(0.5)
        sup.step({"other": [2]})
        assert sup.procs["w"].state == BACKOFF and len(backend.starts) == 2
    assert sup.procs["w"].message == (f"exited with code 75 (its vLLM engine core died); waiting for 1 process(es) "
                                      f"of its last run to exit (pids {core}, SIGKILL sent)")
    backend.exit_codes["other"] = 1
    sup.step({})
    assert sup.procs["other"].state == BACKOFF, "the other process is still watched"
    backend.unkillable.clear()
    backend.alive_children.discard(core)
    sup.step({})
    assert sup.procs["w"].state == STARTING and sup.procs["w"].message == "restart 1/3"


def test_a_leftover_that_survives_sigkill_does_not_block_the_restart_for_good(clock: Clock, tmp_path: Path) -> None:
    """Seen here: a process stuck in the kernel outlived SIGKILL for minutes, and the restart waited on it, so the
    worker never came back. After KILL_WAIT the restart goes ahead, and the message names the survivor."""
    sup, backend = make([spec("w", backoff=1.0)], clock, tmp_path)
    ready(sup, ["w"])
    core = backend.spawn_child("w")
    sup.remember_trees()
    backend.unkillable.add(core)
    backend.exit_codes["w"] = -9
    sup.step({})
    clock.advance(1.0)
    sup.step({})
    assert sup.procs["w"].state == BACKOFF and len(backend.starts) == 1  # waiting, SIGKILL sent again
    clock.advance(KILL_WAIT + 0.5)
    sup.step({})
    w = sup.procs["w"]
    assert w.state == STARTING and len(backend.starts) == 2
    assert f"pids {core} of its last run survived SIGKILL" in w.message and core not in w.pids_seen


def test_a_tree_that_survives_sigkill_is_given_up_on_and_reported(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w")], clock, tmp_path)
    ready(sup, ["w"])
    core = backend.spawn_child("w")
    backend.unkillable.add(core)
    sup.begin_stop_all(grace=0.0)
    sup.step(None)  # the main process drained and exited; its core got SIGKILL
    assert backend.signals[-1][1] == "SIGKILL" and not sup.stopped()
    clock.advance(KILL_WAIT)
    sup.step(None)
    assert sup.stopped() and sup.procs["w"].state == STOPPED
    assert f"pids {core} survived SIGKILL for 10 s" in sup.procs["w"].message


def test_a_start_stuck_in_the_kernel_is_made_again_without_waiting_for_its_ready_timeout(clock: Clock,
                                                                                          tmp_path: Path) -> None:
    """Its EngineCore is runnable but gets no CPU for STUCK_AFTER (SIGKILL does not end it either): the run
    is abandoned and a fresh one started at once, without using a restart of max_restarts, and without
    failing a `launcher restart` under way; a process slow but moving is left alone."""
    sup, backend = make([spec("w", ready_timeout=600.0, max_restarts=0)], clock, tmp_path)
    ready(sup, ["w"])
    job = sup.request_restart("j1", ["w"], rolling=True)
    sup.step({})
    first = sup.procs["w"].pid
    assert sup.procs["w"].state == STARTING and first is not None
    core = backend.spawn_child("w")
    backend.cpu_of[first] = ("S", 1.0)  # the worker waits on its core: not stuck
    for t in range(0, 60, 5):  # a slow core: runnable, but it gets CPU
        backend.cpu_of[core] = ("R", 0.1 * t)
        sup.step({})
        clock.advance(5)
    assert sup.procs["w"].state == STARTING and sup.procs["w"].pid == first
    backend.deaf.add("w")
    backend.unkillable.add(core)
    backend.cpu_of[core] = ("R", 100.0)
    sup.step({})  # the core's CPU stops moving from now on
    clock.advance(STUCK_AFTER - 1)
    sup.step({})
    assert sup.procs["w"].state == STARTING, "not for STUCK_AFTER yet"
    clock.advance(1)
    sup.step({})
    p = sup.procs["w"]
    assert backend.signals[-1][1] == "SIGKILL"
    assert p.state == PENDING and p.message.startswith(f"started again: pid {core} was stuck in the kernel")
    backend.deaf.clear()
    sup.step({})
    assert p.state == STARTING and p.pid != first and len(backend.starts) == 3
    assert core not in p.pids_seen and first not in p.pids_seen, "the stuck run is forgotten, not waited for"
    assert (p.in_a_row, job.state) == (0, "running")
    sup.step({"w": [9]})
    assert p.state == READY and job.state == DONE and p.stuck_starts == 0


def test_a_restart_drains_starts_at_once_and_waits_for_ready(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", backoff=5.0, max_restarts=0)], clock, tmp_path)
    ready(sup, ["w"])
    old_pid = sup.procs["w"].pid
    job = sup.request_restart("j1", ["w"], rolling=False)
    assert job.state == "running" and job.phase == {"w": RESTARTING}
    assert sup.procs["w"].state == DRAINING and backend.signals == [("w", "SIGTERM", clock.now)]
    clock.advance(0.25)
    assert sup.step({}) == [1], "its lease goes once it is gone"
    p = sup.procs["w"]
    assert p.state == STARTING and p.pid != old_pid
    assert backend.starts[-1] == ("w", clock.now), "started at once: no backoff"
    assert (p.restarts, p.manual_restarts) == (0, 1), "max_restarts is not consumed"
    assert p.message == "restarted by `launcher restart`"
    sup.step({})
    assert job.state == "running"
    sup.step({"w": [7]})
    assert p.state == READY and job.state == DONE and job.phase == {"w": READY}


def test_a_rolling_restart_touches_the_next_only_once_the_last_is_ready(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("v-1"), spec("v-2"), spec("v-3")], clock, tmp_path)
    registered = ready(sup, ["v-1", "v-2", "v-3"])
    job = sup.request_restart("j2", ["v-1", "v-2", "v-3"], rolling=True)
    assert job.phase == {"v-1": RESTARTING, "v-2": WAITING, "v-3": WAITING}
    for name in ("v-1", "v-2", "v-3"):
        sup.step({n: ls for n, ls in registered.items() if n != name})  # drained and started again
        assert sup.procs[name].state == STARTING
        for _ in range(3):  # not registered yet: the others are not touched
            clock.advance(1.0)
            sup.step({n: ls for n, ls in registered.items() if n != name})
            assert {n for n, _, _ in backend.signals} == {n for n, ph in job.phase.items() if ph != WAITING}
            assert job.phase[name] == RESTARTING
        sup.step(registered)  # registered again (new pid): READY, and the next one begins in the same tick
        assert sup.procs[name].state == READY and job.phase[name] == READY
    assert job.state == DONE and [n for n, _, _ in backend.signals] == ["v-1", "v-2", "v-3"]
    assert [sup.procs[n].manual_restarts for n in ("v-1", "v-2", "v-3")] == [1, 1, 1]


def test_a_rolling_restart_stops_at_the_first_process_that_does_not_come_back(clock: Clock, tmp_path: Path
                                                                              ) -> None:
    sup, backend = make([spec("v-1"), spec("v-2")], clock, tmp_path)
    registered = ready(sup, ["v-1", "v-2"])
    job = sup.request_restart("j3", ["v-1", "v-2"], rolling=True)
    sup.step({"v-2": [2]})
    assert sup.procs["v-1"].state == STARTING
    backend.exit_codes["v-1"] = 1  # the new one crashes while loading
    sup.step({"v-2": [2]})
    assert job.state == FAILED and job.phase == {"v-1": FAILED, "v-2": SKIPPED}
    assert job.message == ("v-1 did not come back: exited with code 1; restart 1/3 in 1.0 s; "
                           "rollout stopped, not restarted: v-2")
    assert all(n == "v-1" for n, _, _ in backend.signals), "v-2 was never touched"
    assert sup.procs["v-2"].state == READY
    clock.advance(1.0)
    sup.step(registered)  # v-1 still follows its restart policy
    assert sup.procs["v-1"].state == STARTING


def test_a_restart_without_rolling_drains_all_at_once_and_waits_for_each(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("v-1"), spec("v-2")], clock, tmp_path)
    ready(sup, ["v-1", "v-2"])
    job = sup.request_restart("j4", ["v-1", "v-2"], rolling=False)
    assert [(n, sig) for n, sig, _ in backend.signals] == [("v-1", "SIGTERM"), ("v-2", "SIGTERM")]
    sup.step({})
    sup.step({"v-2": [9]})
    assert job.phase == {"v-1": RESTARTING, "v-2": READY} and job.state == "running"
    backend.exit_codes["v-1"] = exitcodes.ENGINE_DEAD
    sup.step({"v-2": [9]})
    assert job.state == FAILED and job.phase == {"v-1": FAILED, "v-2": READY}
    assert job.message.startswith("v-1 did not come back: exited with code 75 (its vLLM engine core died)")


def test_a_restart_request_is_rejected_while_another_runs_or_for_unknown_processes(clock: Clock, tmp_path: Path
                                                                                   ) -> None:
    sup, _backend = make([spec("v-1"), spec("v-2")], clock, tmp_path)
    ready(sup, ["v-1", "v-2"])
    assert sup.request_restart("bad", ["nope"], rolling=False).state == REJECTED
    renamed = [spec("v-1"), spec("v-9")]
    assert "other processes" in sup.request_restart("j4", ["v-1"], rolling=False, specs=renamed).message
    first = sup.request_restart("j5", ["v-1"], rolling=False)
    second = sup.request_restart("j6", ["v-2"], rolling=False)
    assert (first.state, second.state) == ("running", REJECTED)
    assert second.message == "restart j5 (v-1) is still under way"
    assert sup.procs["v-2"].state == READY


def test_a_restart_with_a_new_plan_starts_the_new_spec(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w")], clock, tmp_path)
    ready(sup, ["w"])
    new = spec("w", drain_timeout=5.0)
    new.argv = ["true", "--new-flag"]
    sup.request_restart("j8", ["w"], rolling=False, specs=[new])
    sup.step({})
    assert backend.started_specs[-1].argv == ["true", "--new-flag"]


def test_a_failed_process_can_be_restarted(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", max_restarts=0)], clock, tmp_path)
    sup.step({})
    backend.exit_codes["w"] = 1
    sup.step({})
    assert sup.procs["w"].state == FAILED
    job = sup.request_restart("j9", ["w"], rolling=False)
    sup.step({})
    sup.step({"w": [3]})
    assert job.state == DONE and sup.procs["w"].state == READY
    assert [sig for _, sig, _ in backend.signals] == ["SIGKILL"], "its group, at the crash; nothing to drain"


def test_a_stop_during_a_restart_ends_the_job_and_stops_for_good(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("v-1"), spec("v-2")], clock, tmp_path)
    ready(sup, ["v-1", "v-2"])
    backend.ignore_term.add("v-1")
    job = sup.request_restart("j10", ["v-1", "v-2"], rolling=True)
    sup.begin_stop_all(grace=1.0)
    assert job.state == FAILED and job.message == "the deployment is being stopped"
    assert job.phase == {"v-1": RESTARTING, "v-2": SKIPPED}
    clock.advance(1.0)
    sup.step(None)
    sup.step(None)
    assert sup.stopped() and states(sup) == {"v-1": STOPPED, "v-2": STOPPED}
    assert len(backend.starts) == 2, "the draining one is not started again"


def test_only_the_current_pid_registration_counts_as_ready(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", backoff=1.0)], clock, tmp_path)
    sup.step({})
    old_pid = sup.procs["w"].pid
    backend.exit_codes["w"] = 1
    sup.step({})
    clock.advance(1.0)
    sup.step({})
    new_pid = sup.procs["w"].pid
    assert new_pid != old_pid

    def reg(pid: int | None, lease: int) -> Registration:
        return Registration(namespace="ns", component="vllm", endpoint="generate", subject="s", lease_id=lease,
                            pid=pid or 0, process="w")

    stale = registered_by_process([reg(old_pid, 0x1)], sup.procs)
    assert stale == {}
    sup.step(stale)
    assert sup.procs["w"].state == STARTING
    fresh = registered_by_process([reg(old_pid, 0x1), reg(new_pid, 0x2)], sup.procs)
    assert fresh == {"w": [0x2]}
    sup.step(fresh)
    assert sup.procs["w"].state == READY


def test_unreadable_etcd_changes_neither_readiness_nor_known_leases(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("w", ready_timeout=10), spec("x", ready_timeout=10)], clock, tmp_path)
    sup.step({})
    sup.step({"w": [0x1]})
    assert states(sup) == {"w": READY, "x": STARTING}
    clock.advance(30)  # etcd is down past x's ready_timeout: x is not failed on etcd's account
    sup.step(None)
    assert states(sup) == {"w": READY, "x": STARTING} and sup.procs["w"].lease_ids == [0x1]
    backend.exit_codes["w"] = -9
    assert sup.step(None) == [0x1], "the dead worker's lease is still known, to revoke"
