"""The router's index of which worker holds which KV blocks, and the hash that names a block.

Why the router hashes blocks itself: vLLM's block hashes depend on its hash function, seed and
extra keys, so they cannot be recomputed from a request. The router therefore names every full
block by its own *chained* hash (the block's tokens plus its parent's chained hash), computed the
same way for event blocks and for request blocks, and keeps per worker a map from the engine's
hash to the router's, which is what BlockRemoved and parent_block_hash refer to.

Two equivalent forms of the same prefix tree live here (DESIGN.md asks to measure both):

- `TreeIndex`: nodes with children keyed by chained hash, each node holding a bitmask of workers.
- `FlatIndex`: one dict chained hash -> worker bitmask. A chained hash already names its whole
  prefix, so the tree's edges carry no extra information; the flat map drops the node objects.

Workers are bits in a Python int (slots reused after a worker leaves), so a match is one dict
lookup and one AND per request block, whatever the number of workers. bench/bench_indexer.py
measures both forms; the router uses `FlatIndex` (smaller and faster, same answers).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

ROOT_HASH = 0x5EED_B10C  # the chained hash's seed: the "parent" of a sequence's first block

EngineHash = Hashable
WorkerId = int


class BlockHasher:
    """Chained hashes of the full blocks of a token sequence (a partial last block is ignored)."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.block_size = block_size
        self._width = 4 * block_size

    def content(self, tokens: bytes | Sequence[int] | np.ndarray) -> list[int]:
        """One 64-bit content hash per full block: Python's hash of the block's int32 little-endian bytes.

        Events carry exactly these bytes, so a block costs one slice and one hash; requests are
        converted once. bytes hashes are salted per process (PYTHONHASHSEED), which is fine: the
        router computes both the event side and the request side itself and never shares them.
        """
        raw = tokens if isinstance(tokens, bytes) else np.asarray(tokens, dtype="<i4").tobytes()
        w = self._width
        return [hash(raw[i:i + w]) for i in range(0, len(raw) - w + 1, w)]

    def chain(self, tokens: bytes | Sequence[int] | np.ndarray, parent: int = ROOT_HASH) -> list[int]:
        """Chained hashes: hash i names blocks 0..i (and whatever preceded `parent`)."""
        return chain_contents(self.content(tokens), parent)


def chain_contents(contents: Iterable[int], parent: int = ROOT_HASH) -> list[int]:
    """Chain per-block content hashes (hashing many events' tokens in one numpy call is much cheaper)."""
    out = []
    h = parent
    for c in contents:
        h = hash((h, c))
        out.append(h)
    return out


class Index(Protocol):
    """What the router needs from an index; both forms implement it."""

    block_size: int
    hasher: BlockHasher

    def apply_stored(self, worker: WorkerId, parent: EngineHash | None, engine_hashes: Sequence[EngineHash],
                     tokens: bytes | Sequence[int] | np.ndarray) -> bool: ...
    def apply_stored_content(self, worker: WorkerId, parent: EngineHash | None,
                             engine_hashes: Sequence[EngineHash], contents: Sequence[int]) -> bool: ...
    def apply_removed(self, worker: WorkerId, engine_hashes: Iterable[EngineHash]) -> None: ...
    def clear(self, worker: WorkerId) -> None: ...
    def remove_worker(self, worker: WorkerId) -> None: ...
    def match(self, chained: Sequence[int]) -> dict[WorkerId, int]: ...
    def workers(self) -> list[WorkerId]: ...
    def block_count(self, worker: WorkerId) -> int: ...
    def fewest_blocks(self, workers: list[WorkerId]) -> list[WorkerId]: ...


class _WorkerSlots:
    """Worker id <-> bit position, with slots reused so masks stay as short as the live set."""

    def __init__(self) -> None:
        self.bit: dict[WorkerId, int] = {}
        self.worker_of_bit: dict[int, WorkerId] = {}
        self._free: list[int] = []

    def get(self, worker: WorkerId) -> int:
        bit = self.bit.get(worker)
        if bit is None:
            pos = self._free.pop() if self._free else len(self.bit)
            bit = 1 << pos
            self.bit[worker] = bit
            self.worker_of_bit[bit] = worker
        return bit

    def release(self, worker: WorkerId) -> None:
        bit = self.bit.pop(worker, None)
        if bit is not None:
            del self.worker_of_bit[bit]
            self._free.append(bit.bit_length() - 1)

    def split(self, mask: int) -> list[WorkerId]:
        if mask.bit_count() > 8:  # dense: one AND per live worker beats popping bits one by one
            return [w for bit, w in self.worker_of_bit.items() if mask & bit]
        out = []
        while mask:
            low = mask & -mask
            out.append(self.worker_of_bit[low])
            mask ^= low
        return out


def _prefix_counts(slots: _WorkerSlots, levels: Iterable[int], all_mask: int) -> dict[WorkerId, int]:
    """From the masks of successive request blocks: for each worker, how many leading blocks it holds."""
    counts: dict[WorkerId, int] = {}
    active = all_mask
    depth = 0
    for mask in levels:
        mask &= active
        if mask != active:
            for w in slots.split(active & ~mask):
                if depth:
                    counts[w] = depth
            active = mask
            if not active:
                return counts
        depth += 1
    for w in slots.split(active):
        if depth:
            counts[w] = depth
    return counts


_Entry = TypeVar("_Entry")  # what a worker's engine hash maps to: a chained hash (flat) or a tree node


