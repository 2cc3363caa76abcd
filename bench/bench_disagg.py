"""1P1D disaggregated serving vs one monolithic worker, side by side in one run, on the CPU.

    flock /tmp/vllm-e2e.lock python bench/bench_disagg.py [--model DIR] [--rounds 3] [--requests 4]
        [--max-tokens 24] [--filler 6] [--concurrency 1 2]

What it measures: the cost of the hand-off (a NATS round trip to the prefill worker, the prefill's
KV written to shared storage as safetensors by ExampleConnector and read back by the decode worker),
not a speed-up. On 2 CPU cores the prefill and decode engines share the same cores, so the
interference that disaggregation removes on GPUs does not go away here; on GPUs the connector is
NixlConnector and the numbers would say something else entirely.

One deployment holds all three engines (prefill, decode, and a monolithic worker of the same model,
flags and prompts), so both contenders see the same idle neighbours. Contenders alternate per round
(order flipped each round), every prompt is new to every engine (a unique prefix: no prefix-cache
hits), ignore_eos makes every request produce exactly --max-tokens tokens. Reports medians over
rounds and the ratio 1P1D / monolith. Nothing is asserted.

Cores: each engine gets one OpenMP thread on one core (prefill core 0, decode core 1, monolith core 1).
Unbound, three engines' OpenMP threads fight over 2 cores and everything is ~10x slower and noisy.
A monolithic request runs on one core; a disaggregated one runs its prefill on core 0 and its decode
on core 1, so with concurrency > 1 the pair can overlap one request's prefill with another's decode:
that, not the hand-off, is the only thing disaggregation can win here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from workers.common.protocol import GenerateRequest  # noqa: E402
from workers.runtime import requestplane  # noqa: E402

FILLER = ("The museum's archive lists paintings, letters, maps and coins collected over two centuries by "
          "travellers, merchants and scholars, each catalogued with its origin, date and condition. ")


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    cached: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    local_prefills: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


async def one(nc: requestplane.NATS, subject: str, req: GenerateRequest, run: Run) -> None:
    start = time.perf_counter()
    first: float | None = None
    async for item in requestplane.stream(nc, subject, req.model_dump(exclude_none=True), idle_timeout=30):
        if item.is_error():
            raise RuntimeError(f"{subject}: {item.comment}")
        chunk = item.data or {}
        if chunk.get("token_ids") and first is None:
            first = time.perf_counter() - start
        run.tokens += len(chunk.get("token_ids") or [])
        if chunk.get("finish_reason") is not None:
            run.cached.append(int(chunk.get("cached_tokens") or 0))
            run.prompt_tokens.append(int(chunk.get("prompt_tokens") or 0))
            run.local_prefills += chunk.get("prefill_worker") == "local"
    run.ttft.append(first if first is not None else float("nan"))


async def contender(nats: str, namespace: str, component: str, reqs: list[GenerateRequest],
                    concurrency: int) -> Run:
    nc = await requestplane.connect(nats, "bench")
    run = Run()
    sem = asyncio.Semaphore(concurrency)
    subject = requestplane.endpoint_subject(namespace, component, "generate")

    async def bounded(req: GenerateRequest) -> None:
        async with sem:
            await one(nc, subject, req, run)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(bounded(r) for r in reqs))
        run.wall = time.perf_counter() - start
    finally:
        await nc.close()
    return run


def requests(n: int, filler: int, max_tokens: int) -> list[GenerateRequest]:
    """Unique first words, so no engine finds any of it in its prefix cache."""
    tag = uuid.uuid4().hex[:8]
    return [GenerateRequest(messages=[{"role": "user", "content": f"[{tag}-{i}] " + FILLER * filler
                                       + "Summarise the archive in one paragraph."}],
                            sampling={"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            for i in range(n)]


def launcher(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "launcher.cli", *args], env={**os.environ, **env}, check=True, cwd=ROOT)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=4, help="requests per contender per round")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--filler", type=int, default=6, help="repeats of a ~35-token sentence in each prompt")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-disagg-"))
    etcd, nats = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    started = [svc.start_etcd(etcd, work), svc.start_nats(nats, work)]
    env = {"ETCD_ENDPOINTS": etcd, "NATS_SERVER": nats, "LAUNCHER_HOME": str(work / "home")}
    kv = {"kv_connector": "ExampleConnector", "kv_parallel_size": 2}
    topo = {"name": "bench-disagg", "model": args.model, "engine": {"max-model-len": 2048, "enforce-eager": True},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "workers": [
                {"name": "prefill", "kind": "prefill", "kv_transfer": {**kv, "kv_role": "kv_producer", "kv_rank": 0},
                 "env": {"VLLM_CPU_OMP_THREADS_BIND": "0"}},
                {"name": "decode", "kind": "decode", "kv_transfer": {**kv, "kv_role": "kv_consumer", "kv_rank": 1},
                 "env": {"VLLM_CPU_OMP_THREADS_BIND": "1"}},
                # env, not `cpus:`: the launcher (rightly) refuses a core given to two workers.
                {"name": "vllm", "kind": "monolith", "env": {"VLLM_CPU_OMP_THREADS_BIND": "1"}}]}
    path = work / "bench-disagg.yaml"
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    results: dict[tuple[str, int], list[Run]] = {}
    try:
        launcher(["up", str(path)], env)
        # Warm-up: the first request of an engine pays one-off costs.
        for component in ("vllm", "decode"):
            asyncio.run(contender(nats, "bench-disagg", component, requests(2, args.filler, 4), 1))
        for conc in args.concurrency:
            for r in range(args.rounds):
                order = ("vllm", "decode") if r % 2 == 0 else ("decode", "vllm")
                for component in order:
                    run = asyncio.run(contender(nats, "bench-disagg", component,
                                                requests(args.requests, args.filler, args.max_tokens), conc))
                    results.setdefault((component, conc), []).append(run)
                    print(f"  conc {conc} round {r + 1} {component:6}: ttft median {median(run.ttft) * 1000:7.1f} ms,"
                          f" {run.tokens_per_s:6.1f} tok/s", flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "launcher.cli", "down", "bench-disagg"], env={**os.environ, **env},
                       cwd=ROOT, capture_output=True)
        svc.stop_services(started, grace=5)
    report(results, args)


def report(results: dict[tuple[str, int], list[Run]], args: Any) -> None:
    print(f"\n1P1D (ExampleConnector, shared storage) vs monolith, {Path(args.model).name}, CPU; "
          f"{args.requests} requests x {args.rounds} rounds, {args.max_tokens} output tokens each; "
          "medians over rounds. This is hand-off overhead on CPU, not a speed-up.")
    head = (f"{'conc':>4} | {'mono TTFT ms':>12} {'1P1D TTFT ms':>12} {'ratio':>6} | {'mono tok/s':>10} "
            f"{'1P1D tok/s':>10} {'ratio':>6} | {'prompt tok':>10} {'KV loaded':>9} {'local pf':>8}")
    print(head)
    print("-" * len(head))
    for conc in args.concurrency:
        mono, pd = results.get(("vllm", conc), []), results.get(("decode", conc), [])
        m_ttft = median([median(r.ttft) for r in mono]) * 1000
        p_ttft = median([median(r.ttft) for r in pd]) * 1000
        m_tps = median([r.tokens_per_s for r in mono])
        p_tps = median([r.tokens_per_s for r in pd])
        prompt = median([float(x) for r in pd for x in r.prompt_tokens])
        loaded = median([float(x) for r in pd for x in r.cached])
        local = sum(r.local_prefills for r in pd)
        print(f"{conc:>4} | {m_ttft:12.1f} {p_ttft:12.1f} {p_ttft / m_ttft:6.2f} | {m_tps:10.1f} {p_tps:10.1f} "
              f"{p_tps / m_tps:6.2f} | {prompt:10.0f} {loaded:9.0f} {local:8d}")


if __name__ == "__main__":
    main()
