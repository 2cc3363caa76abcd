"""The KV-aware router: tokenizes once, picks the worker that already caches the longest prefix.

    python -m workers.kv_router.router --model M --routing-strategy prefix|round_robin|random [--block-size B]

Serves component `preprocess`, endpoint `generate` (so `python -m workers.common.client --component
preprocess ...` works). Each request is tokenized (the chat template for `messages`), split into
full blocks, hashed with the router's chained hash and matched against the index of every
worker's KV events; the request (now token ids) is handed off to the chosen worker's per-instance
subject with the caller's reply inbox (requestplane.Handoff): the worker streams to the caller, not
through the router, and reports the request's end to the router's own inbox (for its accounting of
requests in flight). The decision is logged, and the caller's stream attaches it to the final chunk
as `routing`. A caller that sees the worker lost asks again with the worker in `avoid` (the frontend's
retries and migrations), and the router passes over it, unless that would leave no worker.

Cost (strategy prefix): the KV blocks a request costs on each worker, capacity included; the
formula and why each term is there are in workers/kv_router/cost.py. Lowest wins.

Requests in flight: a request counts from its handoff until the worker reports its end, the worker's
registration is deleted, or (a lost report) a load report of that worker no longer lists it
LOST_END_AFTER seconds after the handoff.

Index lifecycle: a worker's blocks are dropped when its etcd registration disappears; a gap in a
worker's batch sequence, an event whose parent is unknown, or a worker already running when the
router starts, makes the router drop that worker's blocks and ask it for a snapshot (events.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.common.protocol import GenerateRequest
from workers.kinds import KINDS
from workers.kv_router import events as ev
from workers.kv_router import peers
from workers.kv_router.cost import CostWeights, Footprint, InflightBlocks, WorkerTable
from workers.kv_router.indexer import FlatIndex, Index
from workers.kv_router.metrics import RouterMetrics
from workers.kv_router.peers import PeerFeed, PeerTable, new_peer_id
from workers.runtime import requestplane
from workers.runtime.aio import wait_for
from workers.runtime.annotated import ErrorCode, StreamError
from workers.runtime.registry import Delete, Put, Registration, Snapshot, Update, instance_of_key
from workers.runtime.serve import WorkerContext, run_worker, serve_prometheus, setup_logging
from workers.runtime.settings import RuntimeSettings

log = logging.getLogger("workers.kv_router.router")

RESYNC_RETRY = 5.0
TOKENIZE_TIMEOUT = 30.0
# A request its worker's load report does not list this long after the handoff has ended (its end report was
# lost); long enough that a request still queued on its way to a busy worker is not taken for ended.
LOST_END_AFTER = 10.0
STRATEGIES = ("prefix", "round_robin", "random")


class NoWorker(RuntimeError):
    """No candidate left: none registered, or every one was tried for this request."""


@dataclass
class WorkerView:
    reg: Registration
    load: ev.Load | None = None
    inflight_requests: int = 0
    peer_requests: int = 0  # requests other routers told us they sent there (workers.kv_router.peers)
    others: int = 0  # requests beyond those, from the last load report (a router that tells nothing)
    queued: int = 0  # prefill blocks of our requests there without a first token yet (the cost's `queued`)

    @property
    def name(self) -> str:
        return self.reg.process or f"{self.reg.instance:x}"

    @property
    def capacity(self) -> float:
        """KV blocks the worker registered (num_gpu_blocks); infinite when it did not say."""
        blocks = self.reg.extra.get("num_gpu_blocks") if self.reg.extra else None
        return float(blocks) if isinstance(blocks, int) and blocks > 0 else math.inf


@dataclass
class Decision:
    """One routing decision; the per-worker detail is formatted only when logged or returned."""

    worker: int
    process: str
    strategy: str
    blocks: int
    matches: dict[int, int]  # worker -> leading blocks it holds (only workers with a match)
    candidates: list[int]
    router: KvRouter
    hashes: list[int] = field(default_factory=list)  # the request's full prompt blocks (chained hashes)
    footprint: Footprint | None = None
    id: int = 0  # what peers and the worker's end report know it by
    started: float = 0.0  # time.monotonic() of the handoff
    prefill: int = 0  # prompt blocks the chosen worker had to compute (neither cached nor being computed there)
    first_token: bool = False  # its worker reported the first token (its prefill no longer queued)

    @property
    def matched(self) -> dict[str, int]:
        names = self.router.workers
        return {names[w].name: self.matches.get(w, 0) for w in self.candidates if w in names}

    @property
    def load(self) -> dict[str, dict[str, float]]:
        return {self.router.workers[w].name: self.router.load_of(w) for w in self.candidates
                if w in self.router.workers}

    def as_dict(self) -> dict[str, Any]:
        return {"worker": f"{self.worker:x}", "process": self.process, "strategy": self.strategy,
                "blocks": self.blocks, "matched_blocks": self.matched, "load": self.load}


class KvRouter:
    """Index + worker set + strategy; the NATS/etcd plumbing around it is in `serve`."""

    def __init__(self, strategy: str, block_size: int | None, load_weight: float = 0.5,
                 rng: random.Random | None = None, weights: CostWeights | None = None,
                 model: str | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.block_size = block_size
        self.weights = weights or CostWeights(load=load_weight)
        self.rng = rng or random.Random()
        self.index: Index | None = FlatIndex(block_size) if block_size else None
        self.workers: dict[int, WorkerView] = {}
        self.last_seq: dict[int, int] = {}
        self.awaiting_snapshot: dict[int, float] = {}  # worker -> when we asked
        self.gone: set[int] = set()
        # A deployment may serve several models with kv_workers under one component: this router's are the
        # workers of its own --model; another model's are never candidates, and their KV events are dropped.
        self.model = model
        self.foreign: set[int] = set()
        self._rr = 0
        self.inflight = InflightBlocks()
        self.prefilling = InflightBlocks()  # our requests' prompt blocks until their first token (the queue term)
        self.table = WorkerTable()
        self.resync_requests: list[int] = []  # drained by the plumbing, which publishes them
        self._ids = itertools.count(1)
        self.decisions: dict[int, Decision] = {}  # ours in flight, by id
        self.peers = PeerTable(new_peer_id(), self.peer_started, self.peer_ended)
        self.feed: PeerFeed | None = None  # told of our own starts and finishes, for the peers (RouterService.share)
        self.ends_to: str | None = None  # the inbox our workers report ends to (RouterService.listen_for_ends)

    # ---- membership -------------------------------------------------------------------------
    def _ensure_index(self, block_size: int) -> Index:
        if self.index is None:
            self.block_size = block_size
            self.index = FlatIndex(block_size)
            log.info("block size %d (from the first worker)", block_size)
        return self.index

    def add_worker(self, reg: Registration, known_before_start: bool = False) -> None:
        if self.model is not None and reg.model and reg.model != self.model:
            if reg.instance not in self.foreign:
                self.foreign.add(reg.instance)
                log.info("worker %s serves %s, not %s: not routing to it", reg.process, reg.model, self.model)
                if self.index is not None:
                    self.index.remove_worker(reg.instance)  # events that came before its registration
            return
        if reg.block_size:
            self._ensure_index(reg.block_size)
        if self.block_size and reg.block_size and reg.block_size != self.block_size:
            log.error("worker %s has block size %s, this router %s: not routing to it", reg.process,
                      reg.block_size, self.block_size)
            return
        w = reg.instance
        view = self.workers.get(w)
        if view is None:
            view = self.workers[w] = WorkerView(reg)
            log.info("worker %s (%x) joined", reg.process, w)
        else:
            view.reg = reg  # the same instance under a new lease
        self.table.add(w, view.capacity)
        back = w in self.gone  # its key was deleted (lost lease) and put again: its blocks were dropped
        self.gone.discard(w)
        if known_before_start or back:
            self.request_resync(w)

    def on_registry(self, update: Update, known_before_start: bool = False) -> None:
        """One update of `Registry.follow` on the worker component. A Snapshot's `gone` keys take the
        path a delete takes (index and in-flight bookkeeping forget them); its workers are added."""
        match update:
            case Snapshot(registrations, gone):
                for key in gone:
                    self.remove_worker(instance_of_key(key))
                for reg in registrations.values():
                    if reg.endpoint == KINDS["kv_worker"].endpoint:
                        self.add_worker(reg, known_before_start)
            case Put(registration=reg) if reg.endpoint == KINDS["kv_worker"].endpoint:
                self.add_worker(reg)
            case Delete(key):
                self.remove_worker(instance_of_key(key))

    def remove_worker(self, w: int) -> None:
        self.foreign.discard(w)
        for d in [d for d in self.decisions.values() if d.worker == w]:
            self.finished(d)  # its requests are over here (a frontend continues them elsewhere)
        view = self.workers.pop(w, None)
        self.gone.add(w)
        self.last_seq.pop(w, None)
        self.awaiting_snapshot.pop(w, None)
        self.inflight.drop_worker(w)
        self.prefilling.drop_worker(w)
        self.peers.drop_worker(w)
        self.table.remove(w)
        if self.index is not None:
            self.index.remove_worker(w)
        if view is not None:
            log.info("worker %s (%x) left: its blocks are dropped", view.name, w)

    def indexed_blocks(self) -> dict[str, int]:
        """Worker name -> blocks the index holds for it (what the router believes it has cached)."""
        index = self.index
        return {view.name: index.block_count(w) if index is not None else 0 for w, view in list(self.workers.items())}

    def request_resync(self, worker: int) -> None:
        if self.index is not None:
            self.index.clear(worker)
        self.table.set("cached", worker, 0)
        self.last_seq.pop(worker, None)
        self.awaiting_snapshot[worker] = time.monotonic()
        self.resync_requests.append(worker)

    # ---- events -----------------------------------------------------------------------------
    def on_batch(self, batch: ev.EventBatch) -> None:
        w = batch.worker
        if w in self.gone or w in self.foreign:
            return
        if self.index is None and self.model is not None and w not in self.workers:
            return  # perhaps another model's worker: its block size is not ours to learn (a gap asks a resync)
        index = self._ensure_index(batch.block_size)
        if batch.block_size != index.block_size:
            log.error("worker %x sends block size %d, router uses %d: events ignored", w, batch.block_size,
                      index.block_size)
            return
        if batch.snapshot:
            index.clear(w)
            self.awaiting_snapshot.pop(w, None)
        elif w in self.awaiting_snapshot:
            return  # everything before the snapshot is in it; everything after follows it
        else:
            expected = self.last_seq.get(w, -1) + 1
            if batch.seq != expected:
                log.warning("worker %x: batch %d, expected %d: resyncing", w, batch.seq, expected)
                self.request_resync(w)
                return
        width = 4 * index.block_size
        # Every Stored event's blocks hashed in one numpy call: per-event calls cost more than the hashing.
        contents = index.hasher.content(b"".join([e.tokens for e in batch.events if isinstance(e, ev.Stored)
                                                  and len(e.tokens) == width * len(e.hashes)]))
        at = 0
        for e in batch.events:
            if isinstance(e, ev.Stored):
                if len(e.tokens) != width * len(e.hashes):
                    log.warning("worker %x: stored event with %d token bytes for %d blocks: skipped", w,
                                len(e.tokens), len(e.hashes))
                    continue
                n = len(e.hashes)
                at += n
                if not index.apply_stored_content(w, e.parent, e.hashes, contents[at - n:at]):
                    if batch.snapshot:
                        continue  # a block whose parent went missing: unreachable, harmless
                    log.warning("worker %x: stored block with unknown parent: resyncing", w)
                    self.request_resync(w)
                    return
            elif isinstance(e, ev.Removed):
                index.apply_removed(w, e.hashes)
            else:
                index.clear(w)
        self.last_seq[w] = batch.seq
        self.table.set("cached", w, index.block_count(w))

    def on_load(self, load: ev.Load) -> None:
        view = self.workers.get(load.worker)
        if view is not None:
            view.load = load
            # What the report shows beyond our own requests is another router's: ours are counted exactly
            # (the report is up to a second old), theirs only through it.
            w = load.worker
            view.others = max(0, load.running + load.waiting - view.inflight_requests - view.peer_requests)
            if math.isfinite(view.capacity):
                pinned = load.kv_usage * view.capacity
                self.table.set("reported", w, max(0.0, pinned - self.inflight.distinct(w)) if view.others else 0.0)
            self._sync_requests(w, view)
            if load.routed is not None and self.ends_to is not None:
                self._end_unlisted(w, set(load.routed.get(self.ends_to, ())))

    def _end_unlisted(self, w: int, serving: set[int]) -> None:
        """Our requests on w that its load report does not list, though handed off LOST_END_AFTER ago:
        their end reports were lost (a NATS reconnect), and they would count as in flight for ever."""
        cutoff = time.monotonic() - LOST_END_AFTER
        lost = [d for d in self.decisions.values() if d.worker == w and d.started < cutoff and d.id not in serving]
        for d in lost:
            self.finished(d)
        if lost:
            log.warning("worker %s: %d request(s) ended without an end report (lost): no longer counted",
                        self.workers[w].name, len(lost))

    def ended(self, decision_id: int) -> None:
        """A worker reported the end of one of our requests."""
        d = self.decisions.get(decision_id)
        if d is not None:
            self.finished(d)

    def stale_resyncs(self) -> list[int]:
        now = time.monotonic()
        return [w for w, t in self.awaiting_snapshot.items() if now - t > RESYNC_RETRY and w in self.workers]

    # ---- decisions --------------------------------------------------------------------------
    def hashes(self, token_ids: Sequence[int] | np.ndarray) -> list[int]:
        return self.index.hasher.chain(token_ids) if self.index is not None else []

    def choose(self, token_ids: Sequence[int] | np.ndarray, exclude: set[int] | None = None,
               max_tokens: int | None = None) -> Decision:
        # A draining worker finishes what it has and takes nothing new (its registration says so).
        exclude = (exclude or set()) | {w for w, v in self.workers.items() if v.reg.draining}
        candidates = [w for w in self.workers if w not in exclude]
        if not candidates:
            raise NoWorker("no kv worker is registered (is any worker up? launcher status)")
        hashes = self.hashes(token_ids)
        matches = self.index.match(hashes) if self.index is not None else {}
        fp = Footprint.of(len(token_ids), max_tokens, self.block_size or 1)
        inflight = self.inflight.match(hashes)
        overlaps = self.overlaps(hashes, matches, inflight)
        if self.strategy == "round_robin":
            candidates.sort()
            chosen = candidates[self._rr % len(candidates)]
            self._rr += 1
        elif self.strategy == "random":
            chosen = self.rng.choice(candidates)
        else:
            # Of the prefills queued there, the blocks this request needs too (the queue term's `shared`): its
            # leading blocks that queued requests are computing there, less those the worker holds already.
            shared = {w: m - min(matches.get(w, 0), m) for w, m in self.prefilling.match(hashes).items()} \
                if self.weights.queue else {}  # at weight 0 the term is off: no lookup on the hot path
            chosen = self.table.cheapest(fp, overlaps.items(), self.weights, exclude, self.rng, shared.items())
        return Decision(worker=chosen, process=self.workers[chosen].name, strategy=self.strategy, blocks=len(hashes),
                        matches=matches, candidates=candidates, router=self, hashes=hashes, footprint=fp,
                        id=next(self._ids), prefill=fp.prompt - min(overlaps.get(chosen, 0), fp.prompt))

    def overlaps(self, hashes: Sequence[int], matches: dict[int, int],
                 inflight: dict[int, int] | None = None) -> dict[int, int]:
        """Worker -> leading prompt blocks it holds (KV events) or is computing (our requests in flight:
        `inflight`, their match, when the caller has it)."""
        out = dict(matches)
        for w, m in (self.inflight.match(hashes) if inflight is None else inflight).items():
            if m > out.get(w, 0):
                out[w] = m
        return out

    def load_of(self, w: int) -> dict[str, float]:
        view = self.workers[w]
        out: dict[str, float] = {"inflight": view.inflight_requests}
        if view.peer_requests:
            out["peer_inflight"] = view.peer_requests
        if w in self.table.slot:  # the cost's inputs, in blocks: pinned (active), cached, and capacity
            state = self.table.state(w, 0)
            out.update(active_blocks=state.active, cached_blocks=float(self.table.cached[self.table.slot[w]]),
                       queued_prefill_blocks=state.queued)
            if math.isfinite(state.capacity):
                out["kv_blocks"] = state.capacity
        if view.load is not None:
            out.update(running=view.load.running, waiting=view.load.waiting, kv_usage=round(view.load.kv_usage, 3))
        return out

    def started(self, d: Decision) -> None:
        view = self.workers.get(d.worker)
        if view is not None:
            d.started = time.monotonic()
            private = self._private_blocks(d)
            view.inflight_requests += 1
            self.inflight.add(d.worker, d.hashes, private)
            self._sync_blocks(d.worker, view)
            self.decisions[d.id] = d
            self._queue(d.worker, view, d)
            if self.feed is not None:
                self.feed.started(d.id, d.worker, d.hashes, private)

    def announce_inflight(self) -> None:
        """Tell the peers (again) of every request of ours in flight: a new peer heard none of them start."""
        if self.feed is not None:
            for d in self.decisions.values():
                self.feed.started(d.id, d.worker, d.hashes, self._private_blocks(d))

    def first_token(self, decision_id: int) -> None:
        """A worker reported the first token of one of our requests: its prefill no longer waits ahead of others."""
        d = self.decisions.get(decision_id)
        if d is not None and not d.first_token:
            view = self.workers.get(d.worker)
            if view is not None:
                self._unqueue(d.worker, view, d)

    def _queue(self, w: int, view: WorkerView, d: Decision) -> None:
        view.queued += d.prefill
        self.prefilling.add(w, d.hashes, 0)
        self.table.set("queued", w, view.queued)

    def _unqueue(self, w: int, view: WorkerView, d: Decision) -> None:
        d.first_token = True
        view.queued = max(0, view.queued - d.prefill)
        self.prefilling.remove(w, d.hashes, 0)
        self.table.set("queued", w, view.queued)

    def finished(self, d: Decision) -> None:
        if self.decisions.pop(d.id, None) is not None and self.feed is not None:
            self.feed.finished(d.id)
        view = self.workers.get(d.worker)
        if view is not None:
            if not d.first_token:  # ended (failed, cancelled, lost) before its first token
                self._unqueue(d.worker, view, d)
            view.inflight_requests = max(0, view.inflight_requests - 1)
            self.inflight.remove(d.worker, d.hashes, self._private_blocks(d))
            self._sync_blocks(d.worker, view)

    # ---- other routers' requests (workers.kv_router.peers) ------------------------------------
    def peer_started(self, worker: int, hashes: Sequence[int], private: int) -> bool:
        """Another router sent a request to `worker`: its blocks are being computed there, as ours are.
        False for a worker this router does not know (yet): nothing is counted, so nothing is uncounted."""
        view = self.workers.get(worker)
        if view is None:
            return False
        view.peer_requests += 1
        self.inflight.add(worker, hashes, private)
        self._sync_blocks(worker, view)
        return True

    def peer_ended(self, worker: int, hashes: Sequence[int], private: int) -> None:
        view = self.workers.get(worker)
        if view is not None:
            view.peer_requests = max(0, view.peer_requests - 1)
            self.inflight.remove(worker, hashes, private)
            self._sync_blocks(worker, view)

    def _sync_blocks(self, w: int, view: WorkerView) -> None:
        """The table's view of our requests on w: distinct pinned blocks, their own blocks, their count."""
        self.table.set("own", w, self.inflight.distinct(w))
        self.table.set("private", w, self.inflight.private(w))
        self._sync_requests(w, view)

    def _sync_requests(self, w: int, view: WorkerView) -> None:
        """Requests in flight on w: ours, our peers', and those w last reported beyond both."""
        self.table.set("requests", w, view.inflight_requests + view.peer_requests + view.others)

    @staticmethod
    def _private_blocks(d: Decision) -> int:
        """Blocks of a request nobody else shares: its partial last prompt block and its decode."""
        return d.footprint.total - d.footprint.prompt if d.footprint is not None else 1