class _IndexBase(Generic[_Entry]):
    """What both index forms share: worker slots, the per-worker engine-hash map, and the queries on it."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.hasher = BlockHasher(block_size)
        self._slots = _WorkerSlots()
        self._by_worker: dict[WorkerId, dict[EngineHash, _Entry]] = {}

    def apply_stored(self, worker: WorkerId, parent: EngineHash | None, engine_hashes: Sequence[EngineHash],
                     tokens: bytes | Sequence[int] | np.ndarray) -> bool:
        """Add blocks; False when the parent is unknown (events were missed: the caller resyncs)."""
        return self.apply_stored_content(worker, parent, engine_hashes, self.hasher.content(tokens))

    def apply_stored_content(self, worker: WorkerId, parent: EngineHash | None,
                             engine_hashes: Sequence[EngineHash], contents: Sequence[int]) -> bool:
        raise NotImplementedError

    def apply_removed(self, worker: WorkerId, engine_hashes: Iterable[EngineHash]) -> None:
        raise NotImplementedError

    def clear(self, worker: WorkerId) -> None:
        mine = self._by_worker.get(worker)
        if mine:
            self.apply_removed(worker, list(mine))

    def remove_worker(self, worker: WorkerId) -> None:
        self.clear(worker)
        self._by_worker.pop(worker, None)
        self._slots.release(worker)

    def workers(self) -> list[WorkerId]:
        return list(self._slots.bit)

    def block_count(self, worker: WorkerId) -> int:
        return len(self._by_worker.get(worker, ()))

    def fewest_blocks(self, workers: list[WorkerId]) -> list[WorkerId]:
        """The workers (of `workers`) that hold the fewest blocks."""
        by = self._by_worker
        sizes = [len(by[w]) if w in by else 0 for w in workers]
        low = min(sizes)
        return [w for w, size in zip(workers, sizes, strict=True) if size == low]


class FlatIndex(_IndexBase[int]):
    """chained hash -> bitmask of workers holding that block (and, by construction, its prefix)."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self._blocks: dict[int, int] = {}

    def apply_stored_content(self, worker: WorkerId, parent: EngineHash | None,
                             engine_hashes: Sequence[EngineHash], contents: Sequence[int]) -> bool:
        """apply_stored with the blocks' content hashes (BlockHasher.content) already computed."""
        bit = self._slots.get(worker)
        mine = self._by_worker.setdefault(worker, {})
        if parent is None:
            start = ROOT_HASH
        else:
            known = mine.get(parent)
            if known is None:
                return False
            start = known
        if len(contents) != len(engine_hashes):
            return False
        blocks = self._blocks
        get = blocks.get
        h = start
        for eh, c in zip(engine_hashes, contents, strict=True):  # chain_contents, fused into the update loop
            h = hash((h, c))
            mine[eh] = h
            held = get(h)
            if held is None:
                blocks[h] = bit  # the worker's own bit object: no new int per block (memory)
            elif not held & bit:
                blocks[h] = held | bit
        return True

    def apply_removed(self, worker: WorkerId, engine_hashes: Iterable[EngineHash]) -> None:
        mine = self._by_worker.get(worker)
        if not mine:
            return
        keep = ~self._slots.bit[worker]
        blocks = self._blocks
        for eh in engine_hashes:
            rh = mine.pop(eh, None)
            if rh is None:
                continue
            mask = blocks.get(rh, 0) & keep
            if mask:
                blocks[rh] = mask
            else:
                blocks.pop(rh, None)

    def match(self, chained: Sequence[int]) -> dict[WorkerId, int]:
        # _prefix_counts inlined: this loop is the hot path of every routing decision.
        get = self._blocks.get
        split = self._slots.split
        counts: dict[WorkerId, int] = {}
        active = -1  # every worker
        depth = 0
        for h in chained:
            mask = get(h, 0)
            if active != -1:
                mask &= active
            if mask != active:
                if depth:
                    for w in split(active & ~mask):
                        counts[w] = depth
                active = mask
                if not active:
                    return counts
            depth += 1
        if depth and active and active != -1:
            for w in split(active):
                counts[w] = depth
        return counts


    def unique_blocks(self) -> int:
        return len(self._blocks)


class _Node:
    __slots__ = ("children", "key", "mask", "parent")

    def __init__(self, key: int, parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.mask = 0


class TreeIndex(_IndexBase["_Node"]):
    """The same index as an explicit prefix tree (nodes pruned when no worker holds them)."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self.root = _Node(ROOT_HASH, None)

    def apply_stored_content(self, worker: WorkerId, parent: EngineHash | None,
                             engine_hashes: Sequence[EngineHash], contents: Sequence[int]) -> bool:
        bit = self._slots.get(worker)
        mine = self._by_worker.setdefault(worker, {})
        node = self.root if parent is None else mine.get(parent)
        if node is None:
            return False
        chained = chain_contents(contents, node.key)
        if len(chained) != len(engine_hashes):
            return False
        for eh, rh in zip(engine_hashes, chained, strict=True):
            child = node.children.get(rh)
            if child is None:
                child = node.children[rh] = _Node(rh, node)
            child.mask |= bit
            mine[eh] = child
            node = child
        return True

    def _drop(self, node: _Node, keep: int) -> None:
        node.mask &= keep
        while node.parent is not None and not node.mask and not node.children:
            del node.parent.children[node.key]
            node = node.parent

    def apply_removed(self, worker: WorkerId, engine_hashes: Iterable[EngineHash]) -> None:
        mine = self._by_worker.get(worker)
        if not mine:
            return
        keep = ~self._slots.bit[worker]
        for eh in engine_hashes:
            node = mine.pop(eh, None)
            if node is not None:
                self._drop(node, keep)

    def match(self, chained: Sequence[int]) -> dict[WorkerId, int]:
        def levels() -> Iterable[int]:
            node = self.root
            for h in chained:
                nxt = node.children.get(h)
                if nxt is None:
                    return
                yield nxt.mask
                node = nxt

        return _prefix_counts(self._slots, levels(), sum(self._slots.bit.values()))

