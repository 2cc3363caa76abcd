"""The supervisor's loop (launcher.supervisor.run) never blocks: a stop is seen while a step waits,
and a process that ignores SIGTERM is killed at its deadline while state.json keeps being written.

A backend whose `poll` hangs (as a wedged tmux server would) stands in for the real ones, with fake
pids; the last test runs real python processes under a real supervisor and `launcher down`. etcd is
the real test server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from launcher import supervisor
from launcher.plan import ProcessSpec
from launcher.state import RunDir, write_json
from tests.helpers import LAUNCHER, ROOT, Services, until, wait_until
from tests.test_supervisor_unit import FAKE_PID_BASE, spec


class HangingBackend:
    """Starts nothing; once `hang` is set, `poll` blocks until `release` (at most 60 s), after which the
    process counts as ended (code 0), so the stop that follows finds it gone."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.hanging = threading.Event()
        self.release = threading.Event()
        self.started = 0

    def start(self, spec: object, log: Path) -> int:
        self.started += 1
        return FAKE_PID_BASE + self.started

    def poll(self, name: str) -> int | None:
        if self.hang.is_set() and not self.release.is_set():
            self.hanging.set()
            self.release.wait(60)
            return None
        return 0 if self.release.is_set() else None

    def close(self) -> None:
        pass



