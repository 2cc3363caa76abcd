"""The demo's time to answer in bfloat16 vs float32 on this CPU (issue 13): why the plan picks the dtype.

    flock /tmp/vllm-cpu.lock python bench/bench_cpu_dtype.py [--reps 3] [--out results.json]

One repetition of one side = what scripts/demo.sh does: `launcher up topologies/cpu-monolith.yaml`
(etcd and nats-server started for it) then the client's chat question, greedy, 24 tokens; then
`launcher down`. The two sides differ only in the engine's `dtype` (set explicitly, so the plan's own
choice does not interfere); they alternate (bf16, fp32, fp32, bf16, ...) so drift hits both. Reports
per side the median and range of `up` (to ready), the answer (client process start to exit) and the
sum, and the paired ratios bf16/fp32. Nothing is asserted: the figure goes into the note.
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
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from launcher.cpu import read_cpu_flags  # noqa: E402
from workers.runtime import requestplane  # noqa: E402

TOPOLOGY = ROOT / "topologies" / "cpu-monolith.yaml"
QUESTION = ["--prompt", "what is the capital of france?", "--max-tokens", "24", "--temperature", "0", "--chat",
            "--quiet"]
SIDES = ("bfloat16", "float32")
LONG_PROMPT = " ".join(f"Paragraph {k}: the river bends past the old mill, and the town keeps its records."
                       for k in range(60))
KEYS = ("up_s", "answer_s", "total_s", "question_s", "long_ttft_s", "long_s")


def run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[2:4]} exit {out.returncode}: {out.stderr[-2000:]}")
    return time.perf_counter() - t0, out.stdout.strip()


def one(dtype: str, rep: int, tmp: Path) -> dict[str, Any]:
    """launcher up + the demo's question + launcher down, in a deployment of its own."""
    topo = yaml.safe_load(TOPOLOGY.read_text())
    name = f"bench-dtype-{dtype}-{rep}"
    topo["name"] = name
    topo["model"] = str((TOPOLOGY.parent / topo["model"]).resolve())
    topo["engine"] = {**topo.get("engine", {}), "dtype": dtype}
    topo["services"] = {"etcd": f"http://127.0.0.1:{svc.free_port()}",
                        "nats": f"nats://127.0.0.1:{svc.free_port()}", "managed": "always"}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(topo))
    env = {**os.environ, "LAUNCHER_HOME": str(tmp / "home"), "ETCD_ENDPOINTS": topo["services"]["etcd"],
           "NATS_SERVER": topo["services"]["nats"], "LAUNCHER_NAMESPACE": name}
    launcher = [sys.executable, "-m", "launcher.cli"]
    try:
        up_s, _ = run([*launcher, "up", str(path)], env, 600)
        answer_s, text = run([sys.executable, "-m", "workers.common.client", *QUESTION], env, 300)
        engine = asyncio.run(direct(topo["services"]["nats"], name))
    finally:
        subprocess.run([*launcher, "down", name], env=env, capture_output=True, timeout=120)
    return {"dtype": dtype, "rep": rep, "up_s": round(up_s, 2), "answer_s": round(answer_s, 2),
            "total_s": round(up_s + answer_s, 2), **engine, "text": text}


async def direct(nats: str, namespace: str) -> dict[str, float]:
    """Request-to-last-token inside one process (no client start-up): the demo question, and a long
    prompt (~1,000 tokens, 32 output tokens) where the dtype's compute cost shows; 2 of each, mean."""
    nc = await requestplane.connect(nats, "bench-dtype")
    subject = requestplane.endpoint_subject(namespace, "vllm", "generate")
    demo = {"messages": [{"role": "user", "content": "what is the capital of france?"}],
            "sampling": {"max_tokens": 24, "temperature": 0}}
    long = {"prompt": LONG_PROMPT, "sampling": {"max_tokens": 32, "temperature": 0, "ignore_eos": True}}
    out: dict[str, list[float]] = {"question_s": [], "long_ttft_s": [], "long_s": []}
    try:
        for _ in range(2):
            for key, req in (("question", demo), ("long", long)):
                t0 = time.perf_counter()
                first = None
                async for item in requestplane.stream(nc, subject, req, 120):
                    if item.is_error():
                        raise RuntimeError(item.comment)
                    if first is None and (item.data or {}).get("token_ids"):
                        first = time.perf_counter() - t0
                out[f"{key}_s"].append(time.perf_counter() - t0)
                if key == "long" and first is not None:
                    out["long_ttft_s"].append(first)
    finally:
        await nc.close()
    return {k: round(statistics.mean(v), 3) for k, v in out.items() if v}


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the raw rows as JSON")
    args = ap.parse_args()
    flags = read_cpu_flags() or frozenset()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}; avx512_bf16={'avx512_bf16' in flags} amx_bf16={'amx_bf16' in flags}; "
          f"{os.cpu_count()} cores", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
        for rep in range(args.reps):
            order = SIDES if rep % 2 == 0 else tuple(reversed(SIDES))
            for dtype in order:
                row = one(dtype, rep, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\nseconds, median [range]; up = launcher up to ready, answer = the client's process (demo), "
          "question / long = request to last token measured in-process (long: ~1k-token prompt, 32 tokens)")
    print(f"{'side':10} " + " ".join(f"{k:>24}" for k in KEYS))
    for dtype in SIDES:
        mine = [r for r in rows if r["dtype"] == dtype]
        cells = [f"{summary([r[k] for r in mine]):>24}" for k in KEYS]
        print(f"{dtype:10} " + " ".join(cells))
    print("\npaired ratios bfloat16 / float32 (per repetition):")
    for key in KEYS:
        ratios = [next(r[key] for r in rows if r["rep"] == k and r["dtype"] == "bfloat16")
                  / next(r[key] for r in rows if r["rep"] == k and r["dtype"] == "float32") for k in range(args.reps)]
        print(f"  {key:9} median {statistics.median(ratios):.2f}  [{min(ratios):.2f}-{max(ratios):.2f}]")
    print("answers: " + " | ".join(sorted({r["dtype"] + ": " + r["text"] for r in rows})))
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
