"""Serving sides compared in one run, each engine started once (issue 13): where TTFT goes.

    python bench/gpu/bench_compare.py --model DIR --engine '{"max-model-len": 4096}' --gpus 0 \
        --sides inprocess nats serve --concurrency 16 64 256 --loads waves sustained --reps 4 --out DIR

Sides (same engine flags, same seeded token-id prompts, ignore_eos, fixed max_tokens):
* inprocess: vLLM's AsyncLLM in this process through our EngineHandler: the floor;
* nats: our monolith worker started by `launcher up` (etcd + nats-server of its own), our client's
  requestplane.stream over NATS;
* serve: `vllm serve` (OpenAI HTTP), POST /v1/completions streamed, `return_token_ids`;
* before: the same worker and client with the request plane of --before-plane (a requestplane.py
  source file: the plane before issue 13), served by plane_worker.py on the same NATS server;
* frontend: our OpenAI frontend (a `frontends:` entry of the same deployment, or --frontend-url) in
  front of the nats worker; the same HTTP client as `serve`; one HTTP process (`processes: 1`);
* frontend-n: a second `frontends:` entry of the same deployment with `processes:
  --frontend-processes` on its own port: N processes sharing one listening socket;
* frontend-m: a third one, with `--frontend-m-processes` (how the count of processes matters, side by side).

Order: every engine starts once (one after another, so vLLM's memory profiling of one never sees
another's start-up); then every side gets the same warm-up (one wave at each concurrency); then for
each repetition, load and concurrency the sides run one after another in an order that rotates,
each on a fresh seeded request set (the same prompts on every side; never seen before by any engine,
so no prefix-cache hits). Tokens are counted, never messages: token ids on the NATS sides, the
cumulative usage of continuous usage stats on the HTTP sides (token ids cross-check it).

Every measured row is appended to OUT/rows.jsonl as it happens (a run cut short still reports), and
at the end OUT/report.txt holds the table: means [min-max] and paired ratios against inprocess.
--budget-s stops starting new repetitions once spent. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for p in (str(ROOT), str(ROOT / "bench"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import loadgen  # noqa: E402
from sse_client import HttpError, get_json, post_sse  # noqa: E402

SIDES = ("inprocess", "nats", "before", "serve", "frontend", "frontend-n", "frontend-m")
FRONTEND_SIDES = ("frontend", "frontend-n", "frontend-m")  # `frontends:` entries of the deployment, one port each


def frontend_processes(side: str, args: argparse.Namespace) -> int:
    return {"frontend": 1, "frontend-n": args.frontend_processes, "frontend-m": args.frontend_m_processes}[side]
BEFORE_SUBJECT = "benchbefore.vllm.generate"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _pythonpath() -> str:
    parts = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


class Deployment:
    """etcd + nats-server on free ports and a monolith worker through `launcher up`."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from launcher import services as svc

        self.work = work
        # distinct: drawn while all are held; the worker's metrics port too (the default 9400 may be taken)
        etcd_port, nats_port, metrics_port, *front_ports = svc.free_ports(3 + len(FRONTEND_SIDES))
        self.etcd = f"http://127.0.0.1:{etcd_port}"
        self.nats = f"nats://127.0.0.1:{nats_port}"
        self.started = [svc.start_etcd(self.etcd, work), svc.start_nats(self.nats, work)]
        self.env = {**os.environ, "ETCD_ENDPOINTS": self.etcd, "NATS_SERVER": self.nats,
                    "LAUNCHER_HOME": str(work / "home"), "PYTHONPATH": _pythonpath()}
        self.name = "bench-compare"
        worker: dict[str, Any] = {"name": "vllm", "kind": "monolith", "ready_timeout": 500}
        if args.gpus:
            worker["gpus"] = [int(g) for g in args.gpus.split(",")]
        topo = {"name": self.name, "backend": "subprocess", "model": str(Path(args.model).resolve()),
                "services": {"etcd": self.etcd, "nats": self.nats, "managed": "never"},
                "engine": json.loads(args.engine), "env": {"VLLM_USE_FLASHINFER_SAMPLER": "0", **_cpu_env()},
                "workers": [worker], "metrics_port_base": metrics_port}
        self.frontend_ports: dict[str, int] = {}  # side -> its frontend's port
        frontends: list[dict[str, Any]] = []
        for side, port in zip(FRONTEND_SIDES, front_ports, strict=True):
            if side in args.sides and not (side == "frontend" and args.frontend_url):
                self.frontend_ports[side] = port
                frontends.append({"name": side, "port": port, "processes": frontend_processes(side, args),
                                  "ready_timeout": 300})
        if frontends:
            topo["frontends"] = frontends
        self.topology = work / "bench-compare.yaml"
        self.topology.write_text(json.dumps(topo))  # JSON is YAML

    def cli(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "launcher.cli", *argv], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)

    def up(self) -> None:
        out = self.cli("up", str(self.topology))
        if out.returncode != 0:
            raise RuntimeError(f"launcher up exited {out.returncode}: {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def close(self, out_dir: Path) -> None:
        from launcher import services as svc

        for f in (self.work / "home").rglob("*.log"):
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            lines = f.read_text(errors="replace").splitlines()[-200:]
            (out_dir / "logs" / f"worker-{f.name}").write_text("\n".join(lines) + "\n")
        self.cli("down", self.name, timeout=120)
        svc.stop_services(self.started, grace=5)


class PlaneWorker:
    """plane_worker.py: our EngineHandler behind the request plane of a given source file."""

    def __init__(self, args: argparse.Namespace, nats_url: str, work: Path) -> None:
        from launcher.plan import flags_to_argv

        self.log = work / "plane-worker.log"
        argv = [sys.executable, str(HERE / "plane_worker.py"), "--plane", args.before_plane, "--nats", nats_url,
                "--subject", BEFORE_SUBJECT, "--model", str(Path(args.model).resolve()),
                *flags_to_argv(json.loads(args.engine))]
        env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONPATH": _pythonpath()}
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = args.gpus
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)

    async def wait_ready(self, timeout: float = 500) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"READY" in self.log.read_bytes():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"plane worker exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            await asyncio.sleep(1)
        raise RuntimeError(f"plane worker not ready after {timeout:.0f} s")

    def close(self, out_dir: Path) -> None:
        _stop(self.proc)
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        lines = self.log.read_text(errors="replace").splitlines()[-200:]
        (out_dir / "logs" / "plane-worker-before.log").write_text("\n".join(lines) + "\n")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


