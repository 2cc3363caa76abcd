"""The supervisor end to end: real `launcher up/status/down`, real tmux (private socket), real etcd.

Most tests are about the supervisor, not vLLM, so their worker is a cheap fake: a `sitecustomize`
put on the worker's PYTHONPATH (through the topology's `env`) takes over the worker's python
before `-m workers.monolith.worker` runs, and either registers in etcd through
workers.runtime.registry like a real worker (with a child that leaves its process group, the
worst case of vLLM's EngineCore), crashes at once, or never registers. The last test runs a real
vLLM CPU worker, with etcd and NATS managed by the launcher, to check that `down` leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from launcher import proctree
from launcher import services as svc
from launcher.backends.tmux import SOCKET_ENV
from launcher.state import RunDir
from tests.helpers import CPU_ENGINE, CPU_ENV, LAUNCHER, MONOLITH, ROOT, Services, launcher, wait_until, write_topology
from workers.runtime.registry import Registration, Registry

FAKE_WORKER = r'''
"""Test double for a worker: see tests/test_supervisor_e2e.py.

Active only in a process the launcher started (LAUNCHER_PROCESS set) with FAKE_WORKER set, so the
launcher CLI and the supervisor, which may inherit the same PYTHONPATH, run for real.
"""
import os

_mode = os.environ.get("FAKE_WORKER") if os.environ.get("LAUNCHER_PROCESS") else None
if _mode:
    import asyncio
    import signal
    import subprocess
    import sys
    import time

    def _child() -> None:
        os.setsid()  # like an EngineCore that outlives its parent: out of the process group
        time.sleep(3600)

    async def _register() -> None:
        from workers.runtime.registry import Registration, Registry
        from workers.runtime.settings import RuntimeSettings

        s = RuntimeSettings.from_env()
        child = subprocess.Popen([sys.executable, "-c", "pass"], env={**os.environ, "FAKE_WORKER": "child"})
        print(f"fake worker: started at {time.time():.3f}, child {child.pid}", flush=True)
        registry = await Registry.connect(s.etcd_endpoints)
        await registry.register(Registration(namespace=s.namespace, component="vllm", endpoint="generate",
                                             subject=f"{s.namespace}.vllm.generate", host=s.host,
                                             process=s.process_name))
        print("fake worker: registered", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await registry.close()

    if _mode == "child":
        _child()
    elif _mode == "crash":
        print(f"fake worker: started at {time.time():.3f}", flush=True)
        print("fake worker: cannot load the model (this is the crash test)", flush=True)
        os._exit(3)
    elif _mode == "hang":
        print("fake worker: loading forever", flush=True)
        time.sleep(3600)
    elif _mode == "register":
        asyncio.run(_register())
    os._exit(0)
'''


def registrations(services: Services, namespace: str) -> list[Registration]:
    async def run() -> list[Registration]:
        registry = await Registry.connect([services.etcd])
        try:
            return await registry.list(namespace)
        finally:
            await registry.client.close()

    return asyncio.run(run())


def lease_ttl(services: Services, lease_id: int) -> int:
    async def run() -> int:
        registry = await Registry.connect([services.etcd])
        try:
            info = await registry.client.get_lease_info(lease_id)
            return int(info.TTL)
        finally:
            await registry.client.close()

    return asyncio.run(run())


def tmux_sessions(socket: str) -> list[str]:
    out = subprocess.run(["tmux", "-L", socket, "list-sessions", "-F", "#{session_name}"],
                         capture_output=True, text=True)
    return sorted(out.stdout.split()) if out.returncode == 0 else []


def state(env: dict[str, str], name: str) -> dict[str, Any]:
    return dict(RunDir(Path(env["LAUNCHER_HOME"]) / name).state())


def every_pid(env: dict[str, str], name: str) -> dict[int, float]:
    """Every pid of every tree the deployment ever had (the supervisor records them)."""
    out: dict[int, float] = {}
    for p in state(env, name).get("processes", {}).values():
        out.update({int(k): v for k, v in p.get("pids_seen", {}).items()})
    return out


def alive(pids: dict[int, float]) -> list[int]:
    """The recorded processes still running (same pid and start time, not a zombie)."""
    return [pid for pid, created in pids.items() if proctree.is_same_process(pid, created)]


def fake_topology(name: str, fake_dir: Path, mode: str, **worker: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "tmux",
        "model": "fake-model",
        "env": {"PYTHONPATH": f"{fake_dir}{os.pathsep}{ROOT}", "FAKE_WORKER": mode},
        "workers": [{"name": "v", **worker}],
    }


@pytest.fixture()
def fake_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fake-worker"
    d.mkdir()
    (d / "sitecustomize.py").write_text(FAKE_WORKER)
    return d


@pytest.fixture()
def env(services: Services, tmux_socket: str, tmp_path: Path) -> dict[str, str]:
    """The launcher's environment: test etcd/NATS, its own LAUNCHER_HOME, a private tmux server."""
    return {**services.env, SOCKET_ENV: tmux_socket, "LAUNCHER_HOME": str(tmp_path / "home")}


