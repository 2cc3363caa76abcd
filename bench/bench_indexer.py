"""The router's index alone, on one core: event apply rate, decision rate and latency, memory.

    python bench/bench_indexer.py [--workers 64] [--seqs-per-worker 500] [--block-size 16]

Workload: 64 workers each cache `seqs-per-worker` 32-block sequences; a sequence is one of 64
shared 16-block prefixes plus a unique 16-block tail, so ~1M (worker, block) entries with heavy
sharing. Events are encoded exactly as kv workers publish them on NATS (events.EventBatch
msgpack) and the apply rate includes decoding them. A worker that already holds a prefix gets
only the tail's BlockStored (parent = the prefix's last block), as vLLM reports it.

Both index forms (FlatIndex, TreeIndex) run side by side in one run; the table reports the ratio.
Decisions are KvRouter.choose (hash the request's blocks, match, cost over 64 workers). The last
rows time the whole routing path with tokenization (transformers tokenizer of the demo model).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.common.protocol import GenerateRequest
from workers.kv_router import events as ev
from workers.kv_router.indexer import BlockHasher, FlatIndex, TreeIndex
from workers.kv_router.router import KvRouter
from workers.runtime.registry import Registration

PREFIXES = 64
PREFIX_BLOCKS = 16
TAIL_BLOCKS = 16


def make_batches(workers: int, seqs: int, bs: int, rng: np.random.Generator) -> tuple[list[bytes], int, list[Any]]:
    """Encoded event batches (one per worker per 50 sequences), total blocks, and the sequences' tokens."""
    prefixes = rng.integers(0, 50_000, size=(PREFIXES, PREFIX_BLOCKS * bs), dtype=np.int32)
    batches: list[bytes] = []
    total = 0
    samples: list[Any] = []
    for w in range(workers):
        held: dict[int, list[ev.EngineHash]] = {}  # prefix -> its engine hashes on this worker
        seq_no = 0
        events: list[ev.Event] = []
        for s in range(seqs):
            p = int(rng.integers(0, PREFIXES))
            tail = rng.integers(0, 50_000, size=TAIL_BLOCKS * bs, dtype=np.int32)
            if s < 2:
                samples.append(np.concatenate([prefixes[p], tail]))
            if p not in held:
                hashes: list[ev.EngineHash] = [int(x) for x in rng.integers(1, 2**62, size=PREFIX_BLOCKS)]
                held[p] = hashes
                events.append(ev.Stored(hashes=hashes, parent=None, tokens=prefixes[p].tobytes()))
                total += PREFIX_BLOCKS
            tail_hashes: list[ev.EngineHash] = [int(x) for x in rng.integers(1, 2**62, size=TAIL_BLOCKS)]
            events.append(ev.Stored(hashes=tail_hashes, parent=held[p][-1], tokens=tail.tobytes()))
            total += TAIL_BLOCKS
            if len(events) >= 50:
                batches.append(ev.batch_encoder.encode(ev.EventBatch(worker=1000 + w, seq=seq_no, block_size=bs,
                                                                     events=events)))
                seq_no += 1
                events = []
        if events:
            batches.append(ev.batch_encoder.encode(ev.EventBatch(worker=1000 + w, seq=seq_no, block_size=bs,
                                                                 events=events)))
    return batches, total, samples


def apply_all(index: Any, batches: list[bytes], workers: int = 0) -> None:
    """The router's own path: decode each NATS payload, check its sequence number, apply it."""
    router = KvRouter("prefix", index.block_size)
    router.index = index
    decode = ev.batch_decoder.decode
    on_batch = router.on_batch
    for raw in batches:
        on_batch(decode(raw))
    assert not router.resync_requests, "the workload's batches should apply without a resync"


def router_over(index: Any, workers: int, bs: int) -> KvRouter:
    r = KvRouter("prefix", bs, rng=random.Random(0))
    for w in range(workers):
        r.add_worker(Registration(namespace="b", component="backend", endpoint="generate", subject="s",
                                  lease_id=1000 + w, process=f"w{w}", block_size=bs))
    r.index = index
    return r


def percentiles(ns: list[int]) -> tuple[float, float]:
    arr = np.array(ns) / 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def bench_form(cls: type, batches: list[bytes], total: int, queries: list[Any], workers: int, bs: int
               ) -> dict[str, float]:
    gc.collect()
    index = cls(bs)
    t0 = time.perf_counter()
    apply_all(index, batches)
    apply_s = time.perf_counter() - t0
    router = router_over(index, workers, bs)
    lat = []
    matched = 0
    t0 = time.perf_counter()
    for q in queries:
        s = time.perf_counter_ns()
        d = router.choose(q)
        lat.append(time.perf_counter_ns() - s)
        matched += d.matches.get(d.worker, 0)
    decide_s = time.perf_counter() - t0
    p50, p99 = percentiles(lat)
    del router, index
    gc.collect()
    # Memory: build again under tracemalloc (slower, so not timed); only what the index keeps counts.
    tracemalloc.start()
    index = cls(bs)
    apply_all(index, batches)
    gc.collect()
    mem, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del index
    return {"apply": total / apply_s, "decide": len(queries) / decide_s, "p50": p50, "p99": p99,
            "mem_mb": mem / 2**20, "hit_blocks": matched / len(queries)}


