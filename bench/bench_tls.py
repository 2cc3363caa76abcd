"""What security costs on one host: the same deployment in clear (a) and secured (b), side by side.

    python bench/bench_tls.py [--model models/SmolLM2-135M-Instruct] [--concurrency 1 8 32] [--reps 3]

Two deployments of the same topology (frontend + one monolith worker), each with its own etcd and
nats-server, up at the same time: (a) `services.security: none`, (b) `services.security: tls` (a CA,
per-process client certificates, etcd with --client-cert-auth, nats-server with TLS, verify_and_map and
per-identity permissions: what a cross-host deployment gets by default). Each engine is pinned to its
own core (a: 0, b: 1). `vllm bench serve` drives each frontend in turn, alternating the order per
repetition and concurrency, with the same arguments (random dataset, fixed seed, ignore_eos: both sides
generate the same number of tokens, counted by `vllm bench serve`). Reported: requests/s, output
tokens/s and TTFT p50 per side, and the paired ratios b/a (median and range over repetitions).
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
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_frontend import bench_serve  # noqa: E402
from launcher import services as svc  # noqa: E402

SIDES = {"a": "none", "b": "tls"}
FIGURES = (("request_throughput", "req/s"), ("output_throughput", "tok/s"), ("median_ttft_ms", "TTFT p50 ms"))


def topology(name: str, security: str, model: str, engine: dict[str, Any], core: str) -> dict[str, Any]:
    return {"name": name, "model": model, "engine": engine, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "services": {"etcd": f"http://127.0.0.1:{svc.free_port()}",
                         "nats": f"nats://127.0.0.1:{svc.free_port()}", "security": security},
            "workers": [{"name": "vllm", "kind": "monolith", "cpus": core, "ready_timeout": 600,
                         "metrics_port": svc.free_port()}],
            "frontends": [{"name": "frontend", "port": svc.free_port()}]}


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
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still takes both sides down (finally)
    served = "bench-model"
    engine = {"max-model-len": 1024, "enforce-eager": True, "dtype": args.dtype, "served-model-name": served}
    tmp = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    env = {**os.environ, "LAUNCHER_HOME": str(tmp / "home")}
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER", "LAUNCHER_TLS_CA", "LAUNCHER_TLS_CERT", "LAUNCHER_TLS_KEY"):
        env.pop(var, None)
    launcher = [sys.executable, "-m", "launcher.cli"]
    topos = {side: topology(f"bench-tls-{side}", security, args.model, engine, str(i))
             for i, (side, security) in enumerate(SIDES.items())}
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for topo in topos.values():
            path = tmp / f"{topo['name']}.yaml"
            path.write_text(yaml.safe_dump(topo, sort_keys=False))
            subprocess.run([*launcher, "up", str(path)], env=env, check=True, cwd=ROOT, timeout=900,
                           stdout=subprocess.DEVNULL)
        secured = json.loads((tmp / "home" / "bench-tls-b" / "plan.json").read_text())
        assert secured["nats"].startswith("tls://") and secured["tls"], "side b must be secured"
        for rep in range(args.reps):
            for conc in args.concurrency:
                prompts = max(8, 4 * conc)
                order = ("a", "b") if (rep + args.concurrency.index(conc)) % 2 == 0 else ("b", "a")
                for side in order:
                    base = f"http://127.0.0.1:{topos[side]['frontends'][0]['port']}"
                    r = bench_serve(base, served, args.model, conc, prompts, args, tmp, f"{side}-{conc}-{rep}")
                    results.setdefault((side, conc), []).append(r)
                    print(f"rep {rep} conc {conc:>2} {side} ({SIDES[side]}): {r['request_throughput']:6.2f} req/s, "
                          f"{r['output_throughput']:8.1f} tok/s, TTFT p50 {r['median_ttft_ms']:7.1f} ms, "
                          f"{r['completed']} ok, {r.get('failed', 0)} failed", flush=True)
    finally:
        for topo in topos.values():
            subprocess.run([*launcher, "down", topo["name"]], env=env, cwd=ROOT, timeout=120,
                           stdout=subprocess.DEVNULL)
    print(f"\nmodel {Path(args.model).name} ({args.dtype}), random {args.input_len} in / {args.output_len} out, "
          f"ignore_eos, {args.reps} reps alternating; a = in clear, b = TLS + client certificates + NATS permissions\n")
    print("| conc | " + " | ".join(f"a {u} | b {u} | b/a (median, range)" for _, u in FIGURES) + " | failed |")
    print("|---|" + "---|---|---|" * len(FIGURES) + "---|")
    table = []
    for conc in args.concurrency:
        a, b = results[("a", conc)], results[("b", conc)]
        row: dict[str, Any] = {"concurrency": conc, "failed": sum(r.get("failed", 0) for r in a + b)}
        cells = []
        for key, _ in FIGURES:
            ratios = [rb[key] / ra[key] for ra, rb in zip(a, b, strict=True)]
            row[key] = {"a": statistics.median(r[key] for r in a), "b": statistics.median(r[key] for r in b),
                        "ratio": (statistics.median(ratios), min(ratios), max(ratios))}
            v = row[key]
            cells.append(f"{v['a']:.2f} | {v['b']:.2f} | {v['ratio'][0]:.3f} ({v['ratio'][1]:.3f}-{v['ratio'][2]:.3f})")
        table.append(row)
        print(f"| {conc} | " + " | ".join(cells) + f" | {row['failed']} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": table, "raw": {f"{s}-{c}": v for (s, c), v in
                                                                          results.items()}}, indent=1))


if __name__ == "__main__":
    main()
