"""The supervisor's loop (launcher.supervisor.run) never blocks: a stop is seen while a step waits.

A backend whose `poll` hangs (as a wedged tmux server or a slow process-tree wait would) stands in
for the real ones; etcd is the real test server. The processes are fake pids (no real process).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from launcher import supervisor
from launcher.state import RunDir, write_json
from tests.helpers import until
from tests.test_supervisor_unit import FAKE_PID_BASE, spec


class HangingBackend:
    """Starts nothing; once `hang` is set, `poll` blocks until `release` (at most 60 s)."""

    def __init__(self) -> None:
        self.hang = threading.Event()
        self.hanging = threading.Event()
        self.release = threading.Event()
        self.started = 0

    def start(self, spec: object, log: Path) -> int:
        self.started += 1
        return FAKE_PID_BASE + self.started

    def poll(self, name: str) -> int | None:
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(60)
        return None

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
    assert info["etcd_reachable"] is False
    assert (row["state"], row["registered"]) == ("unknown", None)
