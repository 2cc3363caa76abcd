"""The benchmark's client spread over K processes, so that the client is not what a side is measured by.

Why: one Python process parses every SSE event of every HTTP side. At C=64 on an H100 that is ~20k
events a second (one per token, with continuous usage stats), near what one asyncio process can read, while
the nats side's client reads lighter messages. A side limited by the client would look slower than it is.
With `--client-processes K`, each point's requests are dealt round-robin to K processes (spawned once),
each running the same load shape with C/K in flight on its own connections (its own NATS connection for
the nats side), started together; their samples are pooled and the wall time runs from the first start to
the last end (CLOCK_MONOTONIC is one clock for every process of the host). A wave of C is then K waves of
C/K started together by K processes, not one synchronized wave. Each process also reports the
CPU time it spent, so every row says how busy the client was (`client_busy`: the busiest process's CPU
time over its wall time; near 1.0 means the client, not the side, set the pace).

A side is described by a picklable spec: {"kind": "http", "host", "port", "model"} or {"kind": "nats",
"url", "subject", "idle_timeout"}.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from dataclasses import asdict
from typing import Any

import loadgen


async def _open(spec: dict[str, Any], counts: dict[str, int]) -> tuple[loadgen.Stream, Any]:
    if spec["kind"] == "http":
        from bench_compare import http_side

        return http_side(spec["host"], spec["port"], spec["model"], counts), None
    from bench_compare import nats_side

    from workers.runtime import requestplane

    nc = await requestplane.connect(spec["url"], "bench-client-shard")
    return nats_side(nc, spec["subject"], spec["idle_timeout"]), nc


async def _shard(spec: dict[str, Any], load: str, requests: list[dict[str, Any]], concurrency: int
                 ) -> dict[str, Any]:
    counts: dict[str, int] = {}
    stream, nc = await _open(spec, counts)
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        samples, _ = await loadgen.LOADS[load](stream, requests, concurrency)
        t1, cpu = time.monotonic(), time.process_time() - cpu0
    finally:
        if nc is not None:
            await nc.close()
    return {"samples": [asdict(s) for s in samples], "start": t0, "end": t1, "cpu_s": cpu, "counts": counts}


def run_shard(spec: dict[str, Any], load: str, requests: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return asyncio.run(_shard(spec, load, requests, concurrency))


class ClientShards:
    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))

    async def start(self) -> ClientShards:
        """Spawn all K now (each imports its modules once), not inside the first measured point."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, time.sleep, 0.5) for _ in range(self.processes)))
        return self

    async def run(self, spec: dict[str, Any], load: str, requests: list[dict[str, Any]], concurrency: int,
                  counts: dict[str, int]) -> tuple[list[loadgen.Sample], float, float]:
        """The load over K processes: (samples, wall seconds, client_busy)."""
        k = self.processes
        if concurrency % k:
            raise ValueError(f"concurrency {concurrency} is not a multiple of --client-processes {k}")
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self.pool, run_shard, spec, load, requests[i::k], concurrency // k)
                   for i in range(k)]
        results = await asyncio.gather(*futures)
        samples = [loadgen.Sample(**s) for r in results for s in r["samples"]]
        for r in results:
            for key, n in r["counts"].items():
                counts[key] = counts.get(key, 0) + n
        wall = max(r["end"] for r in results) - min(r["start"] for r in results)
        busy = max(r["cpu_s"] / max(r["end"] - r["start"], 1e-9) for r in results)
        return samples, wall, busy

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
