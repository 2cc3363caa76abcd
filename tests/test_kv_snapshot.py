"""Snapshots (and any relayed batch) fit in NATS messages: split into consecutive numbered batches.

The last test runs a real nats-server and etcd: a worker-side BatchSender answers the router's
resync with a snapshot of 200,000 blocks (~15 MB, far over the 1 MB max payload) and a real
RouterService, fed from NATS, ends holding exactly those blocks, even when it asks again mid-run.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import until
from tests.test_retries import IdsOnly
from workers.kv_router import events as ev
from workers.kv_router.router import KvRouter, RouterService
from workers.runtime import requestplane
from workers.runtime.registry import Registration, Registry
from workers.runtime.serve import WorkerContext
from workers.runtime.settings import RuntimeSettings


def flat(events: list[ev.Event], bs: int) -> list[tuple[Any, Any, bytes]]:
    """(hash, parent, token bytes) per block, in order."""
    out = []
    for e in events:
        assert isinstance(e, ev.Stored)
        parent = e.parent
        for i, h in enumerate(e.hashes):
            out.append((h, parent, e.tokens[i * 4 * bs:(i + 1) * 4 * bs]))
            parent = h
    return out


def random_mirror(rng: random.Random, bs: int, n_seqs: int) -> ev.BlockMirror:
    """Sequences branching off earlier ones, some blocks evicted (their descendants become orphans)."""
    m = ev.BlockMirror(bs)
    next_hash = 1
    for _ in range(n_seqs):
        live = list(m.blocks)
        parent = rng.choice(live) if live and rng.random() < 0.7 else None
        k = rng.randint(1, 40)
        hashes = list(range(next_hash, next_hash + k))
        next_hash += k
        m.apply(ev.Stored(hashes=hashes, parent=parent, tokens=ev.tokens_bytes(
            [rng.randrange(50_000) for _ in range(k * bs)])))
        if rng.random() < 0.2:
            m.apply(ev.Removed(hashes=[rng.choice(list(m.blocks))]))
    return m


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), max_bytes=st.sampled_from([600, 2_000, 20_000]))
def test_chunking_keeps_order_and_parents_and_size(seed: int, max_bytes: int) -> None:
    bs = 4
    m = random_mirror(random.Random(seed), bs, 30)
    snap = list(m.snapshot())
    chunks = list(ev.chunk_events(snap, max_bytes))
    # The same blocks, in the same order, each with the same parent, and every batch under the limit.
    assert flat([e for c in chunks for e in c], bs) == flat(snap, bs)
    for seq, c in enumerate(chunks):
        raw = ev.batch_encoder.encode(ev.EventBatch(worker=2**62, seq=2**40 + seq, block_size=bs, events=c,
                                                    snapshot=True))
        assert len(raw) <= max_bytes
    # Parents first: a block's parent (if any) came before it, so the blocks apply in this order.
    seen: set[Any] = set()
    for h, parent, _ in flat(snap, bs):
        assert parent is None or parent in seen
        seen.add(h)
    # Exactly the reachable blocks: walk each live block up to a root.
    reachable = set()
    for h in m.blocks:
        x: Any = h
        while x is not None and x in m.blocks:
            x = m.blocks[x][0]
        if x is None:
            reachable.add(h)
    assert seen == reachable


def test_one_event_too_big_is_split_parents_first() -> None:
    tokens = ev.tokens_bytes(list(range(1000 * 16)))
    big = ev.Stored(hashes=[b"h%05d" % i for i in range(1000)], parent=b"root", tokens=tokens)
    chunks = list(ev.chunk_events([ev.Removed(hashes=[7]), big, ev.Cleared()], 8_000))
    assert len(chunks) > 8 and isinstance(chunks[0][0], ev.Removed) and isinstance(chunks[-1][-1], ev.Cleared)
    pieces = [e for c in chunks for e in c if isinstance(e, ev.Stored)]
    assert flat(pieces, 16) == flat([big], 16)


@dataclass
class Wire:
    """What BatchSender.batches needs of a NATS connection: the server's max payload."""

    max_payload: int


