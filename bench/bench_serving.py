"""Serving overhead of worker + NATS + client, side by side with the same engine in-process and `vllm serve`.

    python bench/bench_serving.py [--model DIR] [--requests 16] [--max-tokens 64] [--concurrency 1 8]

One CPU engine keeps both cores busy, so the contenders run one after another in one run, on the
same model, flags and prompts (ignore_eos: every request yields exactly --max-tokens tokens).
Also measured: `launcher up` to ready minus the engine's own start-up, `status` latency, `down` time.
Prints a table of ratios against in-process; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from workers.common.protocol import GenerateRequest  # noqa: E402
from workers.runtime import requestplane  # noqa: E402

ENGINE_FLAGS = {"max-model-len": 2048, "enforce-eager": True}
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts(n: int) -> list[str]:
    topics = ["the history of paris", "how rivers form", "why the sky is blue", "the rules of chess",
              "how bread rises", "the life of bees", "what makes music sad", "how ships float"]
    return [f"Write a long essay about {topics[i % len(topics)]}, part {i}." for i in range(n)]


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def pct(self, q: float) -> float:
        s = sorted(self.ttft)
        return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def run_load(one: Any, texts: list[str], concurrency: int, max_tokens: int) -> Result:
    """`one(prompt)` returns (ttft seconds, tokens); at most `concurrency` in flight."""
    res = Result()
    sem = asyncio.Semaphore(concurrency)

    async def task(text: str) -> None:
        async with sem:
            ttft, toks = await one(text, max_tokens)
            res.ttft.append(ttft)
            res.tokens += toks

    t0 = time.perf_counter()
    await asyncio.gather(*(task(t) for t in texts))
    res.wall = time.perf_counter() - t0
    return res


# --- contender 1: AsyncLLM in this process ---------------------------------------------------
async def bench_inprocess(model: str, args: argparse.Namespace) -> tuple[dict[int, Result], float]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, max_model_len=2048, enforce_eager=True))
    startup = time.perf_counter() - t0

    async def one(text: str, max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        start = time.perf_counter()
        ttft, n = 0.0, 0
        async for out in engine.generate(text, params, uuid.uuid4().hex):
            if n == 0 and out.outputs[0].token_ids:
                ttft = time.perf_counter() - start
            n += len(out.outputs[0].token_ids)
        return ttft, n

    results = await measure(one, args)
    engine.shutdown()
    return results, startup


# --- contender 2: our worker through the launcher, NATS and the client's stream -------------
async def nats_one(nc: Any, subject: str, text: str, max_tokens: int) -> tuple[float, int]:
    req = GenerateRequest(prompt=text, sampling={"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    start = time.perf_counter()
    ttft, n = 0.0, 0
    async for item in requestplane.stream(nc, subject, req.model_dump(exclude_none=True)):
        if item.is_error():
            raise RuntimeError(item.comment)
        toks = len(item.data.get("token_ids", []))
        if n == 0 and toks:
            ttft = time.perf_counter() - start
        n += toks
    return ttft, n


def launcher_cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "launcher.cli", *args], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, out.stdout


async def bench_worker(model: str, args: argparse.Namespace, tmp: Path) -> tuple[dict[int, Result], dict[str, float]]:
    etcd, nats = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    topo = {"name": "bench-serving", "model": model, "engine": ENGINE_FLAGS, "services": {"etcd": etcd, "nats": nats},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "workers": [{"name": "vllm", "ready_timeout": 600}]}
    path = tmp / "bench-serving.yaml"
    path.write_text(yaml.safe_dump(topo))
    env = {"LAUNCHER_HOME": str(tmp / "home")}
    up_s, _ = launcher_cli(["up", str(path)], env)
    status_s = statistics.median(launcher_cli(["status", "bench-serving"], env)[0] for _ in range(5))
    status_json_s = statistics.median(launcher_cli(["status", "bench-serving", "--json"], env)[0] for _ in range(5))
    state = json.loads((tmp / "home" / "bench-serving" / "state.json").read_text())["processes"]["vllm"]
    worker_log = (tmp / "home" / "bench-serving" / "logs" / "vllm.log").read_text()
    nc = await requestplane.connect(nats, "bench")
    subject = requestplane.endpoint_subject("bench-serving", "vllm", "generate")
    try:
        results = await measure(lambda text, mt: nats_one(nc, subject, text, mt), args)
    finally:
        await nc.close()
    down_s, _ = launcher_cli(["down", "bench-serving"], env)
    engine_s = _engine_init_seconds(worker_log)
    return results, {"up_s": up_s, "process_to_ready_s": state["ready_at"] - state["started_at"],
                     "engine_init_s": engine_s, "status_s": status_s, "status_json_s": status_json_s,
                     "down_s": down_s}


def _engine_init_seconds(log: str) -> float:
    """vLLM logs `init engine (profile, create kv cache, warmup model) took X seconds`."""
    for line in log.splitlines():
        if "init engine" in line and "took" in line:
            return float(line.rsplit("took", 1)[1].split()[0])
    return float("nan")


# --- contender 3: vllm serve (OpenAI API, streaming) ----------------------------------------
async def bench_vllm_serve(model: str, args: argparse.Namespace, tmp: Path) -> dict[int, Result]:
    port = svc.free_port()
    log = (tmp / "vllm-serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "vllm_serve_shim.py"), "serve", model,
                             "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
                             ],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited; see {log.name}")
                try:
                    async with http.get(f"{base}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)

            async def one(text: str, max_tokens: int) -> tuple[float, int]:
                body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                start = time.perf_counter()
                ttft, n = 0.0, 0
                async with http.post(f"{base}/v1/completions", json=body) as resp:
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0].get("text") and not ttft:
                            ttft = time.perf_counter() - start
                        if chunk.get("usage"):
                            # Tokens as the server counted them (an SSE event may carry several).
                            n = int(chunk["usage"]["completion_tokens"])
                return ttft, n

            return await measure(one, args)
    finally:
        from launcher.proctree import stop_tree

        stop_tree(proc.pid, grace=10)


async def measure(one: Any, args: argparse.Namespace) -> dict[int, Result]:
    await run_load(one, prompts(2), 2, 8)  # warm-up
    return {c: await run_load(one, prompts(args.requests), c, args.max_tokens) for c in args.concurrency}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    inproc, engine_startup = asyncio.run(bench_inprocess(args.model, args))
    worker, launch = asyncio.run(bench_worker(args.model, args, tmp))
    serve = asyncio.run(bench_vllm_serve(args.model, args, tmp))
    print(f"\nmodel {Path(args.model).name}, {args.requests} requests x {args.max_tokens} tokens per concurrency\n")
    header = ["conc", "contender", "tok/s", "ratio", "TTFT p50", "ratio", "TTFT p90", "ratio"]
    print(f"{header[0]:>4} {header[1]:<22} {header[2]:>8} {header[3]:>6} {header[4]:>9} {header[5]:>6} "
          f"{header[6]:>9} {header[7]:>6}")
    for c in args.concurrency:
        base = inproc[c]
        for label, r in (("in-process AsyncLLM", inproc[c]), ("worker+NATS+client", worker[c]),
                         ("vllm serve (OpenAI)", serve[c])):
            print(f"{c:>4} {label:<22} {r.throughput:>8.1f} {r.throughput / base.throughput:>6.3f} "
                  f"{r.pct(0.5) * 1000:>7.1f}ms {r.pct(0.5) / base.pct(0.5):>6.3f} "
                  f"{r.pct(0.9) * 1000:>7.1f}ms {r.pct(0.9) / base.pct(0.9):>6.3f}")
    print(f"\nengine start-up in-process (AsyncLLM.from_engine_args): {engine_startup:.1f} s")
    print(f"launcher up -> ready (services started too): {launch['up_s']:.1f} s; worker process start -> registered: "
          f"{launch['process_to_ready_s']:.1f} s; vLLM's own 'init engine' inside the worker: "
          f"{launch['engine_init_s']:.1f} s")
    print(f"launcher overhead (up -> ready minus in-process engine start-up): {launch['up_s'] - engine_startup:.1f} s")
    print(f"status latency (median of 5, CLI incl. Python start): table {launch['status_s']:.2f} s, "
          f"--json {launch['status_json_s']:.2f} s; down: {launch['down_s']:.1f} s")


if __name__ == "__main__":
    main()