def bench_tokenized(queries_text: list[str], index: Any, workers: int, bs: int,
                    model: Path) -> tuple[float, float, int]:
    from workers.kv_router.router import Tokenizer

    tok = Tokenizer(str(model))
    router = router_over(index, workers, bs)
    lat = []
    ntok = 0
    for text in queries_text:
        s = time.perf_counter_ns()
        ids = tok(GenerateRequest(prompt=text))
        router.choose(ids)
        lat.append(time.perf_counter_ns() - s)
        ntok = len(ids)
    p50, p99 = percentiles(lat)
    return p50, p99, ntok


def compare_hashes(bs: int) -> None:
    """Why blocks are hashed from their int32 bytes: side by side with a vectorised numpy hash."""
    k = (np.random.default_rng(1).integers(0, 2**63, size=bs, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)

    def numpy_content(tokens: Any) -> list[int]:
        arr = np.asarray(tokens if not isinstance(tokens, bytes) else np.frombuffer(tokens, dtype="<i4"),
                         dtype=np.uint64)
        n = len(arr) // bs
        x = (arr[: n * bs].reshape(n, bs) + np.uint64(1)) * k
        x ^= x >> np.uint64(31)
        return x.sum(axis=1, dtype=np.uint64).tolist()

    bytes_content = BlockHasher(bs).content
    rng = np.random.default_rng(3)
    print(f"\nblock content hash, block size {bs}: {'numpy us':>9} {'bytes us':>9} {'bytes/numpy':>12}")
    for nb in (1, 16, 32):
        arr = rng.integers(0, 50_000, nb * bs).astype(np.int32)
        for label, x in ((f"request array, {nb} blocks", arr), (f"event bytes, {nb} blocks", arr.tobytes())):
            times = []
            for f in (numpy_content, bytes_content):
                best = 1e9
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(5000):
                        f(x)
                    best = min(best, (time.perf_counter() - t0) / 5000 * 1e6)
                times.append(best)
            print(f"  {label:38} {times[0]:9.2f} {times[1]:9.2f} {times[1] / times[0]:12.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--seqs-per-worker", type=int, default=900)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "models" /
                   "SmolLM2-135M-Instruct")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    rng = np.random.default_rng(42)
    bs = args.block_size
    compare_hashes(bs)
    t0 = time.perf_counter()
    batches, total, samples = make_batches(args.workers, args.seqs_per_worker, bs, rng)
    print(f"workload: {args.workers} workers, {total:,} (worker, block) entries in {len(batches)} NATS batches "
          f"({sum(map(len, batches)) / 2**20:.0f} MiB encoded), block size {bs}, 32-block requests "
          f"(built in {time.perf_counter() - t0:.0f} s)")
    # Queries: half repeat a cached sequence (full hits), half share only a prefix (new tail).
    queries = []
    for i in range(args.queries):
        base = samples[i % len(samples)]
        if i % 2:
            base = np.concatenate([base[: PREFIX_BLOCKS * bs], rng.integers(0, 50_000, size=TAIL_BLOCKS * bs,
                                                                          dtype=np.int32)])
        queries.append(base)  # int32 arrays, as the router's tokenizer returns them
    results = {cls.__name__: bench_form(cls, batches, total, queries, args.workers, bs)
               for cls in (FlatIndex, TreeIndex)}
    f, t = results["FlatIndex"], results["TreeIndex"]
    rows = [("blocks applied/s (decode+apply)", "apply", "{:,.0f}", ">= 1M/s"),
            ("routing decisions/s", "decide", "{:,.0f}", ">= 100k/s"),
            ("decision p50 (us)", "p50", "{:.1f}", ""),
            ("decision p99 (us)", "p99", "{:.1f}", "<= 50 us"),
            ("index memory (MiB, tracemalloc)", "mem_mb", "{:.0f}", "<= 150 MB"),
            ("matched blocks / request (chosen)", "hit_blocks", "{:.1f}", "")]
    print(f"\n{'metric':36} {'FlatIndex':>14} {'TreeIndex':>14} {'flat/tree':>10}  goal")
    for label, key, fmt, goal in rows:
        print(f"{label:36} {fmt.format(f[key]):>14} {fmt.format(t[key]):>14} {f[key] / t[key]:>10.2f}  {goal}")
    if (args.model / "config.json").exists():
        index = FlatIndex(bs)
        apply_all(index, batches)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(args.model))
        texts: list[str] = [str(tok.decode(q[: 32 * bs].tolist())) for q in queries[:2000]]
        p50, p99, ntok = bench_tokenized(texts, index, args.workers, bs, args.model)
        print(f"\nwhole routing path incl. tokenization (FlatIndex, ~{ntok}-token prompts): "
              f"p50 {p50:.0f} us, p99 {p99:.0f} us")
    else:
        print(f"\n(no model at {args.model}: tokenization row skipped; scripts/make_models.py demo makes it)")


if __name__ == "__main__":
    main()
