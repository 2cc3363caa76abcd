"""Repeated `launcher up` / `down` leave nothing behind: no worker, no worker's child, no managed service.

Fake workers (tests/test_supervisor_e2e.py's: they register in etcd and start a child that leaves
their process group, the worst case of vLLM's EngineCore) and etcd + NATS started by `up` itself
(managed), so every cycle starts and stops everything. UPDOWN_CYCLES (default 5) sets the count.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from launcher import services as svc
from launcher.state import RunDir
from tests.helpers import ROOT, launcher, wait_until, write_topology
from tests.test_supervisor_e2e import FAKE_WORKER, alive, every_pid

CYCLES = int(os.environ.get("UPDOWN_CYCLES", "5"))


def test_up_down_cycles_leave_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):
        monkeypatch.delenv(var, raising=False)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_WORKER)
    env = {"LAUNCHER_HOME": str(tmp_path / "home")}
    topo = {
        "name": "cycles", "backend": "subprocess", "model": "fake-model",
        "services": {"etcd": f"http://127.0.0.1:{svc.free_port()}", "nats": f"nats://127.0.0.1:{svc.free_port()}",
                     "managed": "auto"},
        "env": {"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "FAKE_WORKER": "register"},
        "workers": [{"name": "v", "replicas": 2, "ready_timeout": 60}],
    }
    path = write_topology(tmp_path / "cycles.yaml", topo)
    rd = RunDir(Path(env["LAUNCHER_HOME"]) / "cycles")
    left_per_cycle = []
    t0 = time.monotonic()
    for _ in range(CYCLES):
        launcher(["up", str(path)], env, timeout=120)
        # The supervisor records each worker's child on its next tree scan (every 2 s).
        wait_until(lambda: all(len(p["pids_seen"]) >= 2 for p in rd.state()["processes"].values()), 10,
                   "every worker's child recorded")
        pids = every_pid(env, "cycles")
        managed = {s["pid"]: s["create_time"] for s in json.loads(rd.services_file.read_text())}
        launcher(["down", "cycles"], env, timeout=120)
        left_per_cycle.append(len(alive(pids)) + len(alive(managed)))
    print(f"\n{CYCLES} up/down cycles in {time.monotonic() - t0:.0f} s; processes left after each down: "
          f"{left_per_cycle}")
    assert left_per_cycle == [0] * CYCLES
