"""What a request costs on each worker, in KV blocks: the KV router's (strategy `prefix`) decision rule.

For a request of `n` full prompt blocks whose footprint at the end is `T` blocks (prompt, partial
last block, expected decode), and a worker w:

    overlap  = leading prompt blocks w holds (KV events) or is computing (our requests in flight)
    prefill  = n - overlap                          blocks w must compute before the first token
    new      = T - overlap                          blocks the request allocates on w
    active   = distinct blocks pinned by our requests running on w (a prefix shared by k requests
               counts once), plus what w's load report shows pinned beyond them (another router's)
    requests = requests in flight on w (ours, plus those its load report shows beyond ours)
    resident = blocks held on w: cached (its KV events, pinned or not) and our requests' own blocks
    capacity = w's KV blocks (num_gpu_blocks, registered at start)

    cost = prefill
         + evict_weight    x new x min(1, (resident + new) / capacity)^2   cached blocks pushed out
         + load_weight     x (active + new)                                 w's batch with the request
         + request_tokens / block_size x requests                          their share of w's compute
         + overflow_weight x min(new, max(0, active + new - capacity))     its blocks w cannot hold at once
         + queue_weight    x max(0, queued - shared)                        prefills w must finish first

    queued   = prefill blocks of our requests on w that have not streamed their first token yet (each
               counted at its decision; the worker reports the first token to the router, as it reports
               the end)
    shared   = the request's own leading blocks that those requests are computing on w (among them, not
               held there already): work it needs done wherever it goes

Lowest cost wins; ties go to the worker with fewer active blocks, then more free room, then at random.

Why each term:
- prefill is the work the cache saves; it is what routing is for.
- the load term counts *distinct* blocks. Counting each in-flight request's whole prompt (as this
  router did before) charges a worker k times for one cached prefix that k requests share, so the
  busier a prefix's home got, the more its requests were pushed to a worker that had to compute and
  cache it again, evicting someone else's prefix (issue 15: hit rate 0.724 against 0.929).
- overlap includes requests in flight: their blocks are not in the KV events until their prefill
  ends, and without this a burst of requests on one new prefix spreads over every worker.
- evict: where new context goes decides what it pushes out: a new block pushes out a block some
  request will want again with a chance that grows with how full the cache would be (squared: near
  nothing while there is room, one block per block as the cache fills). A hard
  "blocks beyond capacity" count was tried first and is myopic: with 4 prefixes of 15 blocks and 48
  blocks per worker, a third prefix "fits" (30 + 17 <= 48) on the worker that is less busy at that
  instant, and from then on every request there evicts a prefix block (replayed in
  tests/test_router_cost.py). Blocks cached but never reused count as resident too (the router
  cannot tell them apart), so in steady state every full worker pays the same and the term stops
  deciding; it matters when fill differs, which is when new context is being placed.
- requests: blocks measure memory, not compute. k requests decoding over one shared prefix pin few
  distinct blocks but still take k shares of every engine step, so a worker holding a short hot
  prefix looked idle while busy (measured: a 44/20 split of 64 requests over two workers when the
  prefixes were ~200 tokens). Each request in flight costs `request_tokens` (16) of prefill: a
  long cached prefix (1,000 tokens = 15 blocks of 64) outweighs many of them and stays home,
  a short one moves to an idle replica.
- the weights (load 0.1, request_tokens 16) were measured, not derived: a newcomer behind k requests on
  an engine waits for steps that batch it with their decodes, which costs it far less than prefilling
  a block costs, so on CPU the earlier 0.5 and 128 sent a request away from its cached prefix for a
  queue of 2-3 requests and lost hits (bench/results/kv-peer-weights-cpu.md, 8 in flight: pressure
  hit 0.911 against 0.744, TTFT p50 232 ms against 608, equal to vllm-router; roomy hit 0.816, TTFT
  within round robin's). On a GPU the balance of prefill and decode cost differs: measure again there.
  Those runs (16 output tokens) priced every request's decode at 256 tokens: vLLM's SamplingParams omits
  max_tokens at its default, 16, and the frontend sent it only when it differed (fixed in 8c5a018).
  Re-run with the right footprint (kv-peer-cpu.md, kv-peer-zipf-chat-cpu.md): pressure hit 0.911, 1.04 of
  vllm-router's; zipf at 8 in flight 0.666, 1.06 of vllm-router's and 1.24 of Dynamo's (it was 0.81 of
  vllm-router's with the wrong footprint, whose overflow term sent requests away from their cached prefix).
- overflow: a worker cannot run more distinct context than it holds; the excess waits in its queue or
  preempts a running request. Only the request's own new blocks count (its marginal overflow): a worker
  already over its capacity by others' requests charged each newcomer the whole excess, so a request whose
  prefix is running there (1-2 new blocks) was sent to recompute and cache it elsewhere (zipf at 8 in flight:
  matched 9 blocks at home, sent away, the other worker evicting for it); the queue it joins is the load
  and request terms' to count. Pressure on a hot prefix's home spreads its requests to replicas
  through this, the load and the request terms.
- queued: a newcomer's first token waits for the prefills the engine is running or will schedule with it
  (vLLM batches the waiting prefills of one step together, so each of them waits for all of them). Blocks of
  prefill queued and blocks of its own prefill are the same unit of work, so at weight 1 the first and last
  terms together estimate its time to first token: a request leaves its cached prefix when the prefills
  queued at home cost more than recomputing it on a worker with a shorter queue (issue 24's "replicate a
  hot prefix only when the wait at its home costs more"). The queued blocks it shares are not counted:
  a burst of requests on one new prefix waits for that prefix's prefill at its home as it would wait for
  its own prefill anywhere else, and counted, every second request of a burst would tie with an idle
  worker and compute the prefix again there. A request is queued from its decision until its worker
  reports its first token (requestplane's routed report), or until it ends. Only this router's own
  requests count: a replica's are in the requests term. Measured (bench/results/kv-peer-queue-cpu.md, 2 CPU
  engines, 8 in flight, against the same router at weight 0, side by side): zipf TTFT p90 0.68, wall 0.92,
  p50 0.96, hit rate 0.97; pressure hit equal, p90 0.94; chat hit equal, p90 1.02, p50 1.14 (its p50 is
  later turns waiting for first turns' prefills either way). The code as landed, zipf again
  (kv-peer-queue-landed-cpu.md): p90 0.79, p50 0.89, hit 1.01, wall 1.03.

Compared with Dynamo's KV router (cost = overlap_weight x prefill blocks + active decode blocks,
shared blocks counted once, argmin or softmax sampling): the same first and third terms, plus the
two capacity terms and the per-request one. vllm-router's cache_aware keeps an approximate radix
tree of the text it routed per worker (not KV events), sends a request to the worker with the
longest match when the match is over a threshold, otherwise to the worker with the smallest tree,
and balances by queue length only past an absolute imbalance (64 by default); it never sees
evictions, which events do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from workers.kv_router.indexer import WorkerSlots, leading_matches

# A request's decode footprint is min(max_tokens, this): most stop early. Also what a request that states no
# max_tokens is priced at (the frontend always states it: workers/frontend/remote_engine.py payload_of).
DECODE_TOKENS_ESTIMATE = 256


@dataclass(frozen=True)
class CostWeights:
    load: float = 0.1
    evict: float = 1.0
    overflow: float = 4.0
    request_tokens: float = 16.0  # the compute a request in flight takes from a newcomer, in prompt tokens
    queue: float = 1.0  # one block of prefill queued ahead on a worker, against one block to prefill


@dataclass(frozen=True)
class Footprint:
    """A request's size in blocks: `prompt` full prompt blocks, `total` at its end (partial and decode blocks)."""

    prompt: int
    total: int
    block_size: int = 1

    @classmethod
    def of(cls, prompt_tokens: int, max_tokens: int | None, block_size: int) -> Footprint:
        decode = min(max_tokens if max_tokens is not None else DECODE_TOKENS_ESTIMATE, DECODE_TOKENS_ESTIMATE)
        return cls(prompt=prompt_tokens // block_size,
                   total=max(1, math.ceil((prompt_tokens + max(decode, 1)) / block_size)), block_size=block_size)


