"""`launcher ls`, verbs without a name, and client errors that name the service that did not answer.

Run directories are written by hand (a live supervisor is played by a real `sleep` process), so
these need no etcd, NATS or vLLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import proctree
from launcher.services import free_port
from launcher.state import RunDir, write_json
from tests.helpers import launcher
from workers.runtime import registry, requestplane
from workers.runtime.settings import ServiceUnavailable


@pytest.fixture()
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def make_run_dir(home: Path, name: str, supervisor: int | None = None, process: int | None = None) -> RunDir:
    rd = RunDir(home / name)
    rd.create()
    write_json(rd.plan_file, {"namespace": name, "etcd": [], "processes": [{"name": "v"}]})
    if supervisor is not None:
        write_json(rd.supervisor_pid_file, {"pid": supervisor, "create_time": proctree.create_time(supervisor)})
    if process is not None:
        write_json(rd.state_file, {"processes": {"v": {"pids_seen": {str(process): proctree.create_time(process)}}}})
    return rd


def test_ls_lists_running_orphaned_and_stopped(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    home = tmp_path / "home"
    make_run_dir(home, "old-1")
    make_run_dir(home, "old-2", process=2**22 + 5)  # a pid no process can have: long gone
    make_run_dir(home, "orphan", process=sleeper.pid)
    env = {"LAUNCHER_HOME": str(home)}
    rows = json.loads(launcher(["ls", "--json"], env).stdout)
    assert {r["name"]: r["state"] for r in rows} == {"old-1": "stopped", "old-2": "stopped", "orphan": "orphaned"}
    table = launcher(["ls"], env).stdout
    assert "orphaned" in table and "launcher down NAME" in table


def test_verbs_without_a_name_act_on_the_only_live_deployment(tmp_path: Path,
                                                                 sleeper: subprocess.Popen[bytes]) -> None:
    home = tmp_path / "home"
    for old in ("cpu-kv-router", "cpu-monolith", "cyc"):
        make_run_dir(home, old)
    make_run_dir(home, "dep-b", supervisor=sleeper.pid)  # the sleeper plays a live supervisor
    env = {"LAUNCHER_HOME": str(home)}
    out = launcher(["logs", "v"], env, check=False)
    assert "no log for 'v' in" in out.stderr and "dep-b" in out.stderr, out.stderr
    sleeper.kill()
    sleeper.wait()
    out = launcher(["logs", "v"], env, check=False)
    assert out.returncode == 1 and "no live deployment" in out.stderr, out.stderr
    assert "launcher ls" in out.stderr


def test_a_nats_that_does_not_answer_is_named_with_what_to_check() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable) as info:
        asyncio.run(requestplane.connect(url, "t", timeout=2))
    assert url in str(info.value) and "NATS_SERVER" in str(info.value) and "launcher status" in str(info.value)


def test_an_etcd_that_does_not_answer_is_named_with_what_to_check() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable) as info:
        asyncio.run(registry.connect([url], timeout=2))
    assert url in str(info.value) and "ETCD_ENDPOINTS" in str(info.value)


def test_the_client_says_which_service_did_not_answer_without_a_traceback() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "workers.common.client", "--prompt", "hi", "--namespace", "x",
                        "--component", "vllm"],
                         env={**os.environ, "NATS_SERVER": url}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert f"NATS at {url} did not answer" in out.stderr and "Traceback" not in out.stderr
