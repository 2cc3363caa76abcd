"""`launcher validate` wall and CPU time: cold flag-table cache, warm cache, and importing vLLM.

    python bench/bench_validate.py [--reps 3] [--topology topologies/cpu-disagg-1p1d.yaml]

Side by side in one run, alternating, each a fresh `python -m launcher.cli validate TOPOLOGY`:
- cold: an empty $LAUNCHER_CACHE, so the child process imports vLLM and reads its parser once;
- warm: the cached table, no vLLM import (what every `validate` after the first costs);
- baseline: `python -c "import KVConnectorFactory"`, what the launcher did in-process before the
  table (it imported vLLM to list the connectors, on every `validate` of a kv_transfer topology).
Reports medians; the machine's other load moves wall time, the user+sys CPU less so.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory"


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall s, CPU s of the child, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=600).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--topology", default="topologies/cpu-disagg-1p1d.yaml")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    validate = [sys.executable, "-m", "launcher.cli", "validate", args.topology]
    results: dict[str, list[tuple[float, float, int]]] = {"cold": [], "warm": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache = Path(tmp) / "warm"
        subprocess.run(validate, env={**env, "LAUNCHER_CACHE": str(warm_cache)}, cwd=ROOT, capture_output=True)
        for rep in range(args.reps):
            cold_cache = Path(tmp) / f"cold-{rep}"
            results["cold"].append(timed(validate, {**env, "LAUNCHER_CACHE": str(cold_cache)}))
            shutil.rmtree(cold_cache, ignore_errors=True)
            results["warm"].append(timed(validate, {**env, "LAUNCHER_CACHE": str(warm_cache)}))
            results["baseline"].append(timed([sys.executable, "-c", BASELINE], env))
    print(f"\nlauncher validate {args.topology}: {args.reps} reps each, alternating; medians\n")
    print(f"{'':<34}{'wall s':>10}{'CPU s':>10}  exit codes")
    labels = {"cold": "cold cache (reads vLLM's parser)", "warm": "warm cache (no vLLM import)",
              "baseline": "baseline: import vLLM's connectors"}
    med = {}
    for key, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        med[key] = (wall, cpu)
        print(f"{labels[key]:<34}{wall:>10.2f}{cpu:>10.2f}  {sorted({r[2] for r in rows})}")
    print(f"\nwarm / cold: {med['warm'][0] / med['cold'][0]:.3f} wall, {med['warm'][1] / med['cold'][1]:.3f} CPU; "
          f"warm / baseline: {med['warm'][0] / med['baseline'][0]:.3f} wall, "
          f"{med['warm'][1] / med['baseline'][1]:.3f} CPU")


if __name__ == "__main__":
    main()
