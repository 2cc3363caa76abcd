"""`launcher restart`: which processes it names, the request it leaves for the supervisor, and the
real thing end to end (CLI, a live supervisor, fake workers that register in the test etcd).

The workers are tests/test_supervisor_e2e.py's fakes (no vLLM): they register like a real worker,
start a child that leaves their process group (an EngineCore's worst case), and on SIGTERM close
their registration and exit, leaving that child for the supervisor to kill.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from launcher import restart, supervisor
from launcher.plan import ProcessSpec
from launcher.state import RunDir, write_json
from tests.helpers import ROOT, Services, launcher, write_topology
from tests.test_supervisor_e2e import FAKE_WORKER, alive, every_pid, registrations
from tests.test_supervisor_unit import Clock, FakeBackend, spec


def specs() -> list[ProcessSpec]:
    out = [spec("web", tier=0), spec("router", tier=0), spec("v-1"), spec("v-2"), spec("solo")]
    out[0].kind, out[1].kind = "frontend", "router"
    out[2].replica_of = out[3].replica_of = "v"
    return out


def test_resolve_names_processes_workers_or_every_engine_worker() -> None:
    assert restart.resolve(specs(), []) == ["v-1", "v-2", "solo"], "no argument: engine workers only"
    assert restart.resolve(specs(), ["v"]) == ["v-1", "v-2"], "a worker's name: all its replicas"
    assert restart.resolve(specs(), ["solo", "v-2", "router"]) == ["router", "v-2", "solo"], "plan order"
    with pytest.raises(ValueError, match="no process or worker 'x' in this deployment"):
        restart.resolve(specs(), ["x"])


def test_changed_lists_the_processes_whose_spec_differs() -> None:
    new = specs()
    new[3].argv = ["true", "--other"]
    new[4].drain_timeout = 1.0
    assert restart.changed(specs(), new) == ["v-2", "solo"]


def test_a_taken_request_moves_its_plan_over_plan_json_and_a_refused_one_drops_it(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "dep")
    rd.create()
    write_json(rd.plan_file, {"processes": [s.to_json() for s in specs()]})
    new_plan = {"processes": [s.to_json() for s in specs()[:2]]}
    first = restart.RestartRequest(id="a1", processes=["v-1"], rolling=True, new_plan=True)
    second = restart.RestartRequest(id="b2", processes=["solo"], rolling=False)
    restart.write_request(rd, first, new_plan)
    os.utime(restart.requests_dir(rd) / "a1.json", (1, 1))  # older
    restart.write_request(rd, second)
    assert {p.name for p in restart.requests_dir(rd).iterdir()} == {"a1.json", "a1.plan.json", "b2.json"}
    assert oct(restart.requests_dir(rd).stat().st_mode & 0o777) == "0o700"

    taken = restart.take_request(rd)
    assert taken is not None
    req, new_specs = taken
    assert req == first and [s.name for s in new_specs or []] == ["web", "router"]
    restart.settle_plan(rd, req, taken=False)
    assert len(rd.plan()["processes"]) == 5, "refused: the running plan stays"
    assert not (restart.requests_dir(rd) / "a1.plan.json").exists()

    again = restart.RestartRequest(id="c3", processes=["v-1"], rolling=False, new_plan=True)
    restart.write_request(rd, again, new_plan)
    assert restart.take_request(rd) == (second, None)
    req, _ = restart.take_request(rd) or (None, None)
    assert req == again
    restart.settle_plan(rd, again, taken=True)
    assert len(rd.plan()["processes"]) == 2
    assert restart.take_request(rd) is None and list(restart.requests_dir(rd).iterdir()) == []

    late = restart.RestartRequest(id="d4", processes=["v-1"], rolling=False, new_plan=True)
    restart.write_request(rd, late, new_plan)
    assert restart.withdraw(rd, late), "not taken yet: withdrawn, its plan too"
    assert list(restart.requests_dir(rd).iterdir()) == [] and not restart.withdraw(rd, late)


def test_the_supervisor_answers_every_request_in_its_jobs(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "dep")
    rd.create()
    clock = Clock()
    backend = FakeBackend(clock=clock)
    sup = supervisor.Supervisor([spec("v-1"), spec("v-2")], backend, rd.log_path, clock=clock, trees=backend)
    sup.step({})
    sup.step({"v-1": [1], "v-2": [2]})
    restart.write_request(rd, restart.RestartRequest(id="r1", processes=["v-1"], rolling=False))
    supervisor.take_restart_request(rd, sup)
    restart.write_request(rd, restart.RestartRequest(id="r2", processes=["v-2"], rolling=False))
    supervisor.take_restart_request(rd, sup)
    jobs = {j["id"]: j for j in sup.jobs_snapshot()}
    assert jobs["r1"]["state"] == "running" and jobs["r1"]["phase"] == {"v-1": "restarting"}
    assert (jobs["r2"]["state"], jobs["r2"]["message"]) == ("rejected", "restart r1 (v-1) is still under way")
    (rd.path / "requests" / "x.json").write_text("{not json")
    supervisor.take_restart_request(rd, sup)  # logged and dropped; supervision goes on
    assert len(sup.jobs) == 2


def _ids(services: Services, namespace: str) -> dict[str, int]:
    return {r.process: r.pid for r in registrations(services, namespace)}


def test_restart_cli_end_to_end(tmp_path: Path, services: Services) -> None:
    """Rolling restart (new pids, one at a time, max_restarts untouched), a restart with a changed file
    (only what changed, plan.json replaced), the refusals, and a rollout that stops at a worker that
    does not come back."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_WORKER)
    env = {**services.env, "LAUNCHER_HOME": str(tmp_path / "home")}
    topo: dict[str, Any] = {
        "name": "rs1", "backend": "subprocess", "model": "fake-model",
        "env": {"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "FAKE_WORKER": "register"},
        "workers": [{"name": "v", "replicas": 2, "ready_timeout": 60, "drain_timeout": 5}],
    }
    path = write_topology(tmp_path / "rs1.yaml", topo)
    rd = RunDir(Path(env["LAUNCHER_HOME"]) / "rs1")
    launcher(["up", str(path)], env, timeout=120)
    try:
        before = _ids(services, "rs1")
        out = launcher(["restart", "rs1", "--rolling"], env, timeout=120).stdout
        after = _ids(services, "rs1")
        assert set(after) == {"v-1", "v-2"} and all(after[n] != before[n] for n in after), out
        assert out.index("v-1: ready") < out.index("v-2: draining"), "v-2 only once v-1 is ready again"
        assert "restarted v-1, v-2" in out and "v-2: ready" not in out.split("v-2: draining")[0], out
        status = json.loads(launcher(["status", "rs1", "--json"], env).stdout)
        assert {p["name"]: (p["restarts"], p["manual_restarts"]) for p in status["processes"]} == {
            "v-1": (0, 1), "v-2": (0, 1)}
        assert alive({pid: t for pid, t in every_pid(env, "rs1").items() if pid in before.values()}) == []

        unknown = launcher(["restart", "rs1", "nope"], env, check=False)
        assert unknown.returncode == 2 and "no process or worker 'nope'" in unknown.stderr
        topo["workers"][0]["replicas"] = 3
        more = launcher(["restart", "rs1", "--file", str(write_topology(tmp_path / "three.yaml", topo))], env,
                        check=False)
        assert more.returncode == 2 and "changes the set of processes (added: v-3; removed: -)" in more.stderr
        assert len(rd.plan()["processes"]) == 2

        # Only v's replicas change (they get MARK); the plan on disk becomes the new one.
        topo["workers"][0].update(replicas=2, env={"MARK": "2"})
        launcher(["restart", "rs1", "--file", str(write_topology(tmp_path / "marked.yaml", topo))], env, timeout=120)
        assert {p["env"].get("MARK") for p in rd.plan()["processes"]} == {"2"}
        assert rd.plan()["topology"] == str((tmp_path / "marked.yaml").resolve())
        assert set(_ids(services, "rs1").values()).isdisjoint(after.values())

        # The new plan's worker dies at once (exit 3): the rollout stops at v-1.
        steady = _ids(services, "rs1")["v-2"]
        topo["workers"][0]["env"] = {"FAKE_WORKER": "crash"}
        failed = launcher(["restart", "rs1", "v", "--rolling", "--file",
                           str(write_topology(tmp_path / "crash.yaml", topo))], env, timeout=120, check=False)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "v-1 did not come back: exited with code 3" in failed.stderr
        assert "rollout stopped, not restarted: v-2" in failed.stderr
        assert _ids(services, "rs1").get("v-2") == steady, "v-2 was not touched"
    finally:
        pids = every_pid(env, "rs1")
        launcher(["down", "rs1"], env, timeout=120)
    assert alive(pids) == []
    assert registrations(services, "rs1") == []
