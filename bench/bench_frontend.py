"""`vllm bench serve` against `vllm serve` (a) and our frontend -> NATS -> worker (b), side by side.

    python bench/bench_frontend.py [--model models/SmolLM2-135M-Instruct] [--concurrency 1 8 32] [--reps 3]

Both sides serve the same model with the same engine flags and dtype, each engine pinned to its own
core (VLLM_CPU_OMP_THREADS_BIND) so the idle side does not slow the busy one; the HTTP servers, NATS
and the load generator share the machine. For each repetition and concurrency the two sides run
one after the other, in alternating order, with the same `vllm bench serve` arguments (dataset
random, fixed seed, ignore_eos so both generate the same number of tokens). Tokens are counted by
`vllm bench serve` itself, identically for both. Reported: output tokens/s and TTFT p50 per side,
the paired ratios b/a (median and range over repetitions), and the frontend process's own CPU time
per 1,000 streamed tokens (psutil, user+system, over the whole run of side b).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from launcher.proctree import stop_tree  # noqa: E402

SHIM = ROOT / "bench" / "vllm_serve_shim.py"


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def tree_cpu(root: psutil.Process) -> float:
    """User + system CPU seconds of the frontend and its child processes (`processes: N`)."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def bench_serve(base: str, model: str, tokenizer: str, conc: int, prompts: int, args: argparse.Namespace,
                out_dir: Path, tag: str) -> dict[str, Any]:
    name = f"{tag}.json"
    argv = [sys.executable, str(SHIM), "bench", "serve", "--backend", "openai", "--base-url", base,
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(prompts),
            "--max-concurrency", str(conc), "--request-rate", "inf", "--seed", str(args.seed),
            "--ignore-eos", "--num-warmups", str(min(conc, 4)),
            "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((out_dir / name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json-out", default=None)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="engine flag stream-interval on both sides: tokens per streamed chunk (vLLM applies it in "
                        "the API process: vllm serve's, our frontend's)")
    p.add_argument("--api-servers", type=int, default=1,
                   help="HTTP processes on each side: vllm serve --api-server-count N, frontend processes: N")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still takes both sides down (finally)
    served = "bench-model"
    engine = {"max-model-len": 1024, "enforce-eager": True, "dtype": args.dtype, "served-model-name": served,
              **({"stream-interval": args.stream_interval} if args.stream_interval > 1 else {})}
    tmp = Path(tempfile.mkdtemp(prefix="bench-frontend-"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "LAUNCHER_HOME": str(tmp / "home")}

    # (a) vllm serve, engine on core 0.
    port_a = svc.free_port()
    log_a = (tmp / "vllm-serve.log").open("wb")
    flags = [x for k, v in engine.items() for x in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    serve = subprocess.Popen([sys.executable, str(SHIM), "serve", args.model, "--host", "127.0.0.1", "--port",
                              str(port_a), *flags, "--api-server-count", str(args.api_servers)],
                             env={**env, "VLLM_CPU_OMP_THREADS_BIND": "0"},
                             stdout=log_a, stderr=subprocess.STDOUT, start_new_session=True)
    # (b) our deployment: frontend + monolith worker on core 1, its own etcd and NATS.
    port_b = svc.free_port()
    etcd, nats = f"http://127.0.0.1:{svc.free_port()}", f"nats://127.0.0.1:{svc.free_port()}"
    topo = {"name": "bench-frontend", "model": args.model, "engine": engine, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "services": {"etcd": etcd, "nats": nats},
            "workers": [{"name": "vllm", "kind": "monolith", "cpus": "1", "ready_timeout": 600,
                         "metrics_port": svc.free_port()}],
            "frontends": [{"name": "frontend", "port": port_b, "processes": args.api_servers}]}
    topo_file = tmp / "bench-frontend.yaml"
    topo_file.write_text(yaml.safe_dump(topo, sort_keys=False))
    launcher = [sys.executable, "-m", "launcher.cli"]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        subprocess.run([*launcher, "up", str(topo_file)], env=env, check=True, cwd=ROOT, timeout=900,
                       stdout=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{port_a}/health", 900, serve)
        state = json.loads((tmp / "home" / "bench-frontend" / "state.json").read_text())
        frontend = psutil.Process(state["processes"]["frontend"]["pid"])
        sides = {"a": f"http://127.0.0.1:{port_a}", "b": f"http://127.0.0.1:{port_b}"}
        cpu_b, tokens_b = 0.0, 0
        for rep in range(args.reps):
            for conc in args.concurrency:
                prompts = max(8, 4 * conc)
                order = ("a", "b") if (rep + args.concurrency.index(conc)) % 2 == 0 else ("b", "a")
                for side in order:
                    before = tree_cpu(frontend)
                    r = bench_serve(sides[side], served, args.model, conc, prompts, args, tmp, f"{side}-{conc}-{rep}")
                    if side == "b":
                        cpu_b += tree_cpu(frontend) - before
                        tokens_b += int(r["total_output_tokens"])
                    results.setdefault((side, conc), []).append(r)
                    print(f"rep {rep} conc {conc:>2} {side}: {r['output_throughput']:8.1f} tok/s, "
                          f"TTFT p50 {r['median_ttft_ms']:7.1f} ms, {r['completed']} ok, "
                          f"{r['total_output_tokens']} tokens", flush=True)
    finally:
        subprocess.run([*launcher, "down", "bench-frontend"], env=env, cwd=ROOT, timeout=120,
                       stdout=subprocess.DEVNULL)
        stop_tree(serve.pid, grace=10)
    print(f"\nmodel {Path(args.model).name} ({args.dtype}), random dataset {args.input_len} in / {args.output_len} "
          f"out, ignore_eos, {args.reps} reps alternating, {args.api_servers} HTTP process(es) a side, stream-interval "
          f"{args.stream_interval}; a = vllm serve, "
          "b = frontend -> NATS -> worker\n")
    print("| conc | a tok/s | b tok/s | tok/s b/a (median, range) | a TTFT p50 ms | b TTFT p50 ms "
          "| TTFT b/a (median, range) |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for conc in args.concurrency:
        a, b = results[("a", conc)], results[("b", conc)]
        tput = [rb["output_throughput"] / ra["output_throughput"] for ra, rb in zip(a, b, strict=True)]
        ttft = [rb["median_ttft_ms"] / ra["median_ttft_ms"] for ra, rb in zip(a, b, strict=True)]
        row = {"concurrency": conc,
               "a_tok_s": statistics.median(r["output_throughput"] for r in a),
               "b_tok_s": statistics.median(r["output_throughput"] for r in b),
               "tok_s_ratio": (statistics.median(tput), min(tput), max(tput)),
               "a_ttft_ms": statistics.median(r["median_ttft_ms"] for r in a),
               "b_ttft_ms": statistics.median(r["median_ttft_ms"] for r in b),
               "ttft_ratio": (statistics.median(ttft), min(ttft), max(ttft)),
               "failed": sum(r.get("failed", 0) for r in a + b)}
        table.append(row)
        print(f"| {conc} | {row['a_tok_s']:.1f} | {row['b_tok_s']:.1f} | {row['tok_s_ratio'][0]:.3f} "
              f"({row['tok_s_ratio'][1]:.3f}-{row['tok_s_ratio'][2]:.3f}) | {row['a_ttft_ms']:.1f} | "
              f"{row['b_ttft_ms']:.1f} | {row['ttft_ratio'][0]:.3f} ({row['ttft_ratio'][1]:.3f}-"
              f"{row['ttft_ratio'][2]:.3f}) |")
    per_k = 1000 * cpu_b / tokens_b if tokens_b else float("nan")
    print(f"\nfrontend CPU: {cpu_b:.2f} s for {tokens_b} streamed tokens = {per_k * 1000:.1f} ms per 1,000 tokens")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": table, "frontend_cpu_ms_per_1k_tokens": per_k * 1000,
                                                   "raw": {f"{s}-{c}": v for (s, c), v in results.items()}},
                                                  indent=1))


if __name__ == "__main__":
    main()
