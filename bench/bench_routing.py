"""Routing strategies side by side on real vLLM (CPU): prefix vs round_robin vs random.

    flock /tmp/vllm-e2e.lock python bench/bench_routing.py [--rounds 2] [--requests 24]

One deployment (launcher up, managed etcd and NATS on free ports): two kv workers of the demo model,
each capped with --num-gpu-blocks-override so that the workload's prefixes exceed one worker's
KV cache but fit in both, and three routers (one per strategy) reading the same KV events.

Workload per run: `--prefixes` long shared prefixes (~1k tokens each), `--requests` requests
each = one prefix + a short unique question, in a seeded shuffled order (a fixed A, B, C, D
order makes round robin look optimal by accident), sent one at a time. Every run uses prefixes
of its own, so no strategy inherits another's cached blocks; runs alternate strategies and
repeat `--rounds` times; the table shows medians.

Reported per strategy: prefix-cache hit rate from vLLM's own counters (prefix cache queries and
hits, relayed by the workers with their load), TTFT p50/p90, and the ratio against prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher import services as svc
from tests.helpers import DEMO_MODEL, Services, allow_vllm, up
from workers.common.protocol import GenerateRequest
from workers.kv_router import events as ev
from workers.runtime import requestplane

BLOCK = 32
COMPONENTS = {"prefix": "preprocess", "round_robin": "preprocess_rr", "random": "preprocess_random"}
WORDS = ["alpha", "beta", "gamma", "delta", "river", "mountain", "cloud", "stone", "garden", "window", "paper",
         "light", "shadow", "music", "number", "silver", "ocean", "forest", "engine", "signal", "market", "letter",
         "winter", "summer", "yellow", "purple", "orange", "violet"]


def topology(model: Path, blocks_per_worker: int) -> dict[str, Any]:
    return {
        "name": "bench-kv-routing",
        "backend": "subprocess",
        "model": str(model),
        "engine": {"max-model-len": 2048, "enforce-eager": True, "block-size": BLOCK,
                   "enable-prefix-caching": True, "num-gpu-blocks-override": blocks_per_worker},
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "workers": [{"name": "worker-a", "kind": "kv_worker", "cpus": "0", "ready_timeout": 400},
                    {"name": "worker-b", "kind": "kv_worker", "cpus": "1", "ready_timeout": 400}],
        "routers": [{"name": f"router-{s}", "strategy": s, "args": ["--component", c, "--seed", "7"]}
                    for s, c in COMPONENTS.items()],
    }


def prefix_text(rng: random.Random, words: int) -> str:
    return "Reference document. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n"


class Counters:
    """Latest cumulative prefix-cache counters per worker, from the workers' load reports."""

    def __init__(self) -> None:
        self.latest: dict[str, ev.Load] = {}

    async def on_load(self, msg: Any) -> None:
        load = msgspec.msgpack.decode(msg.data, type=ev.Load)
        self.latest[load.process] = load

    def totals(self) -> tuple[int, int]:
        return (sum(x.prefix_queries for x in self.latest.values()),
                sum(x.prefix_hits for x in self.latest.values()))


async def one(nc: Any, namespace: str, strategy: str, prompt: str, max_tokens: int) -> tuple[float, dict[str, Any]]:
    subject = requestplane.endpoint_subject(namespace, COMPONENTS[strategy], "generate")
    req = GenerateRequest(prompt=prompt, sampling={"max_tokens": max_tokens, "temperature": 0.0})
    t0 = time.perf_counter()
    ttft = None
    final: dict[str, Any] = {}
    async for item in requestplane.stream(nc, subject, req.model_dump(exclude_none=True), 60):
        if item.is_error():
            raise RuntimeError(item.comment)
        if ttft is None and (item.data or {}).get("token_ids"):
            ttft = time.perf_counter() - t0
        final = item.data or final
    return (ttft if ttft is not None else time.perf_counter() - t0), final


