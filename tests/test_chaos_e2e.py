"""Chaos: load through a 2-worker + KV-router deployment while faults are injected, one after another.

Real launcher, real vLLM CPU workers (models/tiny-llama), real etcd and nats-server that this test
starts itself (so it can restart them). A load generator (2 paced clients, in a thread with its
own event loop) sends requests through the router the whole time; the script then

    kills worker-a (-9) | kills the router (-9) | revokes worker-b's lease | restarts NATS | restarts etcd

and after each waits (with a deadline) until the deployment is whole again. Counted per fault:
requests that failed (and their error codes), requests that took more than 10 s (must be 0), the
time until requests succeed again and until the topology is whole again; after `down`: processes
left (must be 0). The table is printed and written to bench/results/chaos-cpu.md.

The load generator retries a request that failed before its first token with a retryable code,
within the request's 10 s budget, as a frontend does; both the errors it saw and the requests that
failed in the end are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from launcher import proctree
from launcher import services as svc
from launcher.services import free_port
from launcher.state import RunDir
from tests.helpers import CPU_ENGINE, CPU_ENV, ROOT, Services, launcher, wait_until, write_topology
from tests.test_supervisor_e2e import alive, every_pid
from workers.runtime import requestplane
from workers.runtime.annotated import retryable
from workers.runtime.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

NAME = "chaos"
BUDGET = 10.0  # a request with no outcome after this long is hung
CLIENTS = 2
PACE = 0.25  # seconds each client pauses between requests


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    codes: list[str] = field(default_factory=list)  # every error seen, retried or final
    final: str = ""  # the error that ended it ("" when ok)

    @property
    def took(self) -> float:
        return self.ended - self.started


class Load:
    """CLIENTS loops sending requests through the router until stopped, PACE apart; every outcome kept."""

    def __init__(self, nats: str, namespace: str) -> None:
        self.nats = nats
        self.subject = requestplane.endpoint_subject(namespace, "preprocess", "generate")
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        nc = await requestplane.connect(self.nats, "chaos-load")
        try:
            await asyncio.gather(*(self._client(nc, i) for i in range(CLIENTS)))
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _client(self, nc: Any, i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            prompt = f"client {i} asks about item {rng.randrange(1000)}: " + "tell me more " * rng.randrange(1, 6)
            t0 = time.monotonic()
            try:
                out = await asyncio.wait_for(self._one(nc, prompt, t0), BUDGET * 3)
            except asyncio.TimeoutError:
                out = Outcome(t0, time.monotonic(), False, ["hung"], "hung")
            self.outcomes.append(out)
            # Paced, not back to back: a restarting vLLM needs the CPU too (2 cores in CI).
            await asyncio.sleep(PACE)

    async def _one(self, nc: Any, prompt: str, t0: float) -> Outcome:
        codes: list[str] = []
        request = {"prompt": prompt, "sampling": {"max_tokens": 8, "temperature": 0.0}}
        while True:
            got_tokens = False
            error = None
            async for item in requestplane.stream(nc, self.subject, request, idle_timeout=5):
                if item.is_error():
                    error = item
                    break
                got_tokens = True
            if error is None:
                return Outcome(t0, time.monotonic(), True, codes)
            code = error.code or "none"
            codes.append(code)
            if not retryable(error.code, got_tokens) or time.monotonic() - t0 > BUDGET - 1:
                return Outcome(t0, time.monotonic(), False, codes, f"{code}: {'; '.join(error.comment)[:120]}")
            await asyncio.sleep(0.5)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.ended >= t]



def registrations(etcd: str, namespace: str) -> list[Any]:
    async def run() -> list[Any]:
        registry = await Registry.connect([etcd], )
        try:
            return await asyncio.wait_for(registry.list(namespace), 3)
        finally:
            await registry.client.close()

    return asyncio.run(run())


def revoke(etcd: str, lease: int) -> None:
    async def run() -> None:
        registry = await Registry.connect([etcd])
        try:
            await registry.client.revoke_lease(lease)
        finally:
            await registry.client.close()

    asyncio.run(run())


def topology(model: Path, s: Services) -> dict[str, Any]:
    return {
        "name": NAME, "backend": "subprocess", "model": str(model),
        "services": {"etcd": s.etcd, "nats": s.nats, "managed": "never"},
        "engine": {**CPU_ENGINE, "block-size": 32, "enable-prefix-caching": True},
        "env": CPU_ENV,
        "workers": [{"name": "worker-a", "kind": "kv_worker", "cpus": "0", "ready_timeout": 300},
                    {"name": "worker-b", "kind": "kv_worker", "cpus": "1", "ready_timeout": 300}],
        "routers": [{"name": "router", "strategy": "prefix"}],
        "metrics_port_base": free_port(),  # never the default ports another deployment may hold
    }


def test_chaos(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "services"
    etcd, nats = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    running = {"etcd": svc.start_etcd(etcd, work), "nats": svc.start_nats(nats, work)}
    env = {"ETCD_ENDPOINTS": etcd, "NATS_SERVER": nats, "LAUNCHER_HOME": str(tmp_path / "home")}
    s = Services(etcd=etcd, nats=nats, env=env)
    rd = RunDir(tmp_path / "home" / NAME)
    path = write_topology(tmp_path / "chaos.yaml", topology(tiny_model, s))
    rows: list[dict[str, Any]] = []
    load = Load(nats, NAME)
    pids: dict[int, float] = {}

    def pid_of(name: str) -> int:
        return int(rd.state()["processes"][name]["pid"])

    def whole() -> bool:
        """Every process ready in the supervisor's view and registered under its current pid."""
        procs = rd.state()["processes"]
        regs = {r.process: r for r in registrations(etcd, NAME)}
        return all(p["state"] == "ready" and p["pid"] and regs.get(n) is not None and regs[n].pid == p["pid"]
                   for n, p in procs.items())

    def fault(label: str, act: Any, whole_again: Any, settle: float = 8.0) -> None:
        before = {o for o in map(id, load.outcomes)}
        t = time.monotonic()
        act()
        back = wait_until(whole_again, 420, f"the deployment whole again after: {label}")
        time.sleep(settle)  # requests keep flowing on the whole deployment
        window = [o for o in load.since(t) if id(o) not in before]
        failed = [o for o in window if not o.ok]
        errors_seen = sum(len(o.codes) for o in window)
        ok_after = [o.ended - t for o in window if o.ok and o.started >= t]
        last_fail = max((o.ended - t for o in failed), default=0.0)
        rows.append({
            "fault": label, "requests": len(window), "failed": len(failed),
            "why": sorted({o.final.split(":")[0] for o in failed}),
            "errors_seen": errors_seen, "codes_seen": sorted({c for o in window for c in o.codes}),
            "hung_over_10s": sum(o.took > BUDGET for o in window),
            "max_request_s": round(max((o.took for o in window), default=0.0), 2),
            "first_ok_s": round(min(ok_after, default=float("nan")), 2),
            "last_failure_s": round(last_fail, 2), "whole_again_s": round(back, 2),
        })

    back_at: dict[str, float] = {}

    def restart_service(kind: str, pause: float) -> None:
        old = running[kind]
        proctree.stop_tree(old.pid, grace=5)
        time.sleep(pause)
        running[kind] = svc.start_etcd(etcd, work) if kind == "etcd" else svc.start_nats(nats, work)
        back_at[kind] = time.monotonic()

    def served_since(kind: str) -> bool:
        return any(o.ok and o.started >= back_at[kind] for o in list(load.outcomes))

    def kill(name: str) -> tuple[str, Any, Any]:
        """The fault, and its end: that process back under a new pid, and the deployment whole."""
        old = pid_of(name)
        return f"kill -9 {name}", lambda: os.kill(old, signal.SIGKILL), lambda: pid_of(name) != old and whole()

    def lease_of(name: str) -> int:
        return int(next(r.lease_id for r in registrations(etcd, NAME) if r.process == name))

    try:
        launcher(["up", str(path), "--timeout", "400"], env, timeout=450)
        wait_until(whole, 60, "the deployment whole after up")
        load.thread.start()
        wait_until(lambda: sum(o.ok for o in load.outcomes) >= 5, 60, "requests served before any fault")
        t0 = time.monotonic()
        time.sleep(5)
        baseline = load.since(t0)
        rows.append({"fault": "(none, 5 s baseline)", "requests": len(baseline),
                     "failed": sum(not o.ok for o in baseline), "why": [], "errors_seen": 0, "codes_seen": [],
                     "hung_over_10s": sum(o.took > BUDGET for o in baseline),
                     "max_request_s": round(max((o.took for o in baseline), default=0.0), 2),
                     "first_ok_s": 0.0, "last_failure_s": 0.0, "whole_again_s": 0.0})

        fault(*kill("worker-a"))
        fault(*kill("router"))
        old_b_lease = lease_of("worker-b")
        fault("revoke worker-b's lease", lambda: revoke(etcd, old_b_lease),
              lambda: whole() and lease_of("worker-b") != old_b_lease)
        fault("restart NATS (down 2 s)", lambda: restart_service("nats", 2.0),
              lambda: whole() and served_since("nats"))
        fault("restart etcd (down 5 s)", lambda: restart_service("etcd", 5.0),
              lambda: whole() and served_since("etcd"))
    finally:
        load.stop.set()
        load.thread.join(60)
        pids = every_pid(env, NAME)
        launcher(["down", NAME], env, check=False, timeout=120)
        left = alive(pids)
        for ms in running.values():
            proctree.stop_tree(ms.pid, grace=5)
        report(rows, left, len(pids), load.outcomes)

    assert len(rows) == 6, "every fault ran"
    assert left == [], f"processes left after down: {left}"
    assert sum(r["hung_over_10s"] for r in rows) == 0, rows