class Tokenizer:
    """transformers' tokenizer of --model: plain prompts as vLLM would encode them, chats templated.

    Only a caller that sends text needs it: the frontend sends token ids (rendered by vLLM's layer),
    so behind a frontend nothing here is loaded. transformers imports torch: 4 s of CPU (~16 s of wall
    time on a busy 2-core machine) and 430 of the router's 550 MB (bench/results/router-idle-cpu.md),
    taken from the engines it starts beside. So it loads on a thread when the first text request arrives
    (the price: that import then runs beside live traffic, and the loop, which gets the GIL back every
    switch interval, routes more slowly for those seconds; a deployment that mixes text callers with a
    frontend pays it once). When
    the model folder has a tokenizer.json, plain prompts are encoded at once with the `tokenizers`
    library (what transformers' fast tokenizers run anyway) while transformers loads; once loaded, the
    two are compared on probe strings and on any difference the fast path is dropped (logged). Chat
    messages wait for transformers (`ready`).
    """

    PROBES = ("hello world", " The capital of France is", "a\nb  c\t123 !?", "document 3: w1 w2")

    def __init__(self, model: str) -> None:
        self.model = model
        self.tok: Any = None
        self.fast: Any = None
        self.loaded = threading.Event()
        self._loading = False
        self._lock = threading.Lock()
        tokenizer_json = Path(model) / "tokenizer.json"
        if tokenizer_json.is_file():
            from tokenizers import Tokenizer as FastTokenizer

            self.fast = FastTokenizer.from_file(str(tokenizer_json))

    def load(self) -> None:
        """Start loading transformers' tokenizer on a thread, once (`loaded` is set when it is done)."""
        with self._lock:
            if self._loading:
                return
            self._loading = True
        threading.Thread(target=self._load, name="load-tokenizer", daemon=True).start()

    def _load(self) -> None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model)
            if self.fast is not None and any(self.fast.encode(p).ids != list(tok(p)["input_ids"])
                                             for p in self.PROBES):
                log.warning("tokenizer.json and transformers' tokenizer disagree: using transformers only")
                self.fast = None
            self.tok = tok
        except Exception:
            log.exception("could not load the tokenizer of %s with transformers", self.model)
        finally:
            self.loaded.set()

    def ready(self, req: GenerateRequest) -> bool:
        """Whether `req` can be encoded now without waiting for transformers (whose loading a text
        request starts)."""
        if req.token_ids is not None:
            return True
        self.load()
        return self.loaded.is_set() or (req.messages is None and self.fast is not None)

    def __call__(self, req: GenerateRequest) -> np.ndarray:
        """Token ids as an int32 array: hashing blocks from an array avoids a Python int per token."""
        if req.token_ids is not None:
            return np.asarray(req.token_ids, dtype=np.int32)
        if req.messages is None and self.fast is not None:
            return np.asarray(self.fast.encode(req.prompt or "").ids, dtype=np.int32)
        if self.tok is None:
            raise RuntimeError(f"the tokenizer of {self.model} is not loaded (see the router's log)")
        if req.messages is not None:
            ids: Any = self.tok.apply_chat_template(req.messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return np.asarray(ids, dtype=np.int32)
        return np.asarray(self.tok(req.prompt or "", return_tensors="np")["input_ids"][0], dtype=np.int32)


class RouterService:
    """NATS and etcd around a KvRouter: the `generate` endpoint, event and load feeds, membership."""

    def __init__(self, ctx: WorkerContext, router: KvRouter, tokenizer: Tokenizer, worker_component: str,
                 share_inflight: bool = True) -> None:
        self.ctx = ctx
        self.share_inflight = share_inflight
        self.feed: PeerFeed | None = None
        self.router = router
        self.tokenizer = tokenizer
        self.worker_component = worker_component
        self.ns = ctx.settings.namespace
        self.tasks: list[asyncio.Task[None]] = []
        self.metrics = RouterMetrics.default()

    async def start(self) -> None:
        assert self.ctx.nc is not None and self.ctx.registry is not None
        nc = self.ctx.nc
        await nc.subscribe(ev.events_subject(self.ns), cb=self._on_events)
        await nc.subscribe(ev.load_subject(self.ns), cb=self._on_load)
        await self.listen_for_ends()
        if self.share_inflight:
            await self.share()
        # The workers registered before this router started: their KV events so far were never seen here.
        updates = self.ctx.registry.follow(self.ns, self.worker_component)
        self.router.on_registry(await anext(updates), known_before_start=True)
        await self._flush_resyncs()
        follow = asyncio.create_task(self._follow(updates))
        resync = asyncio.create_task(self._resync_loop())
        self.tasks += [follow, resync]
        self.ctx.on_shutdown.append(self.stop)

    async def listen_for_ends(self) -> None:
        """Subscribe to our own inbox for the workers' end reports (requestplane.ROUTED), before we route."""
        assert self.ctx.nc is not None
        if self.router.ends_to is None:
            inbox = self.ctx.nc.new_inbox()  # under this identity's inbox prefix: only we read it
            await self.ctx.nc.subscribe(inbox, cb=self._on_end)
            await requestplane.flush_subscriptions(self.ctx.nc)
            self.router.ends_to = inbox

    async def _on_end(self, msg: Any) -> None:
        try:
            decision_id, first = requestplane.parse_routed_report(msg.data)
        except ValueError:
            log.warning("undecodable end report: %r", msg.data[:64])
            return
        if first:
            self.router.first_token(decision_id)
        else:
            self.router.ended(decision_id)

    async def share(self) -> None:
        """Hear the other routers' requests and tell them ours (workers.kv_router.peers)."""
        assert self.ctx.nc is not None
        await self.ctx.nc.subscribe(peers.routed_subject(self.ns), cb=self._on_routed)
        await requestplane.flush_subscriptions(self.ctx.nc)  # subscribed at the server before this router serves
        self.feed = self.router.feed = PeerFeed(self.ctx.nc.publish, self.ns, self.router.peers.own_id,
                                                lambda: list(self.router.decisions),
                                                peers_heard=lambda: bool(self.router.peers.heard),
                                                tick=lambda: self.router.peers.expire(time.monotonic()))
        self.feed.start()

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.feed is not None:
            self.feed.stop()

    async def _follow(self, updates: AsyncIterator[Update]) -> None:
        async for update in updates:
            self.router.on_registry(update)
            await self._flush_resyncs()

    async def _flush_resyncs(self) -> None:
        assert self.ctx.nc is not None
        while self.router.resync_requests:
            w = self.router.resync_requests.pop()
            await self.ctx.nc.publish(ev.resync_subject(self.ns, w), b"")

    async def _on_routed(self, msg: Any) -> None:
        try:
            new_peer = self.router.peers.apply(peers.decoder.decode(msg.data), time.monotonic())
        except Exception as exc:
            log.warning("undecodable message of another router: %s", exc)
            return
        if new_peer:  # it heard none of our starts (we published none, or it was not there): tell it now
            self.router.announce_inflight()
            if self.feed is not None:
                self.feed.peer_joined()

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(RESYNC_RETRY)
            for w in self.router.stale_resyncs():
                self.router.request_resync(w)
            await self._flush_resyncs()

    async def _on_events(self, msg: Any) -> None:
        try:
            batch = ev.batch_decoder.decode(msg.data)
        except Exception as exc:
            log.warning("undecodable KV event batch: %s", exc)
            return
        self.router.on_batch(batch)
        if self.router.resync_requests:
            await self._flush_resyncs()

    async def _on_load(self, msg: Any) -> None:
        with contextlib.suppress(Exception):
            self.router.on_load(ev.load_decoder.decode(msg.data))

    async def generate(self, raw: dict[str, Any]) -> AsyncIterator[requestplane.Handoff]:
        """Choose a worker and hand the request off to it (its only item): the worker streams to the caller."""
        assert self.ctx.nc is not None
        await self.listen_for_ends()
        req = GenerateRequest.model_validate(raw)
        t0 = time.perf_counter()
        if req.token_ids is not None:  # the frontend's way: tokenized once, upstream
            token_ids = np.asarray(req.token_ids, dtype=np.int32)
        else:  # text: tokenizing ~2,000 tokens takes ~6 ms, which would stall every other request here
            if not self.tokenizer.ready(req):  # a chat before transformers has loaded (the first text starts it)
                await asyncio.to_thread(self.tokenizer.loaded.wait, 120)
            token_ids = await wait_for(asyncio.to_thread(self.tokenizer, req), TOKENIZE_TIMEOUT)
        max_tokens = req.sampling.get("max_tokens")
        t_route = time.perf_counter()
        limit = max_tokens if isinstance(max_tokens, int) else None
        try:
            try:
                decision = self.router.choose(token_ids, exclude=set(req.avoid or ()), max_tokens=limit)
            except NoWorker:
                if not req.avoid:
                    raise
                # Every worker was avoided: a preference, not a rule. A lone worker whose stream lost messages
                # to a NATS restart is alive; a dead one is no candidate once its registration goes.
                decision = self.router.choose(token_ids, max_tokens=limit)
        except NoWorker as exc:
            raise StreamError(str(exc), code=ErrorCode.NO_RESPONDERS) from None
        now = time.perf_counter()
        self.metrics.observe(decision.strategy, decision.process, decision.blocks,
                             decision.matches.get(decision.worker, 0), now - t_route, now - t0)
        routing = decision.as_dict()
        log.info("route %s: %s -> %s (%x), %d blocks, matched %s, load %s (decision %.0f us, with tokens %.0f us)",
                 req.request_id, decision.strategy, decision.process, decision.worker, decision.blocks,
                 routing["matched_blocks"], routing["load"], (now - t_route) * 1e6, (now - t0) * 1e6)
        view = self.router.workers[decision.worker]
        # Everything the caller sent (SamplingParams, output mode, priority) goes on; text becomes ids. Ids
        # sent as ids go on as they came (a list of ~1,000 ints rebuilt and dumped again costs ~0.2 ms).
        if req.token_ids is not None:
            payload = {k: v for k, v in raw.items() if k != "avoid"}
        else:
            payload = req.model_copy(update={"prompt": None, "messages": None, "token_ids": token_ids.tolist()}
                                     ).model_dump(exclude_none=True)
        payload[requestplane.ROUTED] = {"by": self.router.ends_to, "id": decision.id}
        self.router.started(decision)
        yield requestplane.Handoff(decision.worker, view.reg.instance_subject, payload, routing)


def build_parser() -> argparse.ArgumentParser:
    """Its flags (workers.kinds lists them; launcher.engine_flags reads them to check `args:`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model whose tokenizer the router uses (same as the workers')")
    p.add_argument("--routing-strategy", choices=STRATEGIES, default="prefix")
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size of the workers (default: the one they register with)")
    p.add_argument("--load-weight", type=float, default=CostWeights.load,
                   help="cost of one block pinned on a worker relative to one block to prefill (strategy prefix)")
    p.add_argument("--evict-weight", type=float, default=CostWeights.evict,
                   help="cost of one cached block a request would push out of a full worker (strategy prefix)")
    p.add_argument("--overflow-weight", type=float, default=CostWeights.overflow,
                   help="cost of one block beyond what a worker can hold at once (strategy prefix)")
    p.add_argument("--request-tokens", type=float, default=CostWeights.request_tokens,
                   help="compute one request in flight takes from a newcomer, in prompt tokens (strategy prefix)")
    p.add_argument("--queue-weight", type=float, default=CostWeights.queue,
                   help="cost of one block of prefill queued on a worker ahead of a request (requests there "
                        "without a first token) relative to one block to prefill (strategy prefix)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve the router's Prometheus metrics (vllm_launcher_router_*) on this port")
    p.add_argument("--component", default=KINDS["router"].component, help="component this router serves")
    p.add_argument("--worker-component", default=KINDS["kv_worker"].component,
                   help="component the kv workers register")
    p.add_argument("--seed", type=int, default=None, help="seed of random choices (strategy random, ties)")
    p.add_argument("--share-inflight", action=argparse.BooleanOptionalAction, default=True,
                   help="tell other routers of the same workers (replicas) the requests this one sends, and count "
                        "theirs (workers/kv_router/peers.py); off, they are seen only in the workers' load reports")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()
    weights = CostWeights(load=args.load_weight, evict=args.evict_weight, overflow=args.overflow_weight,
                          request_tokens=args.request_tokens, queue=args.queue_weight)
    router = KvRouter(args.routing_strategy, args.block_size, rng=random.Random(args.seed), weights=weights,
                      model=args.model)
    if args.metrics_port is not None:
        serve_prometheus(args.metrics_port, "router", ctx.unhealthy)
        RouterMetrics.default().watch_index(router.indexed_blocks)
    service = RouterService(ctx, router, Tokenizer(args.model), args.worker_component,
                            share_inflight=args.share_inflight)
    await service.start()
    await ctx.serve(args.component, KINDS["router"].endpoint, service.generate, model=args.model,
                    block_size=args.block_size)
    log.info("router (%s) serving %s.%s", args.routing_strategy, settings.namespace, args.component)
    return await ctx.run_until_stopped()


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_worker(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
