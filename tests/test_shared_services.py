"""Managed etcd / NATS shared by deployments: real `launcher up/down`, real etcd and nats-server.

The workers are the fake of tests/test_supervisor_e2e.py (they register in etcd like a real worker;
no vLLM), so these run in seconds. Each test picks its own service ports and LAUNCHER_HOME.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest

from launcher import services as svc
from launcher.service_users import service_dir
from launcher.state import RunDir, read_json
from tests.helpers import ROOT, launcher, wait_until, write_topology
from tests.test_supervisor_e2e import FAKE_WORKER


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):  # they would override the topologies' own services
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LAUNCHER_HOME", str(tmp_path / "home"))  # service_dir() here reads it too
    fake = tmp_path / "fake-worker"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(FAKE_WORKER)
    return {"LAUNCHER_HOME": str(tmp_path / "home"), "FAKE_DIR": str(fake)}


def topology(name: str, env: dict[str, str], etcd: str, nats: str) -> dict[str, Any]:
    return {
        "name": name, "backend": "subprocess", "model": "fake-model",
        "services": {"etcd": etcd, "nats": nats, "managed": "auto"},
        "env": {"PYTHONPATH": f"{env['FAKE_DIR']}{os.pathsep}{ROOT}", "FAKE_WORKER": "register"},
        "workers": [{"name": "v", "ready_timeout": 60}],
    }


def alive(services: list[dict[str, Any]]) -> list[str]:
    return [s["name"] for s in services if svc.proctree.is_same_process(s["pid"], s["create_time"])]


def test_down_of_one_deployment_leaves_the_services_another_uses(tmp_path: Path, home: dict[str, str]) -> None:
    etcd, nats = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    a = write_topology(tmp_path / "a.yaml", topology("share-a", home, etcd, nats))
    b = write_topology(tmp_path / "b.yaml", topology("share-b", home, etcd, nats))
    root = Path(home["LAUNCHER_HOME"])
    try:
        up_a = launcher(["up", str(a)], home, timeout=120)
        assert "starting a local server" in up_a.stdout
        managed = json.loads(RunDir(root / "share-a").services_file.read_text())
        assert sorted(s["name"] for s in managed) == ["etcd", "nats-server"]
        up_b = launcher(["up", str(b)], home, timeout=120)
        assert up_b.stdout.count("managed by the launcher, shared") == 2, up_b.stdout
        users = json.loads((service_dir("etcd", etcd) / "service.json").read_text())["users"]
        assert [Path(u).name for u in users] == ["share-a", "share-b"]

        down_a = launcher(["down", "share-a"], home)
        assert "left running: still used by share-b" in down_a.stdout, down_a.stdout
        assert sorted(alive(managed)) == ["etcd", "nats-server"]
        assert svc.etcd_healthy(etcd) and svc.nats_healthy(nats)
        status = json.loads(launcher(["status", "share-b", "--json"], home).stdout)
        assert [(p["name"], p["state"], p["registered"]) for p in status["processes"]] == [("v", "ready", True)]

        down_b = launcher(["down", "share-b"], home)
        assert "stopped: no other deployment uses it" in down_b.stdout, down_b.stdout
        wait_until(lambda: alive(managed) == [], 15, "the managed etcd and nats-server to stop")
        assert not (service_dir("etcd", etcd) / "service.json").exists()
    finally:
        for name in ("share-b", "share-a"):
            launcher(["down", name], home, check=False)


def test_a_failed_start_stops_the_services_it_started(tmp_path: Path, home: dict[str, str]) -> None:
    """etcd starts, then NATS cannot (its port is taken by something that is not NATS): etcd is stopped."""
    etcd = f"http://127.0.0.1:{svc.free_port()}"
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    nats = f"nats://127.0.0.1:{squatter.getsockname()[1]}"
    path = write_topology(tmp_path / "p.yaml", topology("partial", home, etcd, nats))
    try:
        out = launcher(["up", str(path)], home, timeout=120, check=False)
        assert out.returncode != 0
        assert "nats-server exited" in out.stderr + out.stdout, out.stdout + out.stderr
        assert "etcd: stopping the server this failed start began" in out.stdout, out.stdout
        assert not svc.etcd_healthy(etcd)
        etcd_procs = [p for p in psutil.process_iter(["name", "cmdline"])
                      if p.info["name"] == "etcd" and etcd.rsplit(":", 1)[1] in " ".join(p.info["cmdline"] or [])]
        assert etcd_procs == []
        assert not (service_dir("etcd", etcd) / "service.json").exists()
        assert read_json(RunDir(Path(home["LAUNCHER_HOME"]) / "partial").services_file, []) == []
    finally:
        squatter.close()
        launcher(["down", "partial"], home, check=False)