def test_kill_9_restarts_the_worker_and_its_old_lease_is_gone_at_once(
        tmp_path: Path, fake_dir: Path, env: dict[str, str], services: Services, tmux_socket: str) -> None:
    topo = fake_topology("e2e-restart", fake_dir, "register", replicas=2,
                         restart={"policy": "on-failure", "backoff": 0.5})
    path = write_topology(tmp_path / "restart.yaml", topo)
    launcher(["up", str(path)], env, timeout=120)
    try:
        assert tmux_sessions(tmux_socket) == ["v-1", "v-2"], "one tmux session per process, named after it"
        regs = {r.process: r for r in registrations(services, "e2e-restart")}
        assert set(regs) == {"v-1", "v-2"}
        old = regs["v-1"]
        # Wait until the supervisor has recorded the worker's child (the fake EngineCore).
        wait_until(lambda: len(state(env, "e2e-restart")["processes"]["v-1"]["pids_seen"]) >= 2, 10,
                   "the supervisor to record v-1's child")
        first_tree = {int(k): v for k, v in state(env, "e2e-restart")["processes"]["v-1"]["pids_seen"].items()}

        ttl_left = lease_ttl(services, old.lease_id)
        os.kill(old.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # Revoked by the supervisor, not expired: gone while the lease still had time to live.
        wait_until(lambda: old.lease_id not in {r.lease_id for r in registrations(services, "e2e-restart")},
                   max(ttl_left - 1, 1), f"v-1's key to go (the lease had {ttl_left} s left)", every=0.05)
        assert time.monotonic() - killed_at < ttl_left
        assert lease_ttl(services, old.lease_id) == -1, "the old lease itself is revoked"

        new = wait_until(lambda: next((r for r in registrations(services, "e2e-restart")
                                       if r.process == "v-1" and r.pid != old.pid), None), 30,
                         "v-1 to register again")
        assert new.lease_id != old.lease_id
        status = json.loads(launcher(["status", "e2e-restart", "--json"], env).stdout)
        v1 = next(p for p in status["processes"] if p["name"] == "v-1")
        assert (v1["state"], v1["pid"], v1["restarts"], v1["registered"]) == ("ready", new.pid, 1, True)
        assert alive(first_tree) == [], "the dead worker's child was cleared before the restart"
        assert tmux_sessions(tmux_socket) == ["v-1", "v-2"]
        log = (Path(env["LAUNCHER_HOME"]) / "e2e-restart" / "logs" / "v-1.log").read_text()
        assert log.count("fake worker: registered") == 2, "both runs' pane output is in the log"

        again = launcher(["up", str(path)], env)
        assert "already up" in again.stdout and "nothing started" in again.stdout
        assert {r.pid for r in registrations(services, "e2e-restart")} == {new.pid, regs["v-2"].pid}
    finally:
        pids = every_pid(env, "e2e-restart")
        launcher(["down", "e2e-restart"], env)
    assert len(pids) >= 6, "two workers, one restart, each with a child"
    assert alive(pids) == []
    assert tmux_sessions(tmux_socket) == []
    assert registrations(services, "e2e-restart") == []


@contextlib.contextmanager
def up_in_the_foreground(tmp_path: Path, fake_dir: Path, env: dict[str, str], name: str
                         ) -> Iterator[subprocess.Popen[str]]:
    """`launcher up --foreground` of one registering fake worker `v`, as a container runs it; the deployment
    is taken down however the test ends."""
    path = write_topology(tmp_path / f"{name}.yaml", fake_topology(name, fake_dir, "register"))
    proc = subprocess.Popen([*LAUNCHER, "up", str(path), "--foreground"], env={**os.environ, **env}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        launcher(["down", name], env, check=False)


def ready_worker(env: dict[str, str], name: str, proc: subprocess.Popen[str]) -> psutil.Process:
    wait_until(lambda: state(env, name).get("processes", {}).get("v", {}).get("state") == "ready", 60,
               "the fake worker to be ready", alive=proc)
    return psutil.Process(state(env, name)["processes"]["v"]["pid"])


def gone(p: psutil.Process) -> bool:
    return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("when", ["starting", "ready"])
def test_up_in_the_foreground_drains_and_stops_everything_on_sigterm(
        tmp_path: Path, fake_dir: Path, env: dict[str, str], services: Services, tmux_socket: str, when: str) -> None:
    """`up --foreground` as a container's main command: `docker stop` sends it SIGTERM, which must stop the
    deployment as Ctrl-C does (drain, revoke, stop, exit 0), not kill the CLI and leave the rest to SIGKILL;
    whether it comes while the workers start or once they serve (while `up` prints the status, too)."""
    run_dir = RunDir(Path(env["LAUNCHER_HOME"]) / "e2e-fg")
    with up_in_the_foreground(tmp_path, fake_dir, env, "e2e-fg") as proc:
        if when == "starting":
            wait_until(run_dir.supervisor_pid, 60, "the supervisor to start", every=0.01, alive=proc)
        else:
            worker = ready_worker(env, "e2e-fg", proc)
            assert registrations(services, "e2e-fg")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "stopping..." in out, out
        if when == "ready":
            assert gone(worker)
            stopped = state(env, "e2e-fg")["processes"]["v"]
            assert stopped["state"] == "stopped" and "after SIGTERM" in stopped["message"], stopped
            assert "SIGKILL" not in stopped["message"], "drained and exited, not killed"
        assert registrations(services, "e2e-fg") == []
        assert tmux_sessions(tmux_socket) == []
        assert run_dir.supervisor_pid() is None


def test_up_in_the_foreground_exits_1_when_its_supervisor_dies_and_still_cleans_up(
        tmp_path: Path, fake_dir: Path, env: dict[str, str], tmux_socket: str) -> None:
    """A container's restart policy reads the exit code: a supervisor killed under `up --foreground` is a
    failure (1), not a clean stop, and its worker is still taken down."""
    with up_in_the_foreground(tmp_path, fake_dir, env, "e2e-fg-dies") as proc:
        worker = ready_worker(env, "e2e-fg-dies", proc)
        supervisor = RunDir(Path(env["LAUNCHER_HOME"]) / "e2e-fg-dies").supervisor_pid()
        assert supervisor is not None
        os.kill(supervisor, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1, out
        assert "the supervisor exited by itself" in out, out
        wait_until(lambda: gone(worker), 30, "the worker to be stopped")
        assert tmux_sessions(tmux_socket) == []


def test_a_worker_that_always_crashes_ends_failed_after_max_restarts_with_backoff(
        tmp_path: Path, fake_dir: Path, env: dict[str, str], tmux_socket: str) -> None:
    topo = fake_topology("e2e-crash", fake_dir, "crash",
                         restart={"policy": "on-failure", "max_restarts": 2, "backoff": 0.5})
    path = write_topology(tmp_path / "crash.yaml", topo)
    try:
        out = launcher(["up", str(path)], env, timeout=120, check=False)
        assert out.returncode != 0
        assert "gave up after 2 restart(s)" in out.stdout, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
        status = json.loads(launcher(["status", "e2e-crash", "--json"], env).stdout)
        v = status["processes"][0]
        assert (v["state"], v["restarts"], v["exit_code"]) == ("failed", 2, 3)
        assert any("cannot load the model" in line for line in v["log_tail"])
        text = launcher(["status", "e2e-crash"], env).stdout
        assert "exited with code 3; gave up after 2 restart(s)" in text and "cannot load the model" in text
        # Three attempts, each after a doubled backoff (0.5 s, then 1 s).
        log = (Path(env["LAUNCHER_HOME"]) / "e2e-crash" / "logs" / "v.log").read_text()
        starts = [float(line.split("started at ")[1].split()[0]) for line in log.splitlines() if "started at" in line]
        assert len(starts) == 3
        assert starts[1] - starts[0] >= 0.5 and starts[2] - starts[1] >= 1.0
        assert tmux_sessions(tmux_socket) == ["v"], "the dead pane stays readable"
        screen = subprocess.run(["tmux", "-L", tmux_socket, "capture-pane", "-p", "-S", "-", "-t", "=v:"],
                                capture_output=True, text=True).stdout
        assert "cannot load the model" in screen
    finally:
        launcher(["down", "e2e-crash"], env)
    assert tmux_sessions(tmux_socket) == []


def test_up_with_a_worker_that_never_registers_fails_at_its_ready_timeout(
        tmp_path: Path, fake_dir: Path, env: dict[str, str], tmux_socket: str) -> None:
    topo = fake_topology("e2e-hang", fake_dir, "hang", ready_timeout=3)
    path = write_topology(tmp_path / "hang.yaml", topo)
    try:
        out = launcher(["up", str(path)], env, timeout=120, check=False)
        assert out.returncode != 0
        assert "did not register in etcd within its ready_timeout of 3 s" in out.stdout
        assert "fake worker: loading forever" in out.stdout, "the log tail is shown"
        pid = state(env, "e2e-hang")["processes"]["v"]["pid"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        launcher(["down", "e2e-hang"], env)
    assert tmux_sessions(tmux_socket) == []


def test_down_after_up_of_real_vllm_leaves_no_process_session_or_service(
        tmp_path: Path, tiny_model: Path, tmux_socket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real vLLM (EngineCore children), etcd and NATS started by the launcher itself (managed)."""
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):  # they would override the topology's own services
        monkeypatch.delenv(var, raising=False)
    env = {SOCKET_ENV: tmux_socket, "LAUNCHER_HOME": str(tmp_path / "home")}
    topo = {
        "name": "e2e-down", "backend": "tmux", "model": str(tiny_model),
        "services": {"etcd": f"http://127.0.0.1:{svc.free_port()}", "nats": f"nats://127.0.0.1:{svc.free_port()}",
                     "managed": "always"},
        "engine": CPU_ENGINE, "env": CPU_ENV,
        "workers": [{"name": "v", "kind": MONOLITH.name, "ready_timeout": 300}],
    }
    path = write_topology(tmp_path / "down.yaml", topo)
    rd = RunDir(Path(env["LAUNCHER_HOME"]) / "e2e-down")
    try:
        launcher(["up", str(path)], env, timeout=400)
        managed = {s["pid"]: s["create_time"] for s in json.loads(rd.services_file.read_text())}
        assert len(managed) == 2, "etcd and nats-server started by the launcher"
        v = wait_until(lambda: (lambda p: p if len(p["pids_seen"]) >= 2 else None)(rd.state()["processes"]["v"]),
                       10, "the supervisor to record vLLM's EngineCore")
        pids = every_pid(env, "e2e-down")
        children = [p for p in pids if p != v["pid"]]
        assert children and alive({p: pids[p] for p in children}), "vLLM's EngineCore runs as a child"
        assert tmux_sessions(tmux_socket) == ["v"]
        launcher(["down", "e2e-down"], env)
        assert alive(pids) == [], "no process of any tree (EngineCore included) is left"
        assert alive(managed) == [], "the managed etcd and nats-server are stopped"
        assert tmux_sessions(tmux_socket) == []
        assert rd.supervisor_pid() is None
    finally:
        launcher(["down", "e2e-down"], env, check=False)


def test_kv_router_run_sh_starts_n_workers_and_a_router_in_tmux_sessions(
        tmp_path: Path, fake_dir: Path, env: dict[str, str], tmux_socket: str) -> None:
    """The seed's habit: `./kv-router-run.sh 3 round_robin`, then `tmux a -t v-1` / `tmux a -t v-router`."""
    run_env = {**os.environ, **env, "PYTHONPATH": f"{fake_dir}{os.pathsep}{ROOT}", "FAKE_WORKER": "register",
               "KV_ROUTER_METRICS_PORT_BASE": str(svc.free_port_block(8))}
    try:
        out = subprocess.run([str(ROOT / "kv-router-run.sh"), "3", "round_robin", "--timeout", "120"], env=run_env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert tmux_sessions(tmux_socket) == ["v-1", "v-2", "v-3", "v-router"]
        assert f"tmux -L {tmux_socket} a -t v-1" in out.stdout
        assert "launcher down kv-router-run" in out.stdout
        topology = (Path(env["LAUNCHER_HOME"]) / "kv-router-run.yaml").read_text()
        assert "strategy: round_robin" in topology and "kind: kv_worker" in topology
        status = json.loads(launcher(["status", "kv-router-run", "--json"], env).stdout)
        assert status["backend"] == "tmux"
        assert [(p["name"], p["kind"], p["state"]) for p in status["processes"]] == [
            ("v-router", "router", "ready"), ("v-1", "kv_worker", "ready"), ("v-2", "kv_worker", "ready"),
            ("v-3", "kv_worker", "ready")]
    finally:
        launcher(["down", "kv-router-run"], env, check=False)
    assert tmux_sessions(tmux_socket) == []
