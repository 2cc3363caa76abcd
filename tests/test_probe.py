"""`python -m launcher.probe`, the exec probes of the Kubernetes export, against a real etcd.

Each case runs the probe as the kubelet would (a fresh process with the container's environment)
and checks its exit code against registrations written with the workers' own Registry.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from launcher import services as svc
from launcher.probe import own_registration
from tests.helpers import ROOT, Services, wait_until
from workers.runtime.registry import Registration, Registry
from workers.runtime.settings import RuntimeSettings

PROBE = [sys.executable, "-m", "launcher.probe", "--timeout", "3"]


async def _register(etcd: str, reg: Registration, ttl: int = 60) -> int:
    registry = await Registry.connect([etcd])
    try:
        reg.lease_id = await registry.grant(ttl)
        await registry.client.put(reg.key.encode(), reg.encode(), lease=reg.lease_id)
        return reg.lease_id
    finally:
        await registry.client.close()


async def _revoke(etcd: str, lease_id: int) -> None:
    registry = await Registry.connect([etcd])
    try:
        await registry.revoke(lease_id)
    finally:
        await registry.client.close()


def registration(namespace: str, process: str, pid: int | None = None, host: str | None = None) -> Registration:
    return Registration(namespace=namespace, component="vllm", endpoint="generate", subject=f"{namespace}.vllm",
                        host=host or socket.gethostname(), pid=pid or os.getpid(), process=process)


@pytest.fixture()
def namespace() -> str:
    return f"probe-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def leases(services: Services) -> Iterator[list[int]]:
    taken: list[int] = []
    yield taken
    for lease in taken:
        asyncio.run(_revoke(services.etcd, lease))


def probe_env(etcd: str, namespace: str, process: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LAUNCHER_HOST"}
    return {**env, "PYTHONPATH": str(ROOT), "ETCD_ENDPOINTS": etcd, "LAUNCHER_NAMESPACE": namespace,
            "LAUNCHER_PROCESS": process}


def run_probe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROBE, *args], env=env, capture_output=True, text=True, timeout=60)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def test_ready_only_for_own_live_registration(services: Services, namespace: str, leases: list[int]) -> None:
    env = probe_env(services.etcd, namespace, "decode")
    before = run_probe(["ready"], env)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "not registered" in before.stderr

    # Another process's key, a key from another host, and a dead predecessor's key are not readiness.
    leases.append(asyncio.run(_register(services.etcd, registration(namespace, "prefill"))))
    leases.append(asyncio.run(_register(services.etcd, registration(namespace, "decode", host="other-pod"))))
    leases.append(asyncio.run(_register(services.etcd, registration(namespace, "decode", pid=dead_pid()))))
    assert run_probe(["ready"], env).returncode == 1

    own = asyncio.run(_register(services.etcd, registration(namespace, "decode")))
    leases.append(own)
    ok = run_probe(["ready"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"{own:x}" in ok.stdout
    assert run_probe(["live"], env).returncode == 0

    asyncio.run(_revoke(services.etcd, own))  # what a worker's clean exit (or a lost lease) does
    assert run_probe(["ready"], env).returncode == 1
    assert run_probe(["live"], env).returncode == 1


def test_unreachable_etcd_fails_readiness_but_not_liveness(namespace: str) -> None:
    env = probe_env(f"http://127.0.0.1:{svc.free_port()}", namespace, "decode")
    ready = run_probe(["ready"], env)
    assert ready.returncode == 1 and "etcd unreachable" in ready.stderr
    live = run_probe(["live"], env)
    assert live.returncode == 0, live.stdout + live.stderr
    assert "not failing liveness" in live.stdout


def test_no_process_name_is_a_usage_error(services: Services, namespace: str) -> None:
    assert run_probe(["ready"], probe_env(services.etcd, namespace, "")).returncode == 2


def test_wait_returns_once_every_dependency_registered(services: Services, namespace: str, leases: list[int],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "wait.log"
    with out.open("w") as sink:
        proc = subprocess.Popen([*PROBE, "wait", "router", "prefill", "--interval", "0.2"],
                                env=probe_env(services.etcd, namespace, "decode"), stdout=sink,
                                stderr=subprocess.STDOUT, text=True)
    try:
        leases.append(asyncio.run(_register(services.etcd, registration(namespace, "router", host="router-pod"))))
        wait_until(lambda: "waiting for prefill to register" in out.read_text(), 30, "the wait logged", alive=proc)
        assert proc.poll() is None  # one of two dependencies is not enough
        leases.append(asyncio.run(_register(services.etcd, registration(namespace, "prefill", host="prefill-0"))))
        assert proc.wait(timeout=30) == 0
        assert "registered: router, prefill" in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_own_registration_matches_process_host_and_live_pid() -> None:
    settings = RuntimeSettings(namespace="n", etcd_endpoints=("x",), nats_server="y", process_name="w", host="pod-a")
    regs = [registration("n", "w", pid=11, host="pod-b"), registration("n", "v", pid=12, host="pod-a"),
            registration("n", "w", pid=13, host="pod-a"), registration("n", "w", pid=14, host="pod-a")]
    found = own_registration(regs, settings, pid_alive=lambda pid: pid == 14)
    assert found is not None and found.pid == 14
    assert own_registration(regs, settings, pid_alive=lambda pid: False) is None
