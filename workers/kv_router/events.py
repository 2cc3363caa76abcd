"""What kv workers publish on NATS for the router: KV event batches, load reports, resync requests.

msgpack via msgspec (vLLM already depends on it) with token ids as raw little-endian int32 bytes:
the router decodes a batch without building a Python int per token, which is most of the cost of
applying events (bench/bench_indexer.py measures decode + apply together).

Subjects (namespace-scoped):
  {ns}.kv_events            EventBatch, every worker, in publish order
  {ns}.kv_load              Load, within a second of a change and every 5 s unchanged, per worker
  {ns}.kv_resync.{instance:x}  a router asks that worker for a snapshot (any payload)

Ordering and recovery: each worker numbers its batches (seq 0, 1, 2, ...). A router that sees a
gap, or a worker whose history it did not see from seq 0 (router started late or restarted),
drops that worker's blocks and publishes on kv_resync; the worker answers on kv_events with a
snapshot numbered in the same sequence, so later batches continue it.

Message size: every batch is encoded under 3/4 of the NATS server's max_payload (1 MB by default;
one message holding ~12k blocks would exceed it). A list of events too big for one message goes
out as several consecutive batches (BatchSender). A snapshot is such a run: its first batch says
`snapshot` and starts with Cleared (the router drops the worker's blocks there), the rest are
ordinary batches of Stored events, parents first. A router that misses one of them sees a gap and
resyncs; one that asked for a resync mid-run ignores the rest and waits for the next snapshot.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec
import numpy as np

from workers.runtime.settings import subject_token

EngineHash = int | bytes


class Stored(msgspec.Struct, tag="s", array_like=True):
    hashes: list[EngineHash]
    parent: EngineHash | None
    tokens: bytes  # int32 little-endian, len(hashes) * block_size of them


class Removed(msgspec.Struct, tag="r", array_like=True):
    hashes: list[EngineHash]


class Cleared(msgspec.Struct, tag="c", array_like=True):
    pass


Event = Stored | Removed | Cleared


class EventBatch(msgspec.Struct, array_like=True):
    worker: int
    seq: int
    block_size: int
    events: list[Event]
    snapshot: bool = False


class Load(msgspec.Struct):
    worker: int
    running: int
    waiting: int
    kv_usage: float
    prefix_queries: int = 0  # cumulative prefix-cache query tokens (vLLM's counter)
    prefix_hits: int = 0  # cumulative prefix-cache hit tokens
    process: str = ""
    # Router report inbox -> ids of its requests this worker serves (EndpointServer.routed_in_flight): a
    # router ends those it sent long enough ago that are not here (their end report was lost). None: not told.
    routed: dict[str, list[int]] | None = None


batch_encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(EventBatch)
load_decoder = msgspec.msgpack.Decoder(Load)


def tokens_bytes(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i4").tobytes()


def tokens_array(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4")


def events_subject(namespace: str) -> str:
    return f"{subject_token(namespace)}.kv_events"


def load_subject(namespace: str) -> str:
    return f"{subject_token(namespace)}.kv_load"


def resync_subject(namespace: str, worker: int) -> str:
    return f"{subject_token(namespace)}.kv_resync.{worker:x}"


class BlockMirror:
    """The worker's own record of its live blocks, so it can answer a resync with a snapshot.

    vLLM cannot list its cached blocks on demand; replaying its events into this map costs a few
    bytes per token on the worker and makes a late or restarted router whole again at once.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[EngineHash, tuple[EngineHash | None, bytes]] = {}

    def apply(self, event: Event) -> None:
        if isinstance(event, Stored):
            width = self.block_size * 4
            parent = event.parent
            for i, h in enumerate(event.hashes):
                self.blocks[h] = (parent, event.tokens[i * width:(i + 1) * width])
                parent = h
        elif isinstance(event, Removed):
            for h in event.hashes:
                self.blocks.pop(h, None)
        else:
            self.blocks.clear()

    def snapshot(self) -> Iterator[Stored]:
        """Every block reachable from a root, each after its parent (orphans cannot be matched: skipped).

        Consecutive blocks that form a chain (each the parent of the next, as one BlockStored inserts
        them) come out as one Stored event: far fewer objects and bytes than one event per block.
        """
        blocks = self.blocks
        state: dict[EngineHash, int] = {}  # _LIVE: emitted (reachable), _DEAD: unreachable, _WALK: on this walk
        run: list[EngineHash] = []
        run_parent: EngineHash | None = None
        for start in blocks:
            if start in state:
                continue
            chain = [start]
            state[start] = _WALK
            verdict = _LIVE
            parent = blocks[start][0]
            while parent is not None:
                seen = state.get(parent)
                if seen is not None:
                    verdict = _DEAD if seen != _LIVE else _LIVE  # _WALK here: a cycle, never reachable
                    break
                if parent not in blocks:  # an ancestor was evicted
                    verdict = _DEAD
                    break
                chain.append(parent)
                state[parent] = _WALK
                parent = blocks[parent][0]
            for h in chain:
                state[h] = verdict
            if verdict == _DEAD:
                continue
            for h in reversed(chain):
                p = blocks[h][0]
                if run and p == run[-1]:
                    run.append(h)
                    continue
                if run:
                    yield self._stored(run_parent, run)
                run, run_parent = [h], p
        if run:
            yield self._stored(run_parent, run)

    def _stored(self, parent: EngineHash | None, hashes: list[EngineHash]) -> Stored:
        blocks = self.blocks
        return Stored(hashes=hashes, parent=parent, tokens=b"".join([blocks[h][1] for h in hashes]))