@dataclass(frozen=True)
class WorkerState:
    """What the cost needs to know of one worker at decision time."""

    overlap: int
    active: float
    resident: float
    capacity: float  # math.inf when the worker did not register its block count
    requests: float = 0.0  # requests in flight there
    queued: float = 0.0  # prefill blocks of requests there that have no first token yet
    shared: float = 0.0  # those of them that are the request's own leading blocks


def cost(fp: Footprint, w: WorkerState, weights: CostWeights) -> float:
    """The formula of the module docstring, for one worker."""
    overlap = min(w.overlap, fp.prompt)
    new = fp.total - overlap
    evicted = new * min(1.0, (w.resident + new) / w.capacity) ** 2  # 0 when the capacity is unknown (inf)
    overflow = min(new, max(0.0, w.active + new - w.capacity))
    return (fp.prompt - overlap) + weights.evict * evicted + weights.load * (w.active + new) \
        + weights.request_tokens / fp.block_size * w.requests + weights.overflow * overflow \
        + weights.queue * max(0.0, w.queued - w.shared)


def tie_key(w: WorkerState) -> tuple[float, float]:
    """Among equal costs: fewer active blocks, then more free room."""
    return (w.active, w.resident - w.capacity if math.isfinite(w.capacity) else -math.inf)


