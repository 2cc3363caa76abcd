"""The router's index of which worker holds which KV blocks, and the hash that names a block.

Why the router hashes blocks itself: vLLM's block hashes depend on its hash function, seed and
extra keys, so they cannot be recomputed from a request. The router therefore names every full
block by its own *chained* hash (the block's tokens plus its parent's chained hash), computed the
same way for event blocks and for request blocks, and keeps per worker a map from the engine's
hash to the router's, which is what BlockRemoved and parent_block_hash refer to.

Two equivalent forms of the same prefix tree live here, so their speed and memory can be compared
(bench/bench_indexer.py measures both):

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


_M64 = (1 << 64) - 1
_M60 = (1 << 60) - 1  # chained hashes are kept to 60 bits: a Python int of 32 bytes, not 36-40
_P = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_S29, _S32 = np.uint64(29), np.uint64(32)
_SHORT = 24  # below this many blocks a Python loop chains faster than numpy (bench/bench_indexer.py)


class BlockHasher:
    """Chained hashes of the full blocks of a token sequence (a partial last block is ignored), in numpy.

    A block's content hash is the dot product of its tokens with per-position odd multipliers (fixed
    seed: every router and test computes the same values) modulo 2**64, then mixed (splitmix64's
    finaliser): one matrix-vector product for all blocks. Not a cryptographic hash: two different
    blocks collide with negligible probability unless someone crafts them, like the chain below. The chain is
    polynomial, h_i = h_(i-1) * P + c_i mod 2**64 (kept to 60 bits), so a whole request's chain is one
    cumulative sum: h_i = P**i * (P * parent + sum_(j<=i) c_j * P**-j). A request of 128 blocks is
    ~15 numpy calls instead of 128 Python hashes of byte slices and 128 of tuples.
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.block_size = block_size
        rng = np.random.default_rng(0x5EED_B10C)
        self._keys = (rng.integers(0, 2**63, size=block_size, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._pow = np.ones(1, dtype=np.uint64)
        self._inv = np.ones(1, dtype=np.uint64)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P**0..P**(n-1) and P**-0..P**-(n-1) modulo 2**64 (tables grown by doubling, kept)."""
        if len(self._pow) < n:
            m = max(n, 2 * len(self._pow), 1024)
            for name, base in (("_pow", _P), ("_inv", _P_INV)):
                table = np.full(m, base, dtype=np.uint64)
                table[0] = 1
                setattr(self, name, np.cumprod(table, dtype=np.uint64))  # wraps modulo 2**64, exactly
        return self._pow[:n], self._inv[:n]

    def content(self, tokens: bytes | Sequence[int] | np.ndarray) -> np.ndarray:
        """One 64-bit content hash per full block (uint64 array) of int32 token ids (or their LE bytes)."""
        arr = np.frombuffer(tokens, dtype="<i4") if isinstance(tokens, bytes) else np.asarray(tokens)
        bs = self.block_size
        n = len(arr) // bs
        c: np.ndarray = arr[: n * bs].reshape(n, bs).astype(np.uint64) @ self._keys  # one pass, wraps mod 2**64
        c ^= c >> _S32
        c *= _MIX
        c ^= c >> _S29
        return c

    def chain_from(self, contents: np.ndarray, parent: int = ROOT_HASH) -> list[int]:
        """Chain content hashes (BlockHasher.content) after `parent`'s chained hash."""
        n = len(contents)
        if n < _SHORT:  # a few blocks (most events): the recurrence itself, cheaper than 6 numpy calls
            out: list[int] = []
            h = parent
            for c in contents.tolist():
                h = (h * _P + c) & _M60  # the same values modulo 2**60 as the closed form below
                out.append(h)
            return out
        ppow, pinv = self._powers(n)
        h = contents * pinv
        np.cumsum(h, out=h)
        h += np.uint64((parent * _P) & _M64)
        h *= ppow
        h &= np.uint64(_M60)
        chained: list[int] = h.tolist()
        return chained

    def chain(self, tokens: bytes | Sequence[int] | np.ndarray, parent: int = ROOT_HASH) -> list[int]:
        """Chained hashes: hash i names blocks 0..i (and whatever preceded `parent`)."""
        return self.chain_from(self.content(tokens), parent)


class Index(Protocol):
    """What the router needs from an index; both forms implement it."""

    block_size: int
    hasher: BlockHasher

    def apply_stored(self, worker: WorkerId, parent: EngineHash | None, engine_hashes: Sequence[EngineHash],
                     tokens: bytes | Sequence[int] | np.ndarray) -> bool: ...
    def apply_stored_content(self, worker: WorkerId, parent: EngineHash | None,
                             engine_hashes: Sequence[EngineHash], contents: np.ndarray) -> bool: ...
    def apply_removed(self, worker: WorkerId, engine_hashes: Iterable[EngineHash]) -> None: ...
    def clear(self, worker: WorkerId) -> None: ...
    def remove_worker(self, worker: WorkerId) -> None: ...
    def match(self, chained: Sequence[int]) -> dict[WorkerId, int]: ...
    def workers(self) -> list[WorkerId]: ...
    def block_count(self, worker: WorkerId) -> int: ...
    def fewest_blocks(self, workers: list[WorkerId]) -> list[WorkerId]: ...


class WorkerSlots:
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


def _prefix_counts(slots: WorkerSlots, levels: Iterable[int], all_mask: int) -> dict[WorkerId, int]:
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


def leading_matches(masks: dict[int, int], slots: WorkerSlots, chained: Sequence[int]) -> dict[WorkerId, int]:
    """For each worker, how many leading hashes of `chained` have its bit in `masks` (workers with 0 left out).

    `_prefix_counts` inlined over a flat map: the hot path of every routing decision (the index's
    blocks, and the router's blocks of requests in flight)."""
    get = masks.get
    split = slots.split
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


_Entry = TypeVar("_Entry")  # what a worker's engine hash maps to: a chained hash (flat) or a tree node


class _IndexBase(Generic[_Entry]):
    """What both index forms share: worker slots, the per-worker engine-hash map, and the queries on it."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.hasher = BlockHasher(block_size)
        self._slots = WorkerSlots()
        self._by_worker: dict[WorkerId, dict[EngineHash, _Entry]] = {}

    def apply_stored(self, worker: WorkerId, parent: EngineHash | None, engine_hashes: Sequence[EngineHash],
                     tokens: bytes | Sequence[int] | np.ndarray) -> bool:
        """Add blocks; False when the parent is unknown (events were missed: the caller resyncs)."""
        return self.apply_stored_content(worker, parent, engine_hashes, self.hasher.content(tokens))

    def apply_stored_content(self, worker: WorkerId, parent: EngineHash | None,
                             engine_hashes: Sequence[EngineHash], contents: np.ndarray) -> bool:
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
                             engine_hashes: Sequence[EngineHash], contents: np.ndarray) -> bool:
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
        chained = self.hasher.chain_from(contents, start)
        mine.update(zip(engine_hashes, chained, strict=True))
        blocks = self._blocks
        get = blocks.get
        for h in chained:
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
        return leading_matches(self._blocks, self._slots, chained)


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
                             engine_hashes: Sequence[EngineHash], contents: np.ndarray) -> bool:
        bit = self._slots.get(worker)
        mine = self._by_worker.setdefault(worker, {})
        node = self.root if parent is None else mine.get(parent)
        if node is None:
            return False
        chained = self.hasher.chain_from(contents, node.key)
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

