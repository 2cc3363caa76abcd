"""Supervisor.step with an injected clock and a fake backend: order, readiness, backoff, give-up.

No process is started and nothing sleeps: the clock is a number the test moves, the backend
records what it was asked and reports the exit codes the test decides. Fake pids are above the
kernel's pid_max (2**22), so the supervisor's psutil calls can never touch a real process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.plan import ProcessSpec
from launcher.supervisor import (
    BACKOFF,
    EXITED,
    FAILED,
    PENDING,
    READY,
    STARTING,
    STOPPED,
    ProcState,
    Supervisor,
    registered_by_process,
)
from workers.runtime.registry import Registration

FAKE_PID_BASE = 10_000_000  # > pid_max on Linux (4194304): no real process has such a pid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeBackend:
    """Records every start; a process 'exits' when the test puts its code in `exit_codes`."""

    starts: list[tuple[str, float]] = field(default_factory=list)
    exit_codes: dict[str, int] = field(default_factory=dict)
    fail_start: dict[str, Exception] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    clock: Clock | None = None
    closed: bool = False

    def start(self, spec: ProcessSpec, log: Path) -> int:
        if spec.name in self.fail_start:
            raise self.fail_start[spec.name]
        self.starts.append((spec.name, self.clock() if self.clock else 0.0))
        self.exit_codes.pop(spec.name, None)
        pid = FAKE_PID_BASE + len(self.starts)
        self.pids[spec.name] = pid
        return pid

    def poll(self, name: str) -> int | None:
        return self.exit_codes.get(name)

    def close(self) -> None:
        self.closed = True


def spec(name: str, tier: int = 2, depends_on: list[str] | None = None, **kw: object) -> ProcessSpec:
    return ProcessSpec(name=name, kind="monolith", argv=["true"], env={}, devices="-", tier=tier,
                       depends_on=depends_on or [], **kw)  # type: ignore[arg-type]


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def make(specs: list[ProcessSpec], clock: Clock, tmp_path: Path) -> tuple[Supervisor, FakeBackend]:
    backend = FakeBackend(clock=clock)
    return Supervisor(specs, backend, lambda n: tmp_path / f"{n}.log", clock=clock), backend


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
    assert p.state == FAILED
    assert "did not register in etcd within its ready_timeout of 30 s" in p.message
    assert p.log_tail == ["Loading weights..."]


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


def test_stop_all_stops_in_reverse_order_and_returns_every_lease(clock: Clock, tmp_path: Path) -> None:
    sup, backend = make([spec("router", tier=0), spec("v", depends_on=["router"], backoff=5.0)], clock, tmp_path)
    sup.step({})
    sup.step({"router": [0xA]})
    sup.step({"router": [0xA]})
    backend.exit_codes["v"] = 1
    sup.step({"router": [0xA]})
    assert states(sup) == {"router": READY, "v": BACKOFF}
    stopped: list[str] = []
    real_stop_one = sup._stop_one

    def recording_stop_one(p: ProcState, grace: float = 0.0) -> None:
        stopped.append(p.name)
        real_stop_one(p, grace)

    sup._stop_one = recording_stop_one  # type: ignore[method-assign]
    assert sup.stop_all(grace=0.0) == [0xA]
    assert stopped == ["v", "router"]
    assert states(sup) == {"router": STOPPED, "v": STOPPED}
    clock.advance(60)
    sup.step({})
    assert len(backend.starts) == 2, "nothing starts after stop_all"


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
