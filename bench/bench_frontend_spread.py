"""How a burst of connections spreads over a frontend's `processes: N`: one checkout against another.

    python bench/bench_frontend_spread.py [--base-tree DIR] [--processes 4] [--bursts 64 16] [--reps 5]

For each tree (this checkout, and --base-tree: another checkout, whose own launcher is run in its own
folder so its processes run its code), a deployment of the tiny model with one frontend of N processes
is started; then bursts of C streaming requests are sent at once (one connection each, httpx), and while
they run the frontend's processes are sampled for the established connections each holds on the port
(psutil). A burst's figure is its fullest sample, sorted: [38, 18, 5, 3] means one process held 38 of 64.
The trees alternate (this, base, this, ...). What is compared is the spread, not speed: the largest
share over the even one (C / N), median over the bursts. Markdown and JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402


def connections_per_process(pids: list[int], port: int) -> dict[int, int]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out[pid] = sum(1 for c in psutil.Process(pid).net_connections("tcp")
                           if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
    return out


async def burst(url: str, model: str, conc: int, pids: list[int], port: int) -> list[int]:
    """conc streaming requests at once; the per-process connection counts of the fullest sample."""
    body = {"model": model, "prompt": "hello " * 50, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True}

    async def one() -> None:
        async with httpx.AsyncClient(timeout=120) as http, http.stream("POST", f"{url}/v1/completions",
                                                                       json=body) as r:
            r.raise_for_status()
            async for _ in r.aiter_bytes():
                pass

    tasks = [asyncio.create_task(one()) for _ in range(conc)]
    best: dict[int, int] = {}
    pending: set[asyncio.Task[None]] = set(tasks)
    while pending:
        sample = await asyncio.to_thread(connections_per_process, pids, port)
        if sum(sample.values()) > sum(best.values()):
            best = sample
        _, pending = await asyncio.wait(pending, timeout=0.01)
    await asyncio.gather(*tasks)
    return sorted(best.values(), reverse=True)


def run_tree(tree: Path, args: argparse.Namespace, work: Path) -> dict[int, list[list[int]]]:
    port = svc.free_port()
    topo = {"name": "spread", "backend": "subprocess", "model": str(Path(args.model).resolve()),
            "engine": {"dtype": "float32", "max-model-len": 512, "enforce-eager": True},
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "workers": [{"name": "vllm", "kind": "monolith"}],
            "frontends": [{"name": "frontend", "port": port, "processes": args.processes}]}
    topo_file = work / "spread.yaml"
    topo_file.write_text(yaml.safe_dump(topo))
    env = {**os.environ, "LAUNCHER_HOME": str(work / "home")}
    launcher = [sys.executable, "-m", "launcher.cli"]
    try:
        subprocess.run([*launcher, "up", str(topo_file)], env=env, cwd=tree, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
        state = json.loads((work / "home" / "spread" / "state.json").read_text())
        root = psutil.Process(state["processes"]["frontend"]["pid"])
        pids = [root.pid, *(c.pid for c in root.children())]
        url = f"http://127.0.0.1:{port}"
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        return {c: [asyncio.run(burst(url, model, c, pids, port)) for _ in range(args.reps)] for c in args.bursts}
    finally:
        subprocess.run([*launcher, "down", "spread"], env=env, cwd=tree, timeout=300, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    p.add_argument("--base-tree", type=Path, default=None, help="another checkout to compare with")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--bursts", type=int, nargs="+", default=[64, 16])
    p.add_argument("--reps", type=int, default=5, help="bursts of each size per run")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frontend-spread-cpu")
    args = p.parse_args()
    trees = {"this": ROOT, **({"base": args.base_tree.resolve()} if args.base_tree else {})}
    got: dict[str, dict[int, list[list[int]]]] = {name: {c: [] for c in args.bursts} for name in trees}
    for rnd in range(args.rounds):
        for name, tree in (list(trees.items()) if rnd % 2 == 0 else list(trees.items())[::-1]):
            with tempfile.TemporaryDirectory(prefix="spread-") as work:
                for c, samples in run_tree(tree, args, Path(work)).items():
                    got[name][c] += samples
                    print(f"{name} ({tree}) burst {c}: {samples}", flush=True)
    rows: list[dict[str, Any]] = []
    for name, tree in trees.items():
        for c in args.bursts:
            shares = [max(s) / (c / args.processes) for s in got[name][c]]
            idle = sum(1 for s in got[name][c] if len(s) < args.processes or min(s) == 0)
            rows.append({"tree": name, "code": str(tree), "burst": c, "processes": args.processes,
                         "largest_over_even_median": round(statistics.median(shares), 2),
                         "largest_over_even_max": round(max(shares), 2), "bursts_with_an_idle_process": idle,
                         "bursts": got[name][c]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| tree | burst | largest share / even, median (max) | bursts with an idle process | bursts |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['tree']} | {r['burst']} | {r['largest_over_even_median']} ({r['largest_over_even_max']}) | "
              f"{r['bursts_with_an_idle_process']} of {len(r['bursts'])} | "
              f"{' '.join(str(b) for b in r['bursts'])} |" for r in rows]
    print("\n".join(lines))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