def report(rows: list[dict[str, Any]], left: list[int], seen: int, outcomes: list[Outcome]) -> None:
    head = ("| fault | requests | failed (why) | errors seen, retried (codes) | >10 s | max s | "
            "first ok s | last failure s | whole again s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        why = f"{r['failed']}" + (f" ({', '.join(r['why'])})" if r["why"] else "")
        codes = f"{r['errors_seen']}" + (f" ({', '.join(r['codes_seen'])})" if r["codes_seen"] else "")
        lines.append(f"| {r['fault']} | {r['requests']} | {why} | {codes} | {r['hung_over_10s']} | "
                     f"{r['max_request_s']} | {r['first_ok_s']} | {r['last_failure_s']} | {r['whole_again_s']} |")
    total = len(outcomes)
    lines.append("")
    lines.append(f"all requests: {total}, failed: {sum(not o.ok for o in outcomes)}, "
                 f"over 10 s: {sum(o.took > BUDGET for o in outcomes)}; processes seen: {seen}, "
                 f"left after down: {len(left)}")
    text = "\n".join(lines)
    print("\n" + text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos-cpu.md").write_text(
        "# Chaos run (tests/test_chaos_e2e.py): 2 kv workers + prefix router, tiny-llama, 2 CPU cores\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")
    (out / "chaos-cpu.json").write_text(json.dumps({"rows": rows, "left": left, "seen": seen}, indent=1))
