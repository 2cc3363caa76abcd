"""`launcher up` on real vLLM (CPU), real etcd and nats-server: what a user does and checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from launcher import services as svc
from tests.helpers import CPU_ENGINE, CPU_ENV, MONOLITH, ROOT, Deployment, Services, launcher, up
from workers.common.protocol import GenerateRequest
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated


def monolith_topology(name: str, model: Path, **worker: object) -> dict[str, object]:
    return {"name": name, "model": str(model), "engine": CPU_ENGINE, "env": CPU_ENV,
            "workers": [{"name": "vllm", "kind": MONOLITH.name, "ready_timeout": 300, **worker}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, services: Services, tiny_model: Path) -> Iterator[Deployment]:
    dep = up(tmp_path_factory.mktemp("mono"), monolith_topology("mono-tiny", tiny_model), services)
    yield dep
    dep.down()


def test_status_shows_the_worker_ready_and_registered(tiny: Deployment) -> None:
    info = tiny.status()
    assert info["supervisor_pid"] and info["etcd_reachable"]
    (proc,) = info["processes"]
    assert proc["state"] == "ready" and proc["registered"] is True
    assert psutil.pid_exists(proc["pid"]) and proc["rss_bytes"] > 50 * 2**20
    text = launcher(["status", tiny.name], tiny.env).stdout
    assert "vllm" in text and "ready" in text and "yes" in text


def test_up_again_starts_nothing_twice(tiny: Deployment) -> None:
    pid = tiny.process("vllm")["pid"]
    out = launcher(["up", str(tiny.topology)], tiny.env).stdout
    assert "already up" in out
    assert tiny.process("vllm")["pid"] == pid


def test_client_cli_streams_annotated_lines(tiny: Deployment) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers.common.client", "--prompt", "the quick brown fox", "--max-tokens", "8",
         "--namespace", tiny.namespace], env={**os.environ, **tiny.env}, capture_output=True, text=True, timeout=120,
        cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines and all(line.startswith("Annotated(data='") and line.endswith(", event=None, comment=[], id=None)")
                         for line in lines)
    # Text so far: each line extends the previous one.
    assert len(lines) >= 2 and len(lines[-1]) > len(lines[0])


def test_client_finds_the_namespace_by_itself(tiny: Deployment) -> None:
    env = {**os.environ, **tiny.env}
    env.pop("LAUNCHER_NAMESPACE", None)
    out = subprocess.run([sys.executable, "-m", "workers.common.client", "--prompt", "hi", "--max-tokens", "3",
                          "--quiet"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr + out.stdout


def test_greedy_output_is_deterministic_and_counts_tokens(tiny: Deployment) -> None:
    req = GenerateRequest(prompt="what is the capital of france?", sampling={"max_tokens": 12, "temperature": 0,
                                                                            "ignore_eos": True})
    a = tiny.ask(req)
    b = tiny.ask(req.model_copy(update={"request_id": "again"}))
    assert a[-1].data == b[-1].data and not a[-1].is_error()


def test_logs_verb_shows_the_worker_log(tiny: Deployment) -> None:
    out = launcher(["logs", "vllm", "--deployment", tiny.name, "-n", "200"], tiny.env).stdout
    assert "registered" in out


def test_killed_worker_mid_stream_gives_the_client_an_error(tiny: Deployment) -> None:
    """Runs last in this module: the worker is killed (the supervisor restarts it afterwards)."""
    pid = tiny.process("vllm")["pid"]
    req = GenerateRequest(prompt="count", sampling={"max_tokens": 900, "temperature": 0, "ignore_eos": True})

    async def run() -> tuple[list[Annotated], float]:
        nc = await requestplane.connect(tiny.services.nats, "test")
        items: list[Annotated] = []
        killed_at = 0.0
        try:
            subject = requestplane.endpoint_subject(tiny.namespace, MONOLITH.component, MONOLITH.endpoint)
            async for item in requestplane.stream(nc, subject, req.model_dump(exclude_none=True), idle_timeout=5):
                items.append(item)
                if len(items) == 3:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        finally:
            await nc.close()
        return items, time.monotonic() - killed_at

    items, after_kill = asyncio.run(run())
    assert items[-1].is_error(), items[-3:]
    assert "went silent" in items[-1].comment[0]
    assert after_kill < 30  # bounded by the idle timeout, not by the 900 tokens asked for


def test_demo_model_answers_paris_with_managed_services(tmp_path: Path, demo_model: Path) -> None:
    """The README's main job: the launcher starts etcd and nats-server itself, the demo model answers, `down`
    stops every process it started (worker tree, supervisor, etcd, nats-server)."""
    etcd = f"http://127.0.0.1:{svc.free_port()}"
    nats = f"nats://127.0.0.1:{svc.free_port()}"
    topo = monolith_topology("demo-paris", demo_model)
    topo["services"] = {"etcd": etcd, "nats": nats, "managed": "auto"}
    env = {"LAUNCHER_HOME": str(tmp_path / "home")}
    dep = up(tmp_path, topo, Services(etcd=etcd, nats=nats, env=env))
    try:
        state_dir = tmp_path / "home" / "demo-paris"
        started = svc.from_json(json.loads((state_dir / "services.json").read_text()))
        assert {s.name for s in started} == {"etcd", "nats-server"}
        out = subprocess.run(
            [sys.executable, "-m", "workers.common.client", "--prompt", "what is the capital of france?",
             "--max-tokens", "24", "--temperature", "0", "--chat", "--namespace", "demo-paris"],
            env={**os.environ, "NATS_SERVER": nats, "ETCD_ENDPOINTS": etcd}, capture_output=True, text=True,
            timeout=120)
        assert out.returncode == 0, out.stderr
        assert "Paris" in out.stdout.strip().splitlines()[-1]
        info = dep.status()
        pids = set()
        for p in json.loads((state_dir / "state.json").read_text())["processes"].values():
            pids |= {int(k) for k in p["pids_seen"]}
        assert len(pids) >= 2, "the worker's tree (parent + EngineCore) should have been recorded"
        sup = info["supervisor_pid"]
    finally:
        dep.down()
    for pid in [*pids, sup, *(s.pid for s in started)]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert not svc.etcd_healthy(etcd) and not svc.nats_healthy(nats)