_LIVE, _DEAD, _WALK = 1, 2, 3
BATCH_OVERHEAD = 64  # an EventBatch's own fields around its events, encoded (at most ~35 bytes)


def payload_budget(max_payload: int) -> int:
    """Bytes one encoded batch may take: 3/4 of the server's max_payload (headroom for NATS's own framing)."""
    return max_payload * 3 // 4


def _split_stored(e: Stored, budget: int) -> Iterator[Stored]:
    """A Stored too big for one message as consecutive Stored events, each the parent of the next."""
    n = len(e.hashes)
    width = len(e.tokens) // n if n else 0
    size = len(batch_encoder.encode(e))
    step = max(1, n * budget // (2 * size))  # half the budget each: room for varying hash sizes
    parent = e.parent
    for i in range(0, n, step):
        hashes = e.hashes[i:i + step]
        yield Stored(hashes=hashes, parent=parent, tokens=e.tokens[i * width:(i + len(hashes)) * width])
        parent = hashes[-1]


def chunk_events(events: Iterable[Event], max_bytes: int) -> Iterator[list[Event]]:
    """Runs of consecutive events whose EventBatch encodes to at most `max_bytes`, in order.

    Sized by each event's own encoding (a msgpack array is its items' bytes plus a short header). A
    Stored event too big alone is split into consecutive Stored events (parents first), so the
    order of blocks, and every block's parent, is what the unsplit list said.
    """
    budget = max_bytes - BATCH_OVERHEAD
    if budget <= 0:
        raise ValueError(f"a batch of {max_bytes} bytes cannot hold any event")
    encode = batch_encoder.encode
    chunk: list[Event] = []
    used = 0
    for e in events:
        size = len(encode(e))
        pieces: Iterable[Event] = [e]
        if size > budget and isinstance(e, Stored) and len(e.hashes) > 1:
            pieces = _split_stored(e, budget)
        for piece in pieces:
            if piece is not e:
                size = len(encode(piece))
            if size > budget:
                raise ValueError(f"one KV event of {size} bytes exceeds the message budget of {budget}")
            if chunk and used + size > budget:
                yield chunk
                chunk, used = [], 0
            chunk.append(piece)
            used += size
    if chunk:
        yield chunk


class BatchSender:
    """A worker's numbered batches on {ns}.kv_events, each under the connection's max payload.

    One list of events may go out as several consecutive batches (seq continues): a router sees a
    missing one as any other gap. A snapshot is such a run whose first batch alone says `snapshot`
    (the router drops that worker's blocks there) and starts with Cleared; the rest are ordinary
    Stored batches, parents first, so a router that joins or resyncs mid-run waits for the next
    snapshot, and one that loses a batch resyncs.
    """

    def __init__(self, nc: Any, namespace: str, worker_id: int = 0, block_size: int = 0) -> None:
        self.nc = nc
        self.subject = events_subject(namespace)
        self.worker_id = worker_id
        self.block_size = block_size
        self.seq = 0

    def batches(self, events: Iterable[Event], snapshot: bool = False) -> Iterator[bytes]:
        """Encoded batches for `events`, numbered from self.seq on (advanced as they are produced)."""
        max_bytes = payload_budget(int(self.nc.max_payload))
        if snapshot:
            events = itertools.chain([Cleared()], events)
        first = True
        for chunk in chunk_events(events, max_bytes):
            batch = EventBatch(worker=self.worker_id, seq=self.seq, block_size=self.block_size, events=chunk,
                               snapshot=snapshot and first)
            self.seq += 1
            first = False
            yield batch_encoder.encode(batch)

    async def send(self, events: Iterable[Event], snapshot: bool = False) -> int:
        """Publish `events` (a snapshot if asked); returns how many batches it took."""
        n = 0
        for raw in self.batches(events, snapshot):
            await self.nc.publish(self.subject, raw)
            n += 1
        return n
