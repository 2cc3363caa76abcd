"""Load shapes and figures shared by the serving benchmarks: the same requests, timed the same way.

A side is a `Stream`: a function from a request dict to an async iterator of chunks, each chunk a
dict whose `token_ids` list holds the tokens it adds, or whose `n_tokens` says how many (an HTTP
side without token ids: the cumulative `usage.completion_tokens` of continuous usage stats). Tokens
are counted, never messages or SSE events.

* waves: send N at once, wait for all, repeat (N = the concurrency);
* sustained: keep C requests in flight, a new one starting as soon as one ends.

Figures per run: TTFT p50/p90 (first chunk carrying tokens), inter-token latency p50 (per request:
(latency - TTFT) / (tokens - 1)), request latency p50, output tokens/s over the measured wall time.
`report` prints means with [min-max] ranges over repetitions and paired ratios against a baseline side
(ratio of each repetition's figures, then mean and range), which is the number that matters.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

Stream = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


@dataclass
class Sample:
    ttft: float | None
    latency: float
    tokens: int


def make_requests(n: int, prompt_len: int, max_tokens: int, vocab: int, seed: int, tag: str = "bench"
                  ) -> list[dict[str, Any]]:
    """Seeded token-id prompts (a different seed per run: no prefix-cache hits across runs)."""
    rng = random.Random(seed)
    return [{"request_id": f"{tag}-{seed}-{k}",
             "token_ids": [rng.randrange(3, vocab) for _ in range(prompt_len)],
             "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
            for k in range(n)]


async def timed(stream: Stream, req: dict[str, Any]) -> Sample:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async for chunk in stream(req):
        n = chunk.get("n_tokens")
        if n is None:
            n = len(chunk.get("token_ids") or ())
        if n:
            if ttft is None:
                ttft = time.perf_counter() - t0
            tokens += n
    return Sample(ttft, time.perf_counter() - t0, tokens)


async def waves(stream: Stream, requests: list[dict[str, Any]], concurrency: int) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    t0 = time.perf_counter()
    for i in range(0, len(requests), concurrency):
        samples += await asyncio.gather(*(timed(stream, r) for r in requests[i:i + concurrency]))
    return samples, time.perf_counter() - t0


async def sustained(stream: Stream, requests: list[dict[str, Any]], concurrency: int
                    ) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    todo: Iterator[dict[str, Any]] = iter(requests)

    async def lane() -> None:
        for req in todo:  # a shared iterator: each lane takes the next request when its last one ends
            samples.append(await timed(stream, req))

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


LOADS = {"waves": waves, "sustained": sustained}


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else None


def figures(samples: list[Sample], wall: float) -> dict[str, Any]:
    ttfts = [s.ttft for s in samples if s.ttft is not None]
    itl = [(s.latency - s.ttft) / (s.tokens - 1) for s in samples if s.ttft is not None and s.tokens > 1]
    toks = sum(s.tokens for s in samples)
    return {"requests": len(samples), "output_tokens": toks, "wall_s": round(wall, 4),
            "tokens_per_s": round(toks / wall, 1) if wall else None,
            "ttft_ms_p50": _r(pct(ttfts, 0.5)), "ttft_ms_p90": _r(pct(ttfts, 0.9)),
            "itl_ms_p50": _r(pct(itl, 0.5)), "latency_ms_p50": _r(pct([s.latency for s in samples], 0.5)),
            "missing_ttft": len(samples) - len(ttfts)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


METRICS = ("ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50", "tokens_per_s")


def report(rows: list[dict[str, Any]], sides: list[str], baseline: str) -> str:
    """rows: {side, load, concurrency, rep, <figures>}. Means [ranges] per side, paired ratios vs baseline."""
    lines = []
    points = sorted({(r["load"], r["concurrency"]) for r in rows}, key=lambda p: (p[0], p[1]))
    for load, conc in points:
        lines.append(f"\n== {load}, concurrency {conc} ==")
        lines.append(f"{'side':12} {'reps':>4} " + " ".join(f"{m:>26}" for m in METRICS))
        base = {r["rep"]: r for r in rows if r["side"] == baseline and r["load"] == load and r["concurrency"] == conc}
        for side in sides:
            mine = [r for r in rows if r["side"] == side and r["load"] == load and r["concurrency"] == conc]
            if not mine:
                continue
            cells = []
            for m in METRICS:
                xs = [r[m] for r in mine if r.get(m) is not None]
                cells.append(f"{_mean_range(xs):>26}")
            lines.append(f"{side:12} {len(mine):>4} " + " ".join(cells))
        for side in sides:
            if side == baseline:
                continue
            mine = {r["rep"]: r for r in rows if r["side"] == side and r["load"] == load and r["concurrency"] == conc}
            cells = []
            for m in METRICS:
                ratios = [mine[k][m] / base[k][m] for k in mine
                          if k in base and mine[k].get(m) and base[k].get(m)]
                diffs = [mine[k][m] - base[k][m] for k in mine if k in base and mine[k].get(m) is not None
                         and base[k].get(m) is not None]
                extra = f" ({statistics.mean(diffs):+.1f})" if diffs and m.startswith("ttft") else ""
                cells.append(f"{_mean_range(ratios, 3) + extra:>26}")
            if cells:
                lines.append(f"{side + '/' + baseline[:5]:12} {'':>4} " + " ".join(cells))
    return "\n".join(lines)


def _mean_range(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


if __name__ == "__main__":  # python bench/loadgen.py rows.jsonl [baseline]: the report of a run cut short
    import json
    import sys
    from pathlib import Path

    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    sides = list(dict.fromkeys(r["side"] for r in rows))
    base = sys.argv[2] if len(sys.argv) > 2 else ("inprocess" if "inprocess" in sides else sides[0])
    print(report(rows, [base, *[s for s in sides if s != base]], base))