def test_router_ends_whole_after_a_lost_batch_or_a_resync_mid_snapshot() -> None:
    bs = 4
    m = random_mirror(random.Random(5), bs, 60)
    sender = ev.BatchSender(Wire(3_000), "ns", worker_id=9, block_size=bs)
    sender.seq = 17  # a snapshot continues the worker's sequence
    first = [ev.batch_decoder.decode(raw) for raw in sender.batches(m.snapshot(), snapshot=True)]
    assert len(first) > 4 and first[0].snapshot and not any(b.snapshot for b in first[1:])
    assert [b.seq for b in first] == list(range(17, 17 + len(first)))
    want = len(flat(list(m.snapshot()), bs))

    def router() -> KvRouter:
        r = KvRouter("prefix", bs)
        r.request_resync(9)
        r.resync_requests.clear()
        return r

    whole = router()
    for b in first:
        whole.on_batch(b)
    assert whole.index is not None and whole.index.block_count(9) == want and not whole.resync_requests
    # A batch of the run lost: a gap, so a resync; the next snapshot makes it whole.
    lossy = router()
    for b in first[:2] + first[3:]:
        lossy.on_batch(b)
    assert lossy.resync_requests == [9]
    again = [ev.batch_decoder.decode(raw) for raw in sender.batches(m.snapshot(), snapshot=True)]
    for b in again:
        lossy.on_batch(b)
    assert lossy.index is not None and lossy.index.block_count(9) == want
    # The router asks again mid-run: the rest of this run is ignored, the next one is taken whole.
    mid = router()
    for i, b in enumerate(first):
        mid.on_batch(b)
        if i == 2:
            mid.request_resync(9)
    assert mid.index is not None and mid.index.block_count(9) == 0
    for b in again:
        mid.on_batch(b)
    assert mid.index.block_count(9) == want


def test_a_200k_block_snapshot_over_real_nats(services) -> None:  # type: ignore[no-untyped-def]
    """20 shared 100-block prefixes, 3,960 50-block tails off them: 200,000 blocks, block size 16."""
    ns, bs = "snap200k", 16
    rng = np.random.default_rng(7)
    mirror = ev.BlockMirror(bs)
    prefixes: list[tuple[list[int], np.ndarray]] = []
    next_hash = 1
    for _ in range(20):
        toks = rng.integers(0, 50_000, 100 * bs, dtype=np.int32)
        hashes = list(range(next_hash, next_hash + 100))
        next_hash += 100
        mirror.apply(ev.Stored(hashes=hashes, parent=None, tokens=toks.tobytes()))
        prefixes.append((hashes, toks))
    probe = np.empty(0, dtype=np.int32)
    for i in range(3960):
        hashes_p, toks_p = prefixes[i % 20]
        toks = rng.integers(0, 50_000, 50 * bs, dtype=np.int32)
        hashes = list(range(next_hash, next_hash + 50))
        next_hash += 50
        mirror.apply(ev.Stored(hashes=hashes, parent=hashes_p[-1], tokens=toks.tobytes()))
        if i == 1234:
            probe = np.concatenate([toks_p, toks, toks[:7]])  # 150 full blocks held, then a partial one
    assert len(mirror.blocks) == 200_000

    async def run() -> tuple[KvRouter, int, list[int], list[int]]:
        w_nc = await requestplane.connect(services.nats, "w")
        w_reg = await Registry.connect([services.etcd])
        lease = await w_reg.grant(ttl=10)
        sender = ev.BatchSender(w_nc, ns, worker_id=lease, block_size=bs)
        lock = asyncio.Lock()
        sent: list[int] = []  # batches per snapshot

        async def on_resync(msg: Any) -> None:  # what EventRelay._on_resync does
            async with lock:
                sent.append(await sender.send(mirror.snapshot(), snapshot=True))

        await w_nc.subscribe(ev.resync_subject(ns, lease), cb=on_resync)
        await requestplane.flush_subscriptions(w_nc)
        await w_reg.register(Registration(namespace=ns, component="backend", endpoint="generate",
                                          subject=f"{ns}.backend.generate", lease_id=lease, instance_id=lease,
                                          process="w", block_size=bs), ttl=10)
        ctx = WorkerContext(RuntimeSettings(ns, (services.etcd,), services.nats, "router", "localhost"))
        await ctx.connect()
        router = KvRouter("prefix", None)
        # The router asks again after the third batch of the first snapshot it sees: it must end whole anyway.
        snapshots_seen: list[int] = []
        on_batch = router.on_batch

        def watching(batch: ev.EventBatch) -> None:
            if batch.snapshot:
                snapshots_seen.append(batch.seq)
            on_batch(batch)
            if len(snapshots_seen) == 1 and batch.seq == snapshots_seen[0] + 2:
                router.request_resync(batch.worker)

        router.on_batch = watching  # type: ignore[method-assign]
        service = RouterService(ctx, router, IdsOnly(), "backend")  # type: ignore[arg-type]
        await service.start()  # the worker is already registered: the router asks it for a snapshot
        try:
            await until(lambda: len(snapshots_seen) >= 2 and router.index is not None
                        and router.index.block_count(lease) == 200_000 and not router.awaiting_snapshot, 120,
                        "the router holds the worker's 200,000 blocks")
            return router, lease, sent, snapshots_seen
        finally:
            service.stop()
            await ctx.close()
            await w_reg.close()
            await w_nc.close()

    router, lease, sent, snapshots_seen = asyncio.run(run())
    assert len(snapshots_seen) >= 2  # the first run was cut short by the router asking again
    assert router.index is not None and router.index.block_count(lease) == 200_000
    assert len(sent) >= 2 and min(sent) > 10  # ~15 MB: many messages under the 1 MB max payload
    d = router.choose(probe)
    assert (d.worker, d.blocks, d.matches) == (lease, 150, {lease: 150})


