"""TTFT and throughput of one request set, through our worker (NATS) or against in-process AsyncLLM.

    # a deployment that is up (worker + NATS + our client):
    python bench/gpu/bench_gpu_serving.py nats --nats URL --namespace NS --component vllm --out a.json
    # the same engine flags in this process (no NATS, no worker): the floor our transport adds to
    python bench/gpu/bench_gpu_serving.py inprocess --model DIR --engine '{"max-model-len": 4096}' --out b.json
    # greedy token ids of the probe prompts (the reference the 1P1D run compares against)
    python bench/gpu/bench_gpu_serving.py greedy --model DIR --engine '{...}' --out ref.json

Both sides send the same seeded requests (token-id prompts, ignore_eos, fixed max_tokens) in waves
of --concurrency, after --warmup requests that are not counted, and report the same figures:
TTFT p50/p90 (first chunk that carries tokens), request latency p50, output tokens/s over the
measured wall time. Why token ids: the random test models' tokenizer must not shape the load.
Side by side in one run (run_gpu.sh); the ratio is what matters, never an absolute threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Probe prompts for greedy equality checks (text: exercises the tokenizer path every client uses).
PROBES = [
    "the quick brown fox jumps over the lazy dog. " * 8,
    "what is the capital of france? paris is the capital of france. " * 12,
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ " * 20,
    "a tiny random llama for fast tests of the launcher, workers and router. " * 30,
]
PROBE_TOKENS = 48

Stream = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


def make_requests(n: int, prompt_len: int, max_tokens: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"request_id": f"bench-{seed}-{k}",
             "token_ids": [rng.randrange(3, vocab) for _ in range(prompt_len)],
             "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
            for k in range(n)]


def probe_requests() -> list[dict[str, Any]]:
    return [{"request_id": f"probe-{k}", "prompt": p,
             "sampling": {"max_tokens": PROBE_TOKENS, "temperature": 0.0, "ignore_eos": True}}
            for k, p in enumerate(PROBES)]


async def timed(stream: Stream, req: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    final: dict[str, Any] = {}
    async for chunk in stream(req):
        if chunk.get("token_ids"):
            if ttft is None:
                ttft = time.perf_counter() - t0
            tokens += len(chunk["token_ids"])
        if chunk.get("finish_reason") is not None or "prompt_tokens" in chunk:
            final = chunk
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens,
            "cached_tokens": final.get("cached_tokens")}


async def run_load(stream: Stream, requests: list[dict[str, Any]], concurrency: int, warmup: int
                   ) -> dict[str, Any]:
    for req in requests[:warmup]:
        await timed(stream, {**req, "request_id": req["request_id"] + "-warm"})
    measured = requests[warmup:]
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(0, len(measured), concurrency):
        results += await asyncio.gather(*(timed(stream, r) for r in measured[i:i + concurrency]))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    lat = sorted(r["latency"] for r in results)
    toks = sum(r["tokens"] for r in results)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else None

    return {"requests": len(results), "concurrency": concurrency, "wall_s": round(wall, 3),
            "output_tokens": toks, "tokens_per_s": round(toks / wall, 1) if wall else None,
            "ttft_ms_p50": pct(ttfts, 0.5), "ttft_ms_p90": pct(ttfts, 0.9),
            "latency_ms_p50": round(statistics.median(lat) * 1000, 2) if lat else None,
            "missing_ttft": len(results) - len(ttfts)}


async def collect_greedy(stream: Stream) -> list[dict[str, Any]]:
    out = []
    for req in probe_requests():
        ids: list[int] = []
        final: dict[str, Any] = {}
        async for chunk in stream(req):
            ids += chunk.get("token_ids") or []
            if chunk.get("finish_reason") is not None:
                final = chunk
        out.append({"prompt": req["prompt"][:40], "token_ids": ids,
                    **{k: final.get(k) for k in ("prompt_tokens", "cached_tokens", "worker", "prefill_worker")}})
    return out


# ---- the two sides ---------------------------------------------------------------------------


async def nats_side(args: argparse.Namespace) -> dict[str, Any]:
    from workers.runtime import requestplane

    nc = await requestplane.connect(args.nats, "bench-gpu")
    subject = requestplane.endpoint_subject(args.namespace, args.component, "generate")

    async def stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in requestplane.stream(nc, subject, req, args.idle_timeout):
            if item.is_error():
                raise RuntimeError(f"worker error: {item.comment or item.data}")
            yield item.data or {}

    try:
        return await run_all(args, stream)
    finally:
        await nc.close()


async def inprocess_side(args: argparse.Namespace) -> dict[str, Any]:
    from launcher.plan import flags_to_argv
    from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser

    parser = make_parser("in-process AsyncLLM")
    eargs = parser.parse_args(["--model", args.model, *flags_to_argv(json.loads(args.engine))])
    engine = build_engine(engine_args_from(eargs))
    handler = EngineHandler(engine, "inprocess")

    async def stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in handler.generate(req):
            yield dict(chunk)

    try:
        return await run_all(args, stream)
    finally:
        engine.shutdown()


async def run_all(args: argparse.Namespace, stream: Stream) -> dict[str, Any]:
    result: dict[str, Any] = {"side": args.side}
    if args.side == "greedy" or args.greedy:
        result["greedy"] = await collect_greedy(stream)
    if args.side != "greedy":
        reqs = make_requests(args.requests + args.warmup, args.prompt_len, args.max_tokens, args.vocab, args.seed)
        result["load"] = await run_load(stream, reqs, args.concurrency, args.warmup)
        result["load"].update(prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=["nats", "inprocess", "greedy"])
    p.add_argument("--nats", help="NATS URL (side nats)")
    p.add_argument("--namespace", help="deployment namespace (side nats)")
    p.add_argument("--component", default="vllm")
    p.add_argument("--model", help="model folder (sides inprocess, greedy)")
    p.add_argument("--engine", default="{}", help="vLLM flags as the topology's engine: JSON object")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=400, help="token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="also collect the probes' greedy token ids")
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    side = nats_side if args.side == "nats" else inprocess_side
    result = asyncio.run(side(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("load", {})))


if __name__ == "__main__":
    main()
