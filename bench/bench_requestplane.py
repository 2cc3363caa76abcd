"""MICRO-BENCHMARK OF THE REQUEST PLANE ALONE, WITH A FAKE TOKEN SOURCE (no vLLM, no model).

    python bench/bench_requestplane.py [--before 01d0cac] [--step-ms 5] [--max-tokens 64] [--reps 3]

What it isolates: the cost the NATS request plane (worker send path + client receive path) adds to
time to first token and tokens/s, before and after issue 13's changes, against consuming the same
token source in-process. The token source is a fake engine (labelled as such everywhere): every
--step-ms it gives each running request one token, a new request its first token at the next step,
and like vLLM's AsyncLLM (DELTA outputs) it merges what a slow consumer has not picked up yet.

Sides, alternating in a rotating order, same seeded requests, waves and sustained load at each
concurrency (bench/loadgen.py):
* inprocess: the fake engine in the benchmark's own process (the floor);
* before:    worker process + client with the request plane of git revision --before
             (a stream task per request publishing each delta; a subscription per request);
* after:     the same with this checkout's plane (sender.py's coalescing writer, inbox.py's shared
             reply subscription, msgspec request decode).
nats-server is real (from the venv). The GPU runs (bench/gpu/bench_compare.py) measure the real thing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import loadgen  # noqa: E402


def subject_of(side: str) -> str:
    return f"planebench.{side}.generate"


class FakeEngine:
    """FAKE token source: one token per running request per step; deltas merge while not consumed."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.running: dict[int, FakeRequest] = {}
        self._ids = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            # A step every step_s, never a burst of missed steps: in the benchmark's own process the
            # loop is busy with the other sides' clients, and catching up would fake a fast engine.
            tick = max(tick + self.step_s, loop.time())
            await asyncio.sleep(max(0.0, tick - loop.time()))
            for rid, req in list(self.running.items()):
                req.add_token()
                if req.produced >= req.max_tokens:
                    del self.running[rid]

    async def generate(self, raw: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
        self._ids += 1
        rid = self._ids
        req = FakeRequest(int(raw["sampling"]["max_tokens"]))
        self.running[rid] = req
        try:
            while True:
                chunk = await req.take()
                yield chunk
                if "finish_reason" in chunk:
                    return
        finally:
            self.running.pop(rid, None)


class FakeRequest:
    __slots__ = ("_event", "_ids", "max_tokens", "produced")

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.produced = 0
        self._ids: list[int] = []
        self._event = asyncio.Event()

    def add_token(self) -> None:
        self.produced += 1
        self._ids.append(self.produced)
        self._event.set()

    async def take(self) -> dict[str, Any]:
        await self._event.wait()
        self._event.clear()
        ids, self._ids = self._ids, []
        chunk: dict[str, Any] = {"text": " tok" * len(ids), "token_ids": ids}
        if self.produced >= self.max_tokens and not self._ids:
            chunk.update(finish_reason="length", prompt_tokens=512, cached_tokens=0, worker="fake")
        return chunk


def plane_module(rev: str | None) -> types.ModuleType:
    """This checkout's requestplane, or the one of git revision `rev` (loaded from `git show`)."""
    if rev is None:
        from workers.runtime import requestplane

        return requestplane
    source = subprocess.run(["git", "show", f"{rev}:workers/runtime/requestplane.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader(f"requestplane_{rev}", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:requestplane.py", "exec"), mod.__dict__)
    return mod


async def serve_worker(nats_url: str, subject: str, rev: str | None, step_s: float) -> None:
    plane = plane_module(rev)
    nc = await plane.connect(nats_url, "planebench-worker")
    engine = FakeEngine(step_s)
    server = plane.EndpointServer(nc, subject, subject + ".1", engine.generate)
    await server.start()
    print("READY", flush=True)
    await asyncio.Event().wait()


def start_worker(nats_url: str, side: str, rev: str | None, step_s: float) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, "worker", "--nats", nats_url, "--subject", subject_of(side),
            "--step-ms", str(step_s * 1000)]
    if rev:
        argv += ["--rev", rev]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        raise RuntimeError(f"worker did not start: {line}")
    return proc


async def compare(args: argparse.Namespace) -> None:
    from launcher import services as svc

    work = Path(tempfile.mkdtemp(prefix="planebench-"))
    nats_url = f"nats://127.0.0.1:{svc.free_port()}"
    nats = svc.start_nats(nats_url, work)
    step_s = args.step_ms / 1000
    procs = {"before": start_worker(nats_url, "before", args.before, step_s),
             "after": start_worker(nats_url, "after", None, step_s)}
    streams: dict[str, loadgen.Stream] = {}
    conns = []
    for side, rev in (("before", args.before), ("after", None)):
        plane = plane_module(rev)
        nc = await plane.connect(nats_url, f"planebench-client-{side}")
        conns.append(nc)
        streams[side] = _plane_stream(plane, nc, subject_of(side))
    inproc = FakeEngine(step_s)

    async def inproc_stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in inproc.generate(req):
            yield chunk

    streams["inprocess"] = inproc_stream
    sides = ["inprocess", "before", "after"]
    rows: list[dict[str, Any]] = []
    try:
        for side in sides:  # equal warm-up
            await loadgen.waves(streams[side], loadgen.make_requests(16, 8, 8, 400, seed=1), 16)
        k = 0
        for rep in range(args.reps):
            for load in args.loads:
                for conc in args.concurrency:
                    n = max(args.min_requests, 2 * conc)
                    reqs = loadgen.make_requests(n, args.prompt_len, args.max_tokens, 400, seed=rep * 1000 + conc)
                    order = sides[k % 3:] + sides[:k % 3]
                    k += 1
                    for side in order:
                        samples, wall = await loadgen.LOADS[load](streams[side], reqs, conc)
                        row = {"side": side, "load": load, "concurrency": conc, "rep": rep,
                               **loadgen.figures(samples, wall)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        for nc in conns:
            await nc.close()
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
        svc.stop_services([nats], grace=5)
    print(f"\nFAKE token source: one token per request every {args.step_ms} ms, {args.max_tokens} tokens, "
          f"prompt {args.prompt_len} token ids; before = {args.before}, after = this checkout")
    print(loadgen.report(rows, sides, "inprocess"))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


def _plane_stream(plane: types.ModuleType, nc: Any, subject: str) -> loadgen.Stream:
    async def stream(req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in plane.stream(nc, subject, req, 30.0):
            if item.is_error():
                raise RuntimeError(item.comment)
            yield item.data or {}

    return stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="compare", choices=["compare", "worker"])
    ap.add_argument("--before", default="01d0cac", help="git revision of the 'before' request plane")
    ap.add_argument("--rev", default=None, help="(worker mode) the revision to serve with")
    ap.add_argument("--nats", default="")
    ap.add_argument("--subject", default=subject_of("after"))
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--concurrency", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--loads", nargs="+", default=["waves", "sustained"], choices=list(loadgen.LOADS))
    ap.add_argument("--min-requests", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.mode == "worker":
        asyncio.run(serve_worker(args.nats, args.subject, args.rev, args.step_ms / 1000))
    else:
        t0 = time.monotonic()
        asyncio.run(compare(args))
        print(f"wall {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