class VllmServe:
    """`vllm serve` with the same engine flags on a free port."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from launcher import services as svc
        from launcher.plan import flags_to_argv

        self.port = svc.free_port()
        self.log = work / "vllm-serve.log"
        entry = ([sys.executable, str(ROOT / "bench" / "vllm_serve_shim.py")] if _cpu_build()
                 else [sys.executable, "-m", "vllm.entrypoints.cli.main"])
        argv = [*entry, "serve", str(Path(args.model).resolve()), "--host", "127.0.0.1", "--port", str(self.port),
                *flags_to_argv(json.loads(args.engine))]
        env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = args.gpus
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.model = ""

    async def wait_ready(self, timeout: float = 500) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                models = await get_json("127.0.0.1", self.port, "/v1/models")
                self.model = models["data"][0]["id"]
                return
            except (OSError, ValueError, KeyError, IndexError, HttpError):
                pass
            await asyncio.sleep(1)
        raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s")

    def close(self, out_dir: Path) -> None:
        _stop(self.proc)
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        lines = self.log.read_text(errors="replace").splitlines()[-200:]
        (out_dir / "logs" / "vllm-serve.log").write_text("\n".join(lines) + "\n")


def _cpu_env() -> dict[str, str]:
    """The CPU build's KV-cache size, when the caller set one (the CPU dry run), reaches the worker too."""
    return {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE",) if k in os.environ}


def _cpu_build() -> bool:
    import importlib.metadata as md

    try:
        md.version("vllm")
        return False
    except md.PackageNotFoundError:
        return True


def server_processes(side: str, dep: Deployment | None, serve: VllmServe | None) -> list[Any]:
    """The processes that serve a side's requests between the client and the engine, whose CPU time per
    point says whether they, not the engine, set the pace: every process of a frontend (`processes: N`,
    found by its port), the API server of `vllm serve`; none for the NATS sides (their client is measured
    as client_busy)."""
    import psutil

    port = dep.frontend_ports.get(side) if dep else None
    if side == "serve" and serve is not None:
        return [psutil.Process(serve.proc.pid)]
    if not port:
        return []
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "workers.frontend.server" in argv and ("--port", str(port)) in itertools.pairwise(argv):
            found.append(proc)
    return found


def cpu_seconds(procs: list[Any]) -> list[float]:
    """User + system CPU seconds of each process so far (0 for one that is gone)."""
    import psutil

    out = []
    for proc in procs:
        try:
            t = proc.cpu_times()
            out.append(t.user + t.system)
        except psutil.Error:
            out.append(0.0)
    return out


def http_side(host: str, port: int, model: str, counts: dict[str, int]) -> loadgen.Stream:
    """An OpenAI /v1/completions stream reduced to token counts per chunk.

    Counted from `usage.completion_tokens` (continuous usage stats: cumulative per chunk), which both
    `vllm serve` and our frontend send; `token_ids` (return_token_ids) cross-check it where present.
    """

    async def stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        s = req["sampling"]
        body = {"model": model, "prompt": req["token_ids"], "max_tokens": s["max_tokens"], "temperature": 0.0,
                "ignore_eos": True, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        done = 0
        ids_seen = 0
        async for event in post_sse(host, port, "/v1/completions", body):
            for choice in event.get("choices") or []:
                ids_seen += len(choice.get("token_ids") or ())
            usage = event.get("usage") or {}
            total = usage.get("completion_tokens")
            if total is None:
                if event.get("choices"):
                    counts["chunks_without_usage"] = counts.get("chunks_without_usage", 0) + 1
                continue
            if total > done:
                yield {"n_tokens": total - done}
                done = total
        if ids_seen and ids_seen != done:
            counts["token_ids_vs_usage_mismatch"] = counts.get("token_ids_vs_usage_mismatch", 0) + 1

    return stream


def nats_side(nc: Any, subject: str, idle_timeout: float, plane: Any = None) -> loadgen.Stream:
    """Our client's stream over NATS (plane: another requestplane module, for the before side)."""
    if plane is None:
        from workers.runtime import requestplane as plane

    async def stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in plane.stream(nc, subject, req, idle_timeout):
            if item.is_error():
                raise RuntimeError(f"worker error: {item.comment}")
            yield item.data or {}

    return stream


async def run(args: argparse.Namespace) -> None:
    from launcher.plan import flags_to_argv
    from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser
    from workers.runtime import requestplane

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    (out / "command.txt").write_text(" ".join(sys.argv) + "\n")
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    sides = [s for s in args.sides if s != "before" or args.before_plane]
    streams: dict[str, loadgen.Stream] = {}
    specs: dict[str, dict[str, Any]] = {}  # what a client process needs to open the side itself
    counts: dict[str, int] = {}
    shards = None
    t_start = time.monotonic()
    dep = serve = engine = nc = before = nc_before = None
    try:
        if "nats" in sides or any(side in sides for side in FRONTEND_SIDES):
            try:
                log("launcher up (worker + NATS)")
                dep = Deployment(args, work)
                dep.up()
                log("worker ready")
                nc = await requestplane.connect(dep.nats, "bench-compare")
                subject = requestplane.endpoint_subject(dep.name, "vllm", "generate")
                streams["nats"] = nats_side(nc, subject, args.idle_timeout)
                specs["nats"] = {"kind": "nats", "url": dep.nats, "subject": subject,
                                 "idle_timeout": args.idle_timeout}
            except Exception as exc:  # a side that cannot start is reported, the others still run
                log(f"FAIL side nats: {type(exc).__name__}: {exc}")
        if "before" in sides and dep is not None:
            try:
                from plane_worker import load_plane

                log(f"plane worker with {args.before_plane} starting")
                before = PlaneWorker(args, dep.nats, work)
                await before.wait_ready()
                old_plane = load_plane(args.before_plane)
                nc_before = await old_plane.connect(dep.nats, "bench-compare-before")
                streams["before"] = nats_side(nc_before, BEFORE_SUBJECT, args.idle_timeout, old_plane)
                log("plane worker ready")
            except Exception as exc:
                log(f"FAIL side before: {type(exc).__name__}: {exc}")
        if "serve" in sides:
            try:
                log("vllm serve starting")
                serve = VllmServe(args, work)
                await serve.wait_ready()
                log(f"vllm serve ready on port {serve.port}, model {serve.model}")
                streams["serve"] = http_side("127.0.0.1", serve.port, serve.model, counts)
                specs["serve"] = {"kind": "http", "host": "127.0.0.1", "port": serve.port, "model": serve.model}
            except Exception as exc:
                log(f"FAIL side serve: {type(exc).__name__}: {exc}")
        for side in FRONTEND_SIDES:
            if side not in sides:
                continue
            try:
                if side == "frontend" and args.frontend_url:
                    host, _, port_text = args.frontend_url.removeprefix("http://").partition(":")
                    port = int(port_text)
                elif dep is not None and (port := dep.frontend_ports.get(side, 0)):
                    host = "127.0.0.1"
                else:
                    raise RuntimeError("no deployment to put a frontend in")
                models = await get_json(host, port, "/v1/models")
                streams[side] = http_side(host, port, models["data"][0]["id"], counts)
                specs[side] = {"kind": "http", "host": host, "port": port, "model": models["data"][0]["id"]}
                log(f"{side} on {host}:{port}")
            except Exception as exc:
                log(f"FAIL side {side}: {type(exc).__name__}: {exc}")
        if "inprocess" in sides:
            log("in-process AsyncLLM starting")
            if args.gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
            eargs = make_parser("in-process").parse_args(["--model", args.model,
                                                          *flags_to_argv(json.loads(args.engine))])
            engine = build_engine(engine_args_from(eargs))
            handler = EngineHandler(engine, "inprocess")

            async def inproc_stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
                async for chunk in handler.generate(req):
                    yield dict(chunk)

            streams["inprocess"] = inproc_stream
        sides = [s for s in sides if s in streams]
        if args.client_processes > 1:
            from client_shards import ClientShards

            shards = await ClientShards(args.client_processes).start()
            log(f"client: {args.client_processes} processes for sides {[s for s in sides if s in specs]}; "
                f"in this process: {[s for s in sides if s not in specs]}")

        servers = {side: server_processes(side, dep, serve) for side in sides}

        async def measure(side: str, load: str, reqs: list[dict[str, Any]], conc: int
                          ) -> tuple[list[loadgen.Sample], float, float, list[float]]:
            """The load on one side: (samples, wall s, client_busy: the client's CPU time over its wall,
            server_busy: each server process's CPU time over the wall, busiest first)."""
            before = cpu_seconds(servers[side])
            if shards is not None and side in specs:
                samples, wall, busy = await shards.run(specs[side], load, reqs, conc, counts)
            else:
                cpu0 = time.process_time()
                samples, wall = await loadgen.LOADS[load](streams[side], reqs, conc)
                busy = (time.process_time() - cpu0) / max(wall, 1e-9)
            used = [b - a for a, b in zip(before, cpu_seconds(servers[side]), strict=True)]
            return samples, wall, busy, sorted((round(u / max(wall, 1e-9), 3) for u in used), reverse=True)
        (out / "sides.json").write_text(json.dumps({"sides": sides, "serve_argv": serve.argv if serve else None,
                                                    "topology": dep.topology.read_text() if dep else None}))
        log(f"engines up after {time.monotonic() - t_start:.0f} s; warm-up")
        for side in sides:
            for conc in args.concurrency:
                reqs = loadgen.make_requests(conc, args.prompt_len, args.max_tokens, args.vocab,
                                             seed=10_000 + conc, tag=f"warm-{side}")
                await measure(side, "waves", reqs, conc)
        log(f"warm-up done after {time.monotonic() - t_start:.0f} s")
        k = 0
        for rep in range(args.reps):
            if rep and time.monotonic() - t_start > args.budget_s:
                log(f"budget of {args.budget_s:.0f} s spent: stopping after {rep} repetitions")
                break
            for load in args.loads:
                for conc in args.concurrency:
                    n = max(args.min_requests, args.waves_per_point * conc)
                    n = math.ceil(n / conc) * conc
                    seed = 1000 * rep + conc + (0 if load == "waves" else 500)
                    reqs = loadgen.make_requests(n, args.prompt_len, args.max_tokens, args.vocab, seed)
                    order = sides[k % len(sides):] + sides[:k % len(sides)]
                    k += 1
                    for side in order:
                        samples, wall, busy, server_busy = await measure(side, load, reqs, conc)
                        row = {"side": side, "load": load, "concurrency": conc, "rep": rep,
                               **loadgen.figures(samples, wall), "client_busy": round(busy, 3),
                               "client_processes": args.client_processes if side in specs else 1,
                               "server_busy": server_busy}
                        with rows_file.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        log(json.dumps(row))
    finally:
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        text = loadgen.report(rows, sides, "inprocess" if "inprocess" in sides else sides[0])
        text += "\n\n" + client_busy_table(rows, sides) + "\n\n" + server_busy_table(rows, sides)
        text += f"\n\ncounts: {counts}\nwall: {time.monotonic() - t_start:.0f} s\n"
        (out / "report.txt").write_text(text)
        print(text, flush=True)
        if shards is not None:
            shards.close()
        for conn in (nc, nc_before):
            if conn is not None:
                await conn.close()
        if before is not None:
            before.close(out)
        if engine is not None:
            engine.shutdown()
        if serve is not None:
            serve.close(out)
        if dep is not None:
            dep.close(out)


def per_point_table(rows: list[dict[str, Any]], sides: list[str], key: str, title: str,
                    cell: Callable[[list[Any]], str], width: int) -> str:
    """One figure per side and point (load, concurrency), from the rows' `key` over the repetitions; sides
    that never recorded it are left out."""
    points = sorted({(r["load"], r["concurrency"]) for r in rows})
    shown = [s for s in sides if any(r.get(key) not in (None, []) for r in rows if r["side"] == s)]
    lines = [title, "load        conc  " + "  ".join(f"{s:>{width}}" for s in shown)]
    for load, conc in points:
        cells = []
        for side in shown:
            xs = [r[key] for r in rows
                  if (r["load"], r["concurrency"], r["side"]) == (load, conc, side) and r.get(key) not in (None, [])]
            cells.append(cell(xs) if xs else f"{'-':>{width}}")
        lines.append(f"{load:<10} {conc:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def client_busy_table(rows: list[dict[str, Any]], sides: list[str]) -> str:
    """How busy the client was per side and point: the busiest client process's CPU time over its wall time,
    mean over repetitions (near 1.0: the client, not the side, set the pace)."""
    return per_point_table(rows, sides, "client_busy",
                           "client_busy (CPU s per wall s of the busiest client process; mean over reps)",
                           lambda xs: f"{sum(xs) / len(xs):>10.2f}", 10)


def server_busy_table(rows: list[dict[str, Any]], sides: list[str]) -> str:
    """How busy each side's server processes were per point: the busiest one's CPU time over the wall, and
    the mean over its processes, means over repetitions (the busiest near 1.0: that process set the pace)."""

    def cell(xs: list[list[float]]) -> str:
        top = sum(x[0] for x in xs) / len(xs)
        mean = sum(sum(x) / len(x) for x in xs) / len(xs)
        return f"{top:>8.2f}/{mean:<5.2f}"

    return per_point_table(rows, sides, "server_busy", "server_busy (CPU s per wall s: busiest process / mean "
                           "over the side's processes; mean over reps)", cell, 14)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--engine", default="{}", help="vLLM flags as a topology's engine: JSON object")
    p.add_argument("--gpus", default="", help="CUDA_VISIBLE_DEVICES for every side (empty: CPU)")
    p.add_argument("--sides", nargs="+", default=["inprocess", "nats", "serve"], choices=SIDES)
    p.add_argument("--before-plane", default="", help="requestplane.py source of the 'before' side")
    p.add_argument("--frontend-url", default="", help="http://host:port of our OpenAI frontend (side frontend)")
    p.add_argument("--frontend-processes", type=int, default=4, help="HTTP processes of the frontend-n side")
    p.add_argument("--frontend-m-processes", type=int, default=8, help="HTTP processes of the frontend-m side")
    p.add_argument("--loads", nargs="+", default=["waves", "sustained"], choices=list(loadgen.LOADS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=128, help="requests per point and repetition, at least")
    p.add_argument("--waves-per-point", type=int, default=2, help="... and at least this many x concurrency")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=400, help="token ids are drawn below this")
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no repetition after this many seconds")
    p.add_argument("--client-processes", type=int, default=1, help=(
        "client processes for the nats and HTTP sides (bench/gpu/client_shards.py): each point's requests "
        "dealt over them, C/K in flight each; inprocess and before stay in this process"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.client_processes < 1 or any(c % args.client_processes for c in args.concurrency):
        p.error(f"--client-processes {args.client_processes}: give 1 or more, dividing every --concurrency")
    return args


def main(argv: list[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
