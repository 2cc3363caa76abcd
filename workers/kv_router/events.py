"""What kv workers publish on NATS for the router: KV event batches, load reports, resync requests.

msgpack via msgspec (vLLM already depends on it) with token ids as raw little-endian int32 bytes:
the router decodes a batch without building a Python int per token, which is most of the cost of
applying events (bench/bench_indexer.py measures decode + apply together).

Subjects (namespace-scoped):
  {ns}.kv_events            EventBatch, every worker, in publish order
  {ns}.kv_load              Load, about once a second per worker
  {ns}.kv_resync.{instance:x}  a router asks that worker for a snapshot (any payload)

Ordering and recovery: each worker numbers its batches (seq 0, 1, 2, ...). A router that sees a
gap, or a worker whose history it did not see from seq 0 (router started late or restarted),
drops that worker's blocks and publishes on kv_resync; the worker answers on kv_events with a
`snapshot` batch (AllBlocksCleared-equivalent plus every live block, parents first) numbered in
the same sequence, so later batches continue it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
        """Every block reachable from a root, each after its parent (orphans cannot be matched: skipped)."""
        done: set[EngineHash] = set()
        dead: set[EngineHash] = set()
        for start in self.blocks:
            chain: list[EngineHash] = []
            h: EngineHash | None = start
            reachable = True
            while h is not None and h not in done:
                if h in dead or h not in self.blocks:  # an ancestor was evicted: unreachable
                    reachable = False
                    break
                chain.append(h)
                h = self.blocks[h][0]
            if not reachable:
                dead.update(chain)
                continue
            for b in reversed(chain):
                done.add(b)
                parent, tokens = self.blocks[b]
                yield Stored(hashes=[b], parent=parent, tokens=tokens)
