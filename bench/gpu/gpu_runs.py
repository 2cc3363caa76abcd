"""Issue 7 on a GPU machine: the launcher's GPU paths with real vLLM, checked the way a user would.

    python bench/gpu/gpu_runs.py run1 --out DIR   # one GPU: monolith up/ask/status/down + NATS vs in-process
    python bench/gpu/gpu_runs.py run2 --out DIR   # two GPUs: 1P1D over NixlConnector, then a KV router

run_gpu.sh calls this after install.sh (it sources the env file and makes the model). Every check
prints one `PASS name: detail` / `FAIL name: detail` / `INFO name: detail` line and is collected
in DIR/<run>.json; worker logs (tails) land in DIR/logs/. Nothing here asserts a timing: the
figures are printed side by side and as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from launcher.topology import load_topology  # noqa: E402

TOPOLOGIES = HERE / "topologies"
KEEP = Path(os.environ.get("GPU_RESULTS", "/root/gpu-results"))  # survives between commands while warm
LAUNCHER = [sys.executable, "-m", "launcher.cli"]


class Run:
    """Checks and figures of one run, printed as they happen and saved as JSON."""

    def __init__(self, name: str, out: Path) -> None:
        self.name = name
        self.out = out
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.t0 = time.time()
        out.mkdir(parents=True, exist_ok=True)

    def check(self, name: str, ok: bool | None, detail: str = "") -> bool:
        verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{verdict} {name}: {detail}", flush=True)
        self.checks.append({"check": name, "verdict": verdict, "detail": detail})
        return bool(ok)

    def note(self, msg: str) -> None:
        print(f"[{self.name} +{time.time() - self.t0:5.0f}s] {msg}", flush=True)

    def save(self) -> int:
        failed = [c for c in self.checks if c["verdict"] == "FAIL"]
        summary = {"run": self.name, "wall_s": round(time.time() - self.t0, 1), "checks": self.checks,
                   "figures": self.figures, "failed": len(failed)}
        (self.out / f"{self.name}.json").write_text(json.dumps(summary, indent=1))
        n_pass = sum(c["verdict"] == "PASS" for c in self.checks)
        print(f"== {self.name}: {n_pass} PASS, {len(failed)} FAIL, {summary['wall_s']} s ==", flush=True)
        return 1 if failed else 0


class Env:
    """etcd and nats-server on free ports for the whole run, and the env the launcher CLI gets."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.etcd = f"http://127.0.0.1:{svc.free_port()}"
        self.nats = f"nats://127.0.0.1:{svc.free_port()}"
        self.started = [svc.start_etcd(self.etcd, work), svc.start_nats(self.nats, work)]
        self.env = {**os.environ, "ETCD_ENDPOINTS": self.etcd, "NATS_SERVER": self.nats,
                    "LAUNCHER_HOME": str(work / "launcher-home"), "PYTHONPATH": _pythonpath()}

    def close(self) -> None:
        svc.stop_services(self.started, grace=5)