def test_the_index_per_worker_is_a_metric_read_at_each_scrape() -> None:
    from workers.kv_router.metrics import _IndexCollector

    bs = 4
    m = random_mirror(random.Random(6), bs, 10)
    sender = ev.BatchSender(Wire(100_000), "ns", worker_id=9, block_size=bs)
    r = KvRouter("prefix", bs)
    r.add_worker(Registration(namespace="ns", component="backend", endpoint="generate", subject="s", lease_id=9,
                              instance_id=9, process="w9"))
    collector = _IndexCollector(r.indexed_blocks)
    assert [s.value for s in next(iter(collector.collect())).samples] == [0]
    for raw in sender.batches(m.snapshot(), snapshot=True):
        r.on_batch(ev.batch_decoder.decode(raw))
    (family,) = collector.collect()
    assert [(s.labels, s.value) for s in family.samples] == [({"worker": "w9"}, len(flat(list(m.snapshot()), bs)))]
    r.remove_worker(9)
    assert next(iter(collector.collect())).samples == []


def test_a_worker_publishes_its_load_when_it_changes_and_a_heartbeat_otherwise(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Unchanged, the load goes out only every LOAD_HEARTBEAT (an idle worker's reports were a sixth of an
    idle router's CPU); a change goes out within LOAD_INTERVAL, and so does a request's end (the routed list)."""
    from workers.kv_router import worker as kvw

    monkeypatch.setattr(kvw, "LOAD_INTERVAL", 0.01)
    monkeypatch.setattr(kvw, "LOAD_HEARTBEAT", 1.0)

    class Nc:
        def __init__(self) -> None:
            self.sent: list[tuple[float, ev.Load]] = []

        async def publish(self, subject: str, data: bytes) -> None:
            self.sent.append((time.monotonic(), ev.load_decoder.decode(data)))

    class Server:
        def __init__(self) -> None:
            self.routed: dict[str, list[int]] = {"_INBOX.r": [5]}

        def routed_in_flight(self) -> dict[str, list[int]]:
            return dict(self.routed)

    async def run() -> Nc:
        nc, state, server = Nc(), kvw.LoadState(running=1), Server()
        task = asyncio.create_task(kvw.publish_load(nc, "ns", 7, "w", state, server))
        try:
            await until(lambda: nc.sent, 2, "the first report")
            # Nothing changed: the next report is the heartbeat, a hundred reads later (the gaps, below)
            await until(lambda: len(nc.sent) == 2, 3, "the unchanged load's heartbeat")
            state.running = 2
            await until(lambda: len(nc.sent) == 3, 2, "the changed load")
            server.routed = {}
            await until(lambda: len(nc.sent) == 4, 2, "the request's end")
            await until(lambda: len(nc.sent) == 5, 3, "the heartbeat")
        finally:
            task.cancel()
        return nc

    sent = asyncio.run(run()).sent
    serving = {"_INBOX.r": [5]}
    assert [(m.running, m.routed) for _, m in sent] == [(1, serving), (1, serving), (2, serving), (2, {}), (2, {})]
    assert sent[1][0] - sent[0][0] >= 1.0 - 0.02 and sent[4][0] - sent[3][0] >= 1.0 - 0.02