class WorkerTable:
    """Every worker's terms as numpy columns, so one decision costs the same dozen array operations at
    2 workers or 64 (a Python loop over 64 workers took ~300 us a decision here).

    The inputs (capacity at registration, `own` active blocks when a request starts or ends,
    `reported` from load reports, `cached` after each event batch) are kept current by the router as
    they change, with the derived columns (active, resident, room, slack) recomputed for that worker
    only; a decision does not recompute them."""

    COLUMNS = ("capacity", "own", "private", "reported", "cached", "active", "resident", "room", "slack",
               "requests", "queued")
    capacity: np.ndarray
    own: np.ndarray
    private: np.ndarray
    reported: np.ndarray
    cached: np.ndarray
    active: np.ndarray
    resident: np.ndarray
    room: np.ndarray
    slack: np.ndarray
    requests: np.ndarray
    queued: np.ndarray

    def __init__(self) -> None:
        self.slot: dict[int, int] = {}
        self.worker_of: list[int | None] = []
        self._free: list[int] = []
        self.live = np.zeros(0, dtype=bool)
        for name in self.COLUMNS:
            setattr(self, name, np.zeros(0))
        self._grow()

    def add(self, worker: int, capacity: float) -> None:
        i = self.slot.get(worker)
        if i is None:
            if not self._free:
                self._grow()
            i = self._free.pop()
            self.slot[worker] = i
            self.worker_of[i] = worker
            for name in self.COLUMNS:
                getattr(self, name)[i] = 0.0
            self.live[i] = True
        self.capacity[i] = capacity
        self._derive(i)

    def remove(self, worker: int) -> None:
        i = self.slot.pop(worker, None)
        if i is not None:
            self.live[i] = False
            self.worker_of[i] = None
            self._free.append(i)

    def _grow(self) -> None:
        old = len(self.worker_of)
        size = max(8, 2 * old)
        for name in (*self.COLUMNS, "live"):
            column = getattr(self, name)
            grown = np.full(size, np.inf) if name == "capacity" else np.zeros(size, dtype=column.dtype)
            grown[:old] = column
            setattr(self, name, grown)
        self.worker_of.extend([None] * (size - old))
        self._free.extend(range(size - 1, old - 1, -1))

    def set(self, column: str, worker: int, value: float) -> None:
        """Update an input column (own, private, reported, cached, requests, queued) of one worker."""
        i = self.slot.get(worker)
        if i is not None:
            getattr(self, column)[i] = value
            self._derive(i)

    def _derive(self, i: int) -> None:
        active = self.own[i] + self.reported[i]
        self.active[i] = active
        self.resident[i] = max(self.cached[i] + self.private[i], active)
        capacity = self.capacity[i]
        finite = math.isfinite(capacity)
        self.room[i] = self.resident[i] - capacity if finite else -math.inf  # < 0: free blocks
        self.slack[i] = active - capacity if finite else -math.inf

    def state(self, worker: int, overlap: int) -> WorkerState:
        """One worker's terms, as the scalar `cost` takes them (logging, tests)."""
        i = self.slot[worker]
        capacity = float(self.capacity[i]) if math.isfinite(self.capacity[i]) else math.inf
        return WorkerState(overlap=overlap, active=float(self.active[i]), resident=float(self.resident[i]),
                           capacity=capacity, requests=float(self.requests[i]), queued=float(self.queued[i]))

    def cheapest(self, fp: Footprint, overlaps: Iterable[tuple[int, int]], weights: CostWeights,
                 exclude: Iterable[int], rng: random.Random, shared: Iterable[tuple[int, int]] = ()) -> int:
        """The live worker (not excluded) of lowest `cost`, ties broken as `tie_key` says, then at random.
        `shared`: per worker, the request's leading blocks being computed there and not yet cached."""
        overlap = np.zeros(len(self.worker_of))
        for w, m in overlaps:
            i = self.slot.get(w)
            if i is not None:
                overlap[i] = min(m, fp.prompt)
        new = fp.total - overlap
        # cost(), in columns: prefill + evicted + load + overflow + requests + queued
        total = (fp.prompt + weights.load * fp.total) - (1.0 + weights.load) * overlap + weights.load * self.active
        total += weights.evict * new * np.minimum(1.0, (self.resident + new) / self.capacity) ** 2
        total += weights.overflow * np.minimum(new, np.maximum(0.0, self.slack + new))
        total += (weights.request_tokens / fp.block_size) * self.requests
        if weights.queue:
            ahead = self.queued.copy()
            for w, m in shared:
                i = self.slot.get(w)
                if i is not None:
                    ahead[i] -= min(m, fp.prompt)
            total += weights.queue * np.maximum(0.0, ahead)
        total[~self.live] = np.inf
        for w in exclude:
            i = self.slot.get(w)
            if i is not None:
                total[i] = np.inf
        best = np.flatnonzero(total == total.min())
        if len(best) > 1:
            for key in (self.active, self.room):  # tie_key
                sub = key[best]
                best = best[sub == sub.min()]
        chosen = self.worker_of[int(best[0]) if len(best) == 1 else int(rng.choice(list(best)))]
        if chosen is None:
            raise ValueError("no live worker to choose from")
        return chosen