def _pythonpath() -> str:
    parts = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def launcher(env: Env, args: list[str], timeout: float = 480) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCHER, *args], env=env.env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def smi(query: str, what: str = "gpu") -> list[list[str]]:
    flag = "--query-gpu" if what == "gpu" else "--query-compute-apps"
    try:
        out = subprocess.run(["nvidia-smi", f"{flag}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[p.strip() for p in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_mem_used() -> dict[int, int]:
    return {int(r[0]): int(r[1]) for r in smi("index,memory.used") if len(r) == 2 and r[1].isdigit()}


def engine_flags(topology: str) -> dict[str, Any]:
    topo, _ = load_topology(TOPOLOGIES / topology)
    return dict(topo.engine)


def model_dir(topology: str) -> str:
    topo, _ = load_topology(TOPOLOGIES / topology)
    return topo.model


def save_logs(run: Run, env: Env, deployment: str) -> None:
    """The last 300 lines of every process log of a deployment, into OUT/logs/<deployment>/."""
    home = env.work / "launcher-home"
    dest = run.out / "logs" / deployment
    for log in home.rglob("*.log"):
        if deployment not in str(log):
            continue
        dest.mkdir(parents=True, exist_ok=True)
        lines = log.read_text(errors="replace").splitlines()[-300:]
        (dest / log.name).write_text("\n".join(lines) + "\n")


def up(run: Run, env: Env, topology: str) -> tuple[str, bool]:
    name = topology.removesuffix(".yaml")
    t0 = time.time()
    proc = launcher(env, ["up", str(TOPOLOGIES / topology)])
    took = time.time() - t0
    run.figures[f"{name}.up_s"] = round(took, 1)
    ok = run.check(f"{name} up", proc.returncode == 0, f"launcher up exited {proc.returncode} after {took:.0f} s")
    if not ok:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", flush=True)
        save_logs(run, env, name)
    return name, ok


def down(run: Run, env: Env, name: str, baseline: dict[int, int]) -> None:
    save_logs(run, env, name)
    proc = launcher(env, ["down", name], timeout=120)
    run.check(f"{name} down", proc.returncode == 0, f"launcher down exited {proc.returncode} {proc.stderr[-300:]}")
    deadline = time.time() + 60
    apps: list[list[str]] = []
    while time.time() < deadline:
        apps = smi("pid,used_memory", "apps")
        if not apps:
            break
        time.sleep(2)
    run.check(f"{name} GPUs released (nvidia-smi compute apps)", not apps,
              "none" if not apps else f"still there: {apps}")
    after = gpu_mem_used()
    grown = {g: after[g] - baseline.get(g, 0) for g in after if after[g] - baseline.get(g, 0) > 1024}
    run.check(f"{name} GPU memory back to baseline", not grown,
              f"used MiB {after} vs baseline {baseline}" + (f"; still +{grown}" if grown else ""))


def status(env: Env, name: str) -> dict[str, Any]:
    proc = launcher(env, ["status", name, "--json"], timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-500:]}


def bench(run: Run, side: str, out: Path, extra: list[str], timeout: float = 420) -> dict[str, Any] | None:
    cmd = [sys.executable, str(HERE / "bench_gpu_serving.py"), side, "--out", str(out), *extra]
    run.note(" ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": _pythonpath()})
    if proc.returncode != 0 or not out.exists():
        run.check(f"bench {side}", False, f"exited {proc.returncode}: {proc.stderr[-3000:]}")
        return None
    return dict(json.loads(out.read_text()))


def compare_greedy(run: Run, label: str, ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> bool:
    ok = len(ref) == len(got) and bool(ref)
    for k, (a, b) in enumerate(zip(ref, got, strict=False)):
        same = a["token_ids"] == b["token_ids"] and bool(a["token_ids"])
        if not same:
            first = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"], strict=False)) if x != y),
                         min(len(a["token_ids"]), len(b["token_ids"])))
            run.note(f"probe {k}: differs at token {first}: ref {a['token_ids'][:first + 3]} got "
                     f"{b['token_ids'][:first + 3]}")
        ok = ok and same
    return run.check(label, ok, f"{len(got)} probe prompts x {len(ref[0]['token_ids']) if ref else 0} greedy tokens")


# ---- run 1 --------------------------------------------------------------------------------------