async def run_strategy(nc: Any, namespace: str, counters: Counters, strategy: str, seed: int,
                       args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(seed)
    prefixes = [prefix_text(rng, args.prefix_words) for _ in range(args.prefixes)]
    order = [i % args.prefixes for i in range(args.requests)]
    rng.shuffle(order)
    await asyncio.sleep(1.5)  # counters settle (load is published once a second)
    q0, h0 = counters.totals()
    ttfts = []
    cached = prompt_tokens = 0
    per_worker: dict[str, int] = {}
    for n, k in enumerate(order):
        ttft, final = await one(nc, namespace, strategy, prefixes[k] + f"Question {n}: what is item {n}?",
                                args.max_tokens)
        ttfts.append(ttft)
        cached += final.get("cached_tokens") or 0
        prompt_tokens += final.get("prompt_tokens") or 0
        w = final.get("routing", {}).get("process", "?")
        per_worker[w] = per_worker.get(w, 0) + 1
    await asyncio.sleep(2.5)
    q1, h1 = counters.totals()
    return {"hit_rate": (h1 - h0) / max(1, q1 - q0), "req_hit": cached / max(1, prompt_tokens),
            "ttft_p50": float(np.percentile(ttfts, 50)), "ttft_p90": float(np.percentile(ttfts, 90)),
            "split": per_worker}


async def bench(services: Services, namespace: str, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    nc = await requestplane.connect(services.nats, "bench-routing")
    counters = Counters()
    await nc.subscribe(ev.load_subject(namespace), cb=counters.on_load)
    try:
        for i in range(4):  # warm both engines up (first requests are slow)
            await one(nc, namespace, "round_robin", f"warm up {i}", 2)
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in COMPONENTS}
        strategies = list(COMPONENTS)
        for r in range(args.rounds):
            for s in (strategies if r % 2 == 0 else strategies[::-1]):
                res = await run_strategy(nc, namespace, counters, s, seed=1000 * r + len(results[s]) * 17
                                         + strategies.index(s), args=args)
                print(f"round {r + 1} {s:12} hit {res['hit_rate']:.2f} ttft p50 {res['ttft_p50'] * 1000:.0f} ms "
                      f"p90 {res['ttft_p90'] * 1000:.0f} ms split {res['split']}", flush=True)
                results[s].append(res)
        return results
    finally:
        await nc.close()


def main() -> None:
    allow_vllm()  # this benchmark starts vLLM (tests.helpers refuses that outside the e2e tier)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL)
    p.add_argument("--prefixes", type=int, default=4)
    p.add_argument("--prefix-words", type=int, default=900, help="~1 token per word with the demo model")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--blocks-per-worker", type=int, default=72,
                   help="KV blocks of 32 tokens per worker: 4 prefixes of ~29 blocks exceed one, fit in two")
    args = p.parse_args()
    # A `timeout` around the bench sends SIGTERM: exit through `finally` so the deployment goes down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    etcd_url, nats_url = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    started = [svc.start_etcd(etcd_url, tmp), svc.start_nats(nats_url, tmp)]
    env = {"ETCD_ENDPOINTS": etcd_url, "NATS_SERVER": nats_url, "LAUNCHER_HOME": str(tmp / "home")}
    services = Services(etcd=etcd_url, nats=nats_url, env=env)
    d = None
    try:
        t0 = time.perf_counter()
        d = up(tmp, topology(args.model, args.blocks_per_worker), services)
        print(f"deployment up in {time.perf_counter() - t0:.0f} s (logs under {tmp / 'home'})", flush=True)
        results = asyncio.run(bench(services, d.namespace, args))
    finally:
        if d is not None:
            d.down()
        svc.stop_services(started, grace=5)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("hit_rate", "req_hit", "ttft_p50", "ttft_p90")}
           for s, rs in results.items()}
    base = med["prefix"]
    print(f"\n{args.prefixes} prefixes x ~{args.prefix_words} words, {args.requests} requests/run, "
          f"{args.rounds} rounds, {args.blocks_per_worker} blocks x {BLOCK} tokens per worker; medians")
    print(f"{'strategy':12} {'vLLM hit rate':>14} {'req cached':>11} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} "
          f"{'p50 / prefix':>13}")
    for s, m in med.items():
        print(f"{s:12} {m['hit_rate']:>14.2f} {m['req_hit']:>11.2f} {m['ttft_p50'] * 1000:>12.0f} "
              f"{m['ttft_p90'] * 1000:>12.0f} {m['ttft_p50'] / base['ttft_p50']:>13.2f}")


if __name__ == "__main__":
    main()
