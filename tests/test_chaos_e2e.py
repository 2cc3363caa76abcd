"""Chaos: streaming load through a frontend + 2 KV router replicas + 2 workers while faults are injected.

Real launcher, real vLLM CPU workers (models/tiny-llama), real etcd and nats-server that this test
starts itself (so it can restart them). A load generator (2 paced clients, in a thread with its own
event loop) streams completions over HTTP through the frontend the whole time, greedy, each prompt one
of a fixed set whose unfaulted answer is recorded first; the script then

    kills worker-a (-9) mid-stream | kills worker-b's EngineCore only | restarts the workers one at a
    time (`launcher restart --rolling`) | kills router-1 (-9; router-2 serves on) | revokes worker-b's lease |
    restarts NATS | restarts etcd | `launcher down` under load

and after each waits (with a deadline) until the deployment is whole again. Counted per fault:
requests, those that failed (and why), streams migrated to another worker (the frontend's
`vllm_launcher_frontend_migrations_total`), answers that differ from the unfaulted run (must be 0),
requests over 10 s (must be 0), the time until requests succeed again and until the topology is
whole. After `down`: every stream ended (completed or with an error event) within the drain timeout,
and no process is left. The table is printed and written to bench/results/chaos-cpu.md.

The load generator retries a request answered 503 (nothing could take it yet), within the request's
10 s budget, as an OpenAI client does with Retry-After; both the errors it saw and the requests that
failed in the end are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from launcher import proctree
from launcher import services as svc
from launcher.services import free_port, free_port_block
from launcher.state import RunDir
from tests.helpers import CPU_ENGINE, CPU_ENV, KV_WORKER, ROOT, Services, launcher, wait_until, write_topology
from tests.test_supervisor_e2e import alive, every_pid
from workers.runtime.registry import Registry

pytestmark = pytest.mark.timeout(1800)

NAME = "chaos"
BUDGET = 10.0  # a request with no outcome after this long is hung
CLIENTS = 2
PACE = 0.25  # seconds each client pauses between requests
PROMPTS = 8  # distinct prompts, each answered once without faults first
MAX_TOKENS = 96  # long enough that a fault usually finds streams in flight
DRAIN_TIMEOUT = 10.0


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    prompt: int = -1
    tokens: list[int] = field(default_factory=list)  # the streamed token ids (vLLM's return_token_ids)
    codes: list[str] = field(default_factory=list)  # every error seen, retried or final
    final: str = ""  # the error that ended it ("" when ok)

    @property
    def took(self) -> float:
        return self.ended - self.started


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(16, 80))] for _ in range(PROMPTS)]


class Load:
    """CLIENTS loops streaming completions through the frontend until stopped, PACE apart."""

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self.prompts = prompts()
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(BUDGET * 3)) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(CLIENTS)))

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            k = rng.randrange(PROMPTS)
            t0 = time.monotonic()
            try:
                out = await asyncio.wait_for(self.one(http, k, t0), BUDGET * 3)
            except asyncio.TimeoutError:
                out = Outcome(t0, time.monotonic(), False, k, codes=["hung"], final="hung")
            self.outcomes.append(out)
            # Paced, not back to back: a restarting vLLM needs the CPU too (2 cores in CI).
            await asyncio.sleep(PACE)

    async def one(self, http: httpx.AsyncClient, k: int, t0: float) -> Outcome:
        codes: list[str] = []
        body = {"model": self.model, "prompt": self.prompts[k], "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": True}
        while True:
            tokens: list[int] = []
            error = None
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        error = f"http {r.status_code}"
                        await r.aread()
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                error = f"error event: {event['error'].get('type')}"
                                break
                            for choice in event.get("choices", []):
                                tokens += choice.get("token_ids") or []
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}"
            if error is None:
                return Outcome(t0, time.monotonic(), True, k, tokens, codes)
            codes.append(error)
            # Only "nothing could take it yet" is worth asking again; a broken stream is a failure.
            if error not in ("http 503", "ConnectError") or time.monotonic() - t0 > BUDGET - 1:
                return Outcome(t0, time.monotonic(), False, k, tokens, codes, error)
            await asyncio.sleep(0.5)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.ended >= t]


def registrations(etcd: str, namespace: str) -> list[Any]:
    async def run() -> list[Any]:
        registry = await Registry.connect([etcd])
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


def migrations(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.search(r"^vllm_launcher_frontend_migrations_total (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


def engine_core_of(pid: int) -> psutil.Process:
    """The EngineCore child of a worker (vLLM names the process VLLM::EngineCore)."""
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
    raise AssertionError(f"no EngineCore under pid {pid}")


def topology(model: Path, s: Services, port: int) -> dict[str, Any]:
    return {
        "name": NAME, "backend": "subprocess", "model": str(model),
        "services": {"etcd": s.etcd, "nats": s.nats, "managed": "never"},
        "engine": {**CPU_ENGINE, "block-size": 32, "enable-prefix-caching": True},
        "env": CPU_ENV,
        # ready_timeout 400: under this load a restarted worker needs 80-215 s to register (20 s idle). Cause,
        # seen with py-spy: vLLM's shm_broadcast readers busy-loop (sched_yield) for 1 s after every read, so
        # the serving worker's VLLM::Worker holds its core at 70-100% even under paced load, and the
        # restarting worker's three processes import torch and vLLM one after another on what is left.
        # A missed ready_timeout would cost a restart; the rolling restart counts that as not coming back.
        "workers": [{"name": "worker-a", "kind": KV_WORKER.name, "cpus": "0", "ready_timeout": 400,
                     "drain_timeout": DRAIN_TIMEOUT},
                    {"name": "worker-b", "kind": KV_WORKER.name, "cpus": "1", "ready_timeout": 400,
                     "drain_timeout": DRAIN_TIMEOUT}],
        # Two replicas (router-1, router-2), as issue 24 asks: killing one under load fails no request.
        "routers": [{"name": "router", "strategy": "prefix", "replicas": 2, "drain_timeout": DRAIN_TIMEOUT}],
        "frontends": [{"name": "frontend", "port": port, "request_timeout": 5.0, "drain_timeout": DRAIN_TIMEOUT}],
        "metrics_port_base": free_port_block(16),  # never the default ports another deployment may hold
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
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    path = write_topology(tmp_path / "chaos.yaml", topology(tiny_model, s, port))
    rows: list[dict[str, Any]] = []
    load = Load(url, str(tiny_model))
    reference: dict[int, list[int]] = {}
    pids: dict[int, float] = {}

    def pid_of(name: str) -> int:
        return int(rd.state()["processes"][name]["pid"])

    def whole() -> bool:
        """Every process ready in the supervisor's view and registered under its current pid."""
        procs = rd.state()["processes"]
        regs = {r.process: r for r in registrations(etcd, NAME)}
        return all(p["state"] == "ready" and p["pid"] and regs.get(n) is not None and regs[n].pid == p["pid"]
                   for n, p in procs.items())

    def row(label: str, window: list[Outcome], t: float, back: float, migrated: int) -> dict[str, Any]:
        failed = [o for o in window if not o.ok]
        ok_after = [o.ended - t for o in window if o.ok and o.started >= t]
        return {
            "fault": label, "requests": len(window), "failed": len(failed),
            "why": sorted({o.final for o in failed}), "migrated": migrated,
            "differ": sum(o.ok and o.tokens != reference[o.prompt] for o in window),
            "errors_seen": sum(len(o.codes) for o in window),
            "codes_seen": sorted({c for o in window for c in o.codes}),
            "hung_over_10s": sum(o.took > BUDGET for o in window),
            "max_request_s": round(max((o.took for o in window), default=0.0), 2),
            "first_ok_s": round(min(ok_after, default=float("nan")), 2),
            "last_failure_s": round(max((o.ended - t for o in failed), default=0.0), 2),
            "whole_again_s": round(back, 2),
        }

    def fault(label: str, act: Any, whole_again: Any, settle: float = 8.0) -> dict[str, Any]:
        before = {id(o) for o in load.outcomes}
        moved = migrations(url)
        t = time.monotonic()
        act()
        try:
            wait_until(whole_again, 600, f"the deployment whole again after: {label}")
        except AssertionError as exc:  # say where it stuck
            raise AssertionError(f"{exc}; processes: {json.dumps(rd.state()['processes'])[:4000]}") from None
        back = time.monotonic() - t
        time.sleep(settle)  # requests keep flowing on the whole deployment
        window = [o for o in load.since(t) if id(o) not in before]
        rows.append(row(label, window, t, back, migrations(url) - moved))
        return rows[-1]

    back_at: dict[str, float] = {}

    def restart_service(kind: str, pause: float) -> None:
        old = running[kind]
        proctree.stop_tree(old.pid, grace=5)
        time.sleep(pause)
        running[kind] = svc.start_etcd(etcd, work) if kind == "etcd" else svc.start_nats(nats, work)
        back_at[kind] = time.monotonic()

    def served_since(kind: str) -> bool:
        return any(o.ok and o.started >= back_at[kind] for o in list(load.outcomes))

    def running_on(name: str) -> float:
        """Requests `name` serves now: an engine's own gauge on its metrics port; for a router (no engine,
        and out of the token path), the frontend's streams in flight: requests are arriving to be routed."""
        ports = next(p["ports"] for p in rd.plan()["processes"] if p["name"] == name)
        gauge = "vllm:num_requests_running" if "metrics" in ports else "vllm_launcher_frontend_inflight_requests"
        where = f"http://127.0.0.1:{ports['metrics']}" if "metrics" in ports else url
        text = httpx.get(f"{where}/metrics", timeout=5).text
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(gauge)}\{{[^}}]*\}} (\S+)$", text, re.M))

    def streaming(name: str) -> None:
        """Wait until `name` is generating for a client, so that the fault lands mid-stream. If it is not
        within 60 s (the prefix router may keep the load on the other worker; on 2 busy cores a worker's
        metrics port may not answer in time), the fault lands anyway and says so: the row then shows no
        migration, and "0 failed" is still checked."""
        try:
            wait_until(lambda: running_on(name) >= 1, 60, f"{name} generating", every=0.02)
        except AssertionError as exc:
            print(f"chaos: the fault on {name} lands without a stream seen on it ({exc})")

    def kill(name: str) -> tuple[str, Any, Any]:
        """The fault, and its end: that process back under a new pid, and the deployment whole."""
        old = pid_of(name)

        def act() -> None:
            streaming(name)
            os.kill(old, signal.SIGKILL)

        return f"kill -9 {name}", act, lambda: pid_of(name) != old and whole()

    def kill_engine(name: str) -> tuple[str, Any, Any]:
        old = pid_of(name)
        core = engine_core_of(old)

        def act() -> None:
            streaming(name)
            core.kill()

        return f"kill -9 {name}'s EngineCore only", act, lambda: pid_of(name) != old and whole()

    def lease_of(name: str) -> int:
        return int(next(r.lease_id for r in registrations(etcd, NAME) if r.process == name))

    def rolling_restart() -> tuple[str, Any, Any]:
        olds = {n: pid_of(n) for n in ("worker-a", "worker-b")}
        done: list[Any] = []

        def act() -> None:
            done.append(launcher(["restart", NAME, "--rolling"], env, timeout=900))

        return ("launcher restart --rolling (both workers)", act,
                lambda: bool(done) and all(pid_of(n) != p for n, p in olds.items()) and whole())

    try:
        launcher(["up", str(path), "--timeout", "400"], env, timeout=450)
        wait_until(whole, 60, "the deployment whole after up")
        # The unfaulted answer of every prompt, one at a time, before any load.
        for k in range(PROMPTS):
            async def ask(k: int = k) -> Outcome:
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    return await load.one(http, k, time.monotonic())
            first = asyncio.run(ask())
            assert first.ok and len(first.tokens) == MAX_TOKENS, first
            reference[k] = first.tokens
        load.thread.start()
        wait_until(lambda: sum(o.ok for o in load.outcomes) >= 5, 60, "requests served before any fault")
        t0 = time.monotonic()
        time.sleep(5)
        rows.append(row("(none, 5 s baseline)", load.since(t0), t0, 0.0, 0))

        killed = fault(*kill("worker-a"))
        engine = fault(*kill_engine("worker-b"))
        rolling = fault(*rolling_restart())
        router = fault(*kill("router-1"))
        old_b_lease = lease_of("worker-b")
        fault("revoke worker-b's lease", lambda: revoke(etcd, old_b_lease),
              lambda: whole() and lease_of("worker-b") != old_b_lease)
        fault("restart NATS (down 2 s)", lambda: restart_service("nats", 2.0),
              lambda: whole() and served_since("nats"))
        fault("restart etcd (down 5 s)", lambda: restart_service("etcd", 5.0),
              lambda: whole() and served_since("etcd"))
        # Last: `down` under load. Streams in flight end, completed or with an error event, within the
        # drain timeout; what starts after finds nobody listening (not a hang).
        pids = every_pid(env, NAME)
        streaming("frontend")  # streams are in flight when `down` begins
        in_flight_at = time.monotonic()
        before = {id(o) for o in load.outcomes}
        launcher(["down", NAME], env, timeout=120)
        down_took = time.monotonic() - in_flight_at
        load.stop.set()
        load.thread.join(60)  # each client ends its request (the streams in flight ended with `down`)
        ended = [o for o in load.since(in_flight_at) if id(o) not in before and o.started < in_flight_at]
        rows.append(row("launcher down under load (streams in flight)", ended, in_flight_at, down_took, 0))
    finally:
        load.stop.set()
        if load.thread.ident is not None:
            load.thread.join(60)
        pids = pids or every_pid(env, NAME)
        launcher(["down", NAME], env, check=False, timeout=120)
        left = alive(pids)
        for ms in running.values():
            proctree.stop_tree(ms.pid, grace=5)
        report(rows, left, len(pids), load.outcomes)

    assert len(rows) == 9, "every fault ran"
    assert left == [], f"processes left after down: {left}"
    assert sum(r["hung_over_10s"] for r in rows) == 0, rows
    assert sum(r["differ"] for r in rows) == 0, "a stream's tokens differ from the unfaulted run"
    assert killed["failed"] == 0, killed  # migrated, not failed
    assert engine["last_failure_s"] <= 2.0, engine  # replaced; nothing fails after 2 s
    assert rolling["failed"] == 0, rolling
    # The streams router-1 handed off go on (their workers answer the frontend directly); requests it was
    # routing when killed are sent again, to router-2, before their first token.
    assert router["failed"] == 0, router
    down = rows[-1]
    assert down["max_request_s"] <= DRAIN_TIMEOUT + 5, down  # every stream ended, none hung


def report(rows: list[dict[str, Any]], left: list[int], seen: int, outcomes: list[Outcome]) -> None:
    head = ("| fault | requests | failed (why) | migrated | differ | errors seen (codes) | >10 s | max s | "
            "first ok s | last failure s | whole again s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        why = f"{r['failed']}" + (f" ({', '.join(r['why'])})" if r["why"] else "")
        codes = f"{r['errors_seen']}" + (f" ({', '.join(r['codes_seen'])})" if r["codes_seen"] else "")
        lines.append(f"| {r['fault']} | {r['requests']} | {why} | {r['migrated']} | {r['differ']} | {codes} | "
                     f"{r['hung_over_10s']} | {r['max_request_s']} | {r['first_ok_s']} | {r['last_failure_s']} | "
                     f"{r['whole_again_s']} |")
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
        "# Chaos run (tests/test_chaos_e2e.py): frontend + 2 prefix router replicas + 2 kv workers, tiny-llama, "
        "2 CPU cores\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{text}\n")
    (out / "chaos-cpu.json").write_text(json.dumps({"rows": rows, "left": left, "seen": seen}, indent=1))