def test_stop_is_seen_while_a_step_hangs(services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    backend = HangingBackend()
    monkeypatch.setattr(supervisor, "make_backend", lambda kind, rd: backend)
    rd = RunDir(tmp_path / "dep")
    rd.create()
    write_json(rd.plan_file, {"namespace": "loop1", "etcd": [services.etcd], "backend": "subprocess",
                              "processes": [spec("w", ready_timeout=600).to_json()]})

    async def scenario() -> tuple[bool, bool]:
        stop = asyncio.Event()
        task = asyncio.create_task(supervisor.run(rd, stop))
        await until(lambda: backend.started == 1 and rd.state_file.exists(), 15, "the first step")
        backend.hang.set()
        await until(backend.hanging.is_set, 15, "a step to hang in poll")
        stop.set()
        # The step is stuck for up to 60 s; the loop must still mark the stop at once.
        await until(lambda: rd.state().get("stopping") is True, 5, "state.json to say stopping")
        still_hanging = not backend.release.is_set()
        backend.release.set()
        await asyncio.wait_for(task, 30)
        return still_hanging, rd.supervisor_pid_file.exists()

    still_hanging, pid_file_left = asyncio.run(scenario())
    assert still_hanging, "the stop was seen while the step still hung"
    assert not pid_file_left
    assert rd.state()["processes"]["w"]["state"] == supervisor.STOPPED


def test_status_says_unknown_not_ready_when_etcd_cannot_be_read(tmp_path: Path) -> None:
    import os

    from launcher import proctree, services
    from launcher.status import collect

    rd = RunDir(tmp_path / "dep")
    rd.create()
    me = {"pid": os.getpid(), "create_time": proctree.create_time(os.getpid())}
    write_json(rd.plan_file, {"namespace": "st1", "etcd": [f"http://127.0.0.1:{services.free_port()}"],
                              "backend": "subprocess", "processes": [spec("w").to_json()]})
    write_json(rd.supervisor_pid_file, me)  # a live supervisor (this test process stands in for it)
    write_json(rd.state_file, {"processes": {"w": {"state": "ready", **me, "started_at": time.time()}}})
    info = collect(rd, sample=0)
    (row,) = info["processes"]
    assert info["etcd_reachable"] is False and info["etcd_problem"].startswith("did not answer"), info
    assert (row["state"], row["registered"]) == ("unknown", None)


# Ignores SIGTERM, and so does its child, which leaves the process group (as an EngineCore can).
IGNORES_TERM = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import os, signal, time; os.setsid(); "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(f"ignoring SIGTERM, child {child.pid}", flush=True)
time.sleep(600)
"""


def test_down_kills_a_process_that_ignores_sigterm_at_its_deadline_while_state_keeps_updating(
        services: Services, tmp_path: Path) -> None:
    home = tmp_path / "home"
    rd = RunDir(home / "stubborn")
    rd.create()
    stubborn = ProcessSpec(name="w", kind="monolith", argv=[sys.executable, "-c", IGNORES_TERM], env={},
                           devices="-", tier=2)
    write_json(rd.plan_file, {"name": "stubborn", "namespace": "stub1", "etcd": [services.etcd],
                              "nats": services.nats, "backend": "subprocess", "processes": [stubborn.to_json()]})
    env = {**os.environ, "LAUNCHER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    with (rd.logs / "supervisor.log").open("ab") as log:
        sup = subprocess.Popen([sys.executable, "-m", "launcher.supervisor", str(rd.path)], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(rd.state()["processes"]["w"]["pids_seen"]) == 2, 20,
                   "the process and its child, recorded by the supervisor's tree scan")
        tree = {int(pid): created for pid, created in rd.state()["processes"]["w"]["pids_seen"].items()}
        grace = 3.0
        t0 = time.monotonic()
        down = subprocess.Popen([*LAUNCHER, "down", "stubborn", "--grace", str(grace)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples = []  # (seconds since down, state.json's `updated`, state, every tree member alive)
        while down.poll() is None:
            st = rd.state().get("processes", {}).get("w", {})
            alive = all(supervisor.proctree.is_same_process(pid, created) for pid, created in tree.items())
            samples.append((time.monotonic() - t0, rd.state().get("updated"), st.get("state"), alive))
            time.sleep(0.05)
        output = down.communicate()[0]
        assert down.returncode == 0, output
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.wait(10)
    draining = [s for s in samples if s[2] == supervisor.DRAINING]
    assert draining, samples
    assert draining[-1][0] - draining[0][0] > grace - 0.5, "draining until the deadline, not longer"
    assert len({updated for _, updated, _, _ in draining}) >= 6, "state.json is written on every tick meanwhile"
    assert all(alive for t, _, _, alive in draining if t < grace - 0.5), "SIGTERM was ignored until SIGKILL"
    final = rd.state()["processes"]["w"]
    assert final["state"] == supervisor.STOPPED
    assert final["message"].startswith("stopped: killed by SIGKILL 3.")
    assert not [pid for pid, created in tree.items() if supervisor.proctree.is_same_process(pid, created)]
    assert not any(p.info["pid"] in tree for p in psutil.process_iter(["pid"]) if p.status() != psutil.STATUS_ZOMBIE)


def test_status_shows_draining_manual_restarts_and_the_restart_under_way(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from launcher import proctree, services
    from launcher.status import collect, print_status

    rd = RunDir(tmp_path / "dep")
    rd.create()
    me = {"pid": os.getpid(), "create_time": proctree.create_time(os.getpid())}
    write_json(rd.plan_file, {"namespace": "st2", "etcd": [f"http://127.0.0.1:{services.free_port()}"],
                              "backend": "subprocess", "processes": [spec("v-1").to_json(), spec("v-2").to_json()]})
    write_json(rd.supervisor_pid_file, me)
    job = {"id": "j1", "processes": ["v-1", "v-2"], "rolling": True, "state": "running",
           "phase": {"v-1": "restarting", "v-2": "waiting"}, "message": ""}
    write_json(rd.state_file, {"restart_jobs": [job], "processes": {
        "v-1": {"state": "draining", **me, "started_at": time.time(), "restarts": 1, "manual_restarts": 2,
                "message": "restarting (asked by `launcher restart`)"},
        "v-2": {"state": "ready", **me, "started_at": time.time()}}})
    info = collect(rd, sample=0)
    rows = {r["name"]: r for r in info["processes"]}
    assert rows["v-1"]["state"] == "draining" and info["restart"] == job
    out = io.StringIO()
    print_status(info, Console(file=out, width=200))
    text = out.getvalue()
    assert "1 (+2 asked)" in text and "draining" in text
    assert "restart under way (rolling): v-1 restarting, v-2 waiting" in text
    rd.supervisor_pid_file.unlink()  # the supervisor died mid-drain: the process is what psutil says
    assert {r["name"]: r["state"] for r in collect(rd, sample=0)["processes"]}["v-1"] == "orphaned"