class InflightBlocks:
    """Per worker, the chained hashes of the prompt blocks of requests in flight, with reference counts.

    `distinct(w)` is how many blocks those requests pin on w with shared prefixes counted once (plus
    each request's private tail and decode blocks, tracked as a plain sum), and `match(hashes)` how
    many leading blocks of a request each worker will hold once its in-flight prefills finish. Like
    the index, a block maps to a bitmask of workers, so a match costs one lookup per request block
    whatever the number of workers.
    """

    def __init__(self) -> None:
        self._slots = WorkerSlots()
        self._refs: dict[int, dict[int, int]] = {}
        self._private: dict[int, int] = {}
        self._masks: dict[int, int] = {}

    def add(self, worker: int, hashes: Sequence[int], private_blocks: int) -> None:
        bit = self._slots.get(worker)
        refs = self._refs.setdefault(worker, {})
        masks = self._masks
        for h in hashes:
            count = refs.get(h, 0)
            refs[h] = count + 1
            if not count:
                masks[h] = masks.get(h, 0) | bit
        self._private[worker] = self._private.get(worker, 0) + private_blocks

    def remove(self, worker: int, hashes: Sequence[int], private_blocks: int) -> None:
        refs = self._refs.get(worker)
        if refs is None:
            return
        keep = ~self._slots.bit[worker]
        masks = self._masks
        for h in hashes:
            left = refs.get(h, 0) - 1
            if left > 0:
                refs[h] = left
                continue
            if refs.pop(h, None) is not None:
                mask = masks.get(h, 0) & keep
                if mask:
                    masks[h] = mask
                else:
                    masks.pop(h, None)
        self._private[worker] = max(0, self._private.get(worker, 0) - private_blocks)
        if not refs and not self._private[worker]:
            self.drop_worker(worker)

    def drop_worker(self, worker: int) -> None:
        refs = self._refs.pop(worker, None)
        self._private.pop(worker, None)
        if refs and worker in self._slots.bit:
            self.remove_bits(worker, refs)
        self._slots.release(worker)

    def remove_bits(self, worker: int, hashes: Iterable[int]) -> None:
        keep = ~self._slots.bit[worker]
        masks = self._masks
        for h in hashes:
            mask = masks.get(h, 0) & keep
            if mask:
                masks[h] = mask
            else:
                masks.pop(h, None)

    def distinct(self, worker: int) -> int:
        refs = self._refs.get(worker)
        return (len(refs) if refs is not None else 0) + self._private.get(worker, 0)

    def private(self, worker: int) -> int:
        return self._private.get(worker, 0)

    def workers(self) -> list[int]:
        return list(self._refs)

    def match(self, chained: Sequence[int]) -> dict[int, int]:
        """Worker -> leading blocks of `chained` that its in-flight requests cover (only workers with some)."""
        return leading_matches(self._masks, self._slots, chained)