def run1(args: argparse.Namespace) -> int:
    run = Run("run1", args.out)
    baseline = gpu_mem_used()
    run.check("GPUs", bool(baseline), f"memory used MiB per GPU before: {baseline}")
    env = Env(args.work / "run1")
    topo = "gpu-monolith.yaml"
    try:
        name, ok = up(run, env, topo)
        if ok:
            st = status(env, name)
            proc: dict[str, Any] = next((p for p in st.get("processes", []) if p["name"] == "vllm"), {})
            on_gpu0 = proc.get("devices") == "gpu 0" and proc.get("state") == "ready"
            run.check("status shows the worker on GPU 0", on_gpu0,
                      f"devices={proc.get('devices')!r} state={proc.get('state')!r} "
                      f"registered={proc.get('registered')}")
            apps = smi("pid,used_memory", "apps")
            run.check("nvidia-smi compute apps while up", None, str(apps))
            # In a container nvidia-smi may list no pids at all: then status cannot know, and says nothing.
            run.check("status shows the worker's GPU memory", (proc.get("gpu_mem_mib") or 0) > 0 if apps else None,
                      f"gpu_mem_mib={proc.get('gpu_mem_mib')}" + ("" if apps else " (nvidia-smi lists no pids here)"))
            (run.out / "status-monolith.json").write_text(json.dumps(st, indent=1))
            common = ["--requests", str(args.requests), "--warmup", "4", "--concurrency", str(args.concurrency),
                      "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
            nats = bench(run, "nats", run.out / "bench-nats.json",
                         ["--nats", env.nats, "--namespace", name, "--component", "vllm", "--greedy", *common])
            if nats:
                greedy = nats.get("greedy", [])
                answered = all(g["token_ids"] for g in greedy) and bool(greedy)
                run.check("client answers through worker + NATS", answered,
                          f"{len(greedy)} probes, first: {greedy[0]['token_ids'][:8] if greedy else None}")
                KEEP.mkdir(parents=True, exist_ok=True)
                (KEEP / "monolith-greedy.json").write_text(json.dumps(greedy))
            down(run, env, name, baseline)
            inproc = bench(run, "inprocess", run.out / "bench-inprocess.json",
                           ["--model", model_dir(topo), "--engine", json.dumps(engine_flags(topo)), *common])
            if nats and inproc:
                a, b = nats["load"], inproc["load"]
                run.figures.update({"nats": a, "inprocess": b})
                ratio_tps = a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None
                ratio_ttft = (a["ttft_ms_p50"] / b["ttft_ms_p50"]) if b["ttft_ms_p50"] else None
                run.figures["ratio_tokens_per_s"] = ratio_tps and round(ratio_tps, 3)
                run.figures["ratio_ttft_p50"] = ratio_ttft and round(ratio_ttft, 3)
                print(f"{'':22}{'worker+NATS':>14}{'in-process':>14}{'ratio':>8}")
                for key in ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p90", "latency_ms_p50"):
                    r = a[key] / b[key] if a[key] and b[key] else float("nan")
                    print(f"{key:22}{a[key]!s:>14}{b[key]!s:>14}{r:8.3f}")
                run.check("side by side (worker+NATS vs in-process AsyncLLM)", None,
                          f"tokens/s ratio {run.figures['ratio_tokens_per_s']}, TTFT p50 ratio "
                          f"{run.figures['ratio_ttft_p50']} ({args.requests} requests, concurrency "
                          f"{args.concurrency}, {args.prompt_len}+{args.max_tokens} tokens)")
    finally:
        env.close()
    return run.save()


# ---- run 2 --------------------------------------------------------------------------------------


def run2(args: argparse.Namespace) -> int:
    run = Run("run2", args.out)
    baseline = gpu_mem_used()
    if not run.check("two GPUs", len(baseline) >= 2, f"memory used MiB per GPU before: {baseline}"):
        return run.save()
    env = Env(args.work / "run2")
    try:
        if "1p1d" in args.parts:
            disaggregated(run, env, baseline)
        if "router" in args.parts:
            kv_router(run, env, baseline, args)
    finally:
        env.close()
    return run.save()


def disaggregated(run: Run, env: Env, baseline: dict[int, int]) -> None:
    topo = "gpu-1p1d.yaml"
    # The reference: the same model and flags as one in-process engine (the monolith's engine).
    ref = bench(run, "greedy", run.out / "greedy-monolith-eager.json",
                ["--model", model_dir(topo), "--engine", json.dumps(engine_flags(topo))])
    name, ok = up(run, env, topo)
    if not ok:
        down(run, env, name, baseline)
        return
    st = status(env, name)
    (run.out / "status-1p1d.json").write_text(json.dumps(st, indent=1))
    devs = {p["name"]: p["devices"] for p in st.get("processes", [])}
    run.check("1P1D status: prefill on GPU 0, decode on GPU 1", devs == {"prefill": "gpu 0", "decode": "gpu 1"},
              str(devs))
    got = nats_greedy(run, env, name, "decode")
    if ref and got:
        compare_greedy(run, "1P1D greedy output equals the monolith's", ref["greedy"], got)
        cached = [(g.get("cached_tokens"), g.get("prompt_tokens"), g.get("prefill_worker")) for g in got]
        remote = all(c and c > 0 and pw not in (None, "local") for c, _p, pw in cached)
        run.check("decode got the prompt's KV from the prefill worker (cached_tokens > 0)", remote,
                  "(cached_tokens, prompt_tokens, prefill_worker) per probe: " + str(cached))
    kept = KEEP / "monolith-greedy.json"
    if kept.exists() and got:
        same = [a["token_ids"] == b["token_ids"] for a, b in zip(json.loads(kept.read_text()), got, strict=False)]
        run.check("1P1D vs run 1's deployed monolith (CUDA graphs; info only)", None, f"equal per probe: {same}")
    down(run, env, name, baseline)


def nats_greedy(run: Run, env: Env, namespace: str, component: str) -> list[dict[str, Any]] | None:
    res = bench(run, "nats", run.out / f"greedy-{namespace}.json",
                ["--nats", env.nats, "--namespace", namespace, "--component", component, "--greedy",
                 "--requests", "0", "--warmup", "0"])
    return res["greedy"] if res else None


async def _ask_tokens(nats: str, namespace: str, token_ids: list[int], rid: str) -> dict[str, Any]:
    from workers.runtime import requestplane

    nc = await requestplane.connect(nats, "gpu-runs")
    try:
        subject = requestplane.endpoint_subject(namespace, "preprocess", "generate")
        final: dict[str, Any] = {}
        req = {"request_id": rid, "token_ids": token_ids, "sampling": {"max_tokens": 8, "temperature": 0.0}}
        async for item in requestplane.stream(nc, subject, req, 60.0):
            if item.is_error():
                return {"error": str(item.comment or item.data)}
            chunk = item.data or {}
            if chunk.get("finish_reason") is not None:
                final = chunk
        return final
    finally:
        await nc.close()


def kv_router(run: Run, env: Env, baseline: dict[int, int], args: argparse.Namespace) -> None:
    import random

    topo = "gpu-kv-router.yaml"
    name, ok = up(run, env, topo)
    if not ok:
        down(run, env, name, baseline)
        return
    st = status(env, name)
    (run.out / "status-kv-router.json").write_text(json.dumps(st, indent=1))
    devs = {p["name"]: p["devices"] for p in st.get("processes", [])}
    run.check("router status: backend-1 on GPU 0, backend-2 on GPU 1",
              devs.get("backend-1") == "gpu 0" and devs.get("backend-2") == "gpu 1", str(devs))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 400) for _ in range(args.long_prompt)] for _ in range(4)]
    first: list[dict[str, Any]] = []
    for k, p in enumerate(prompts):
        first.append(asyncio.run(_ask_tokens(env.nats, name, p, f"first-{k}")))
        time.sleep(1.0)  # the worker's KV events reach the router (ZMQ -> NATS) within a second
    time.sleep(2.0)
    again = [asyncio.run(_ask_tokens(env.nats, name, p, f"again-{k}")) for k, p in enumerate(prompts)]
    rows = [(f.get("worker"), a.get("worker"), a.get("cached_tokens"), (a.get("routing") or {}).get("process"))
            for f, a in zip(first, again, strict=True)]
    run.figures["router_rows"] = rows
    errors = [x for x in first + again if "error" in x]
    run.check("router answers", not errors and all(x.get("worker") for x in first + again),
              f"errors: {errors[:2]}" if errors else f"workers: {[r[0] for r in rows]}")
    same = all(r[0] is not None and r[0] == r[1] for r in rows)
    run.check("a repeated long prompt lands on the worker that cached it", same,
              "(first worker, repeat worker, repeat cached_tokens, router's pick): " + str(rows))
    block = 16
    hit = all((r[2] or 0) >= (args.long_prompt // block - 1) * block for r in rows)
    run.check("the repeat reuses the cached prefix (cached_tokens ~ prompt)", hit,
              f"cached_tokens {[r[2] for r in rows]} for {args.long_prompt}-token prompts")
    spread = {str(w): [r[0] for r in rows].count(w) for w in {r[0] for r in rows}}
    run.check("spread of first placements", None, str(spread))
    down(run, env, name, baseline)


def main() -> None:
    global TOPOLOGIES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=["run1", "run2"])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-out"))
    p.add_argument("--work", type=Path, default=Path("/root/gpu-work"), help="etcd data, launcher home")
    p.add_argument("--parts", default="1p1d,router", help="run2: which parts (1p1d, router)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--long-prompt", type=int, default=1024, help="run2 router: tokens per long prompt")
    p.add_argument("--topologies", type=Path, default=TOPOLOGIES,
                   help="folder of the gpu-*.yaml files (a CPU copy lets the orchestration be tried without a GPU)")
    args = p.parse_args()
    TOPOLOGIES = args.topologies
    if shutil.which("nvidia-smi") is None:
        raise SystemExit("no nvidia-smi: these runs need NVIDIA GPUs")
    sys.exit(run1(args) if args.run == "run1" else run2(args))


if __name__ == "__main__":
    main()
