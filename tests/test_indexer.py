"""The router's index against a brute-force reference, plus the event protocol's recovery rules."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.kv_router import events as ev
from workers.kv_router.indexer import BlockHasher, FlatIndex, TreeIndex
from workers.kv_router.router import KvRouter
from workers.runtime.registry import Registration

BS = 2  # tiny blocks and a 3-token vocabulary: random sequences share prefixes all the time


class Reference:
    """Brute force: each worker's blocks as full token prefixes; a match is the longest run of prefixes held."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[Any, tuple[int, ...]]] = {}

    def stored(self, w: int, parent: Any, hashes: list[Any], tokens: list[int]) -> bool:
        mine = self.blocks.setdefault(w, {})
        if parent is not None and parent not in mine:
            return False
        prefix = mine[parent] if parent is not None else ()
        for i, h in enumerate(hashes):
            prefix = prefix + tuple(tokens[i * BS:(i + 1) * BS])
            mine[h] = prefix
        return True

    def removed(self, w: int, hashes: list[Any]) -> None:
        for h in hashes:
            self.blocks.get(w, {}).pop(h, None)

    def clear(self, w: int) -> None:
        self.blocks.pop(w, None)

    def match(self, tokens: list[int]) -> dict[int, int]:
        out = {}
        for w, mine in self.blocks.items():
            held = set(mine.values())
            k = 0
            while (k + 1) * BS <= len(tokens) and tuple(tokens[:(k + 1) * BS]) in held:
                k += 1
            if k:
                out[w] = k
        return out


def engine_hash(w: int, parent: Any, block: tuple[int, ...]) -> int:
    """Like vLLM: a hash of (parent hash, tokens), in a space unrelated to the router's hash."""
    return hash(("engine", parent, block)) & 0xFFFF_FFFF_FFFF


tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=4 * BS)
op_st: st.SearchStrategy[Any] = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 3), st.integers(0, 50), tokens_st),
    st.tuples(st.just("remove"), st.integers(0, 3), st.integers(0, 50), st.just([])),
    st.tuples(st.just("clear"), st.integers(0, 3), st.just(0), st.just([])),
    st.tuples(st.just("leave"), st.integers(0, 3), st.just(0), st.just([])),
)


@pytest.mark.parametrize("index_cls", [FlatIndex, TreeIndex])
@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op_st, max_size=60), queries=st.lists(st.lists(st.integers(0, 2), max_size=6 * BS), max_size=8))
def test_index_matches_brute_force(index_cls: type, ops: list[Any], queries: list[list[int]]) -> None:
    index = index_cls(BS)
    ref = Reference()
    hasher = BlockHasher(BS)
    for kind, w, pick, tokens in ops:
        worker = 1000 + w  # worker ids are lease ids: not small, not dense
        mine = list(ref.blocks.get(worker, {}))
        if kind == "store":
            full = tokens[: len(tokens) // BS * BS]
            if not full:
                continue
            parent = mine[pick % len(mine)] if mine and pick % 3 else None
            prefix = ref.blocks[worker][parent] if parent is not None else ()
            hashes = []
            p = parent
            for i in range(len(full) // BS):
                block = tuple(full[i * BS:(i + 1) * BS])
                prefix = prefix + block
                p = engine_hash(worker, p, prefix)
                hashes.append(p)
            assert index.apply_stored(worker, parent, hashes, full) == ref.stored(worker, parent, hashes, full)
        elif kind == "remove" and mine:
            victims = [mine[pick % len(mine)]]
            index.apply_removed(worker, victims)
            ref.removed(worker, victims)
        elif kind == "clear":
            index.clear(worker)
            ref.clear(worker)
        elif kind == "leave":
            index.remove_worker(worker)
            ref.clear(worker)
    for w, held_blocks in ref.blocks.items():
        assert index.block_count(w) == len(held_blocks)
    # Queries: random ones, and every block's own prefix (extended) so that deep matches are exercised.
    held = [list(p) for mine in ref.blocks.values() for p in mine.values()]
    for q in queries + [[*p, 0, 1, 2] for p in held[:20]]:
        assert index.match(hasher.chain(q)) == ref.match(q), q


def test_unknown_parent_is_refused() -> None:
    index = FlatIndex(4)
    assert not index.apply_stored(7, parent=123, engine_hashes=[1], tokens=[1, 2, 3, 4])
    assert index.match(index.hasher.chain([1, 2, 3, 4])) == {}


def test_chained_hash_names_the_whole_prefix() -> None:
    h = BlockHasher(4)
    a = h.chain([1, 2, 3, 4, 5, 6, 7, 8])
    b = h.chain([9, 9, 9, 9, 5, 6, 7, 8])
    assert a[1] != b[1]  # same second block, different prefix
    assert h.chain([1, 2, 3, 4, 5, 6]) == a[:1]  # a partial block is not hashed
    assert h.chain([5, 6, 7, 8], parent=a[0]) == a[1:]


def test_worker_slots_are_reused() -> None:
    index = FlatIndex(2)
    for w in range(200):
        index.apply_stored(w, None, [w], [1, 2])
        index.remove_worker(w)
    index.apply_stored(999, None, [1], [1, 2])
    assert index.match(index.hasher.chain([1, 2])) == {999: 1}
    assert max(index._slots.bit.values()) == 1  # one live worker, bit 0


def test_mirror_snapshot_lists_parents_first_and_skips_orphans() -> None:
    m = ev.BlockMirror(2)
    m.apply(ev.Stored(hashes=[1, 2, 3], parent=None, tokens=ev.tokens_bytes([1, 1, 2, 2, 3, 3])))
    m.apply(ev.Stored(hashes=[4], parent=2, tokens=ev.tokens_bytes([4, 4])))
    m.apply(ev.Removed(hashes=[1]))  # 2, 3, 4 are now unreachable
    m.apply(ev.Stored(hashes=[10], parent=None, tokens=ev.tokens_bytes([1, 1])))
    m.apply(ev.Stored(hashes=[11], parent=10, tokens=ev.tokens_bytes([2, 2])))
    m.apply(ev.Removed(hashes=[10]))
    m.apply(ev.Stored(hashes=[10], parent=None, tokens=ev.tokens_bytes([1, 1])))  # re-stored after its child
    snap = list(m.snapshot())
    assert [(s.parent, s.hashes) for s in snap] == [(None, [10, 11])]  # a chain is one event
    index = FlatIndex(2)
    for s in snap:
        assert index.apply_stored(5, s.parent, s.hashes, ev.tokens_array(s.tokens))
    assert index.match(index.hasher.chain([1, 1, 2, 2])) == {5: 2}


def _reg(lease: int, name: str, bs: int = 2) -> Registration:
    return Registration(namespace="t", component="backend", endpoint="generate", subject="t.backend.generate",
                        lease_id=lease, process=name, block_size=bs)


def _batch(w: int, seq: int, *events: ev.Event, snapshot: bool = False) -> ev.EventBatch:
    return ev.EventBatch(worker=w, seq=seq, block_size=2, events=list(events), snapshot=snapshot)


def test_router_prefers_the_cached_prefix_and_resyncs_on_a_gap() -> None:
    r = KvRouter("prefix", None, rng=random.Random(0))
    r.add_worker(_reg(0xA, "a"))
    r.add_worker(_reg(0xB, "b"))
    prompt = [1, 2, 3, 4, 5, 6, 7]
    r.on_batch(_batch(0xB, 0, ev.Stored(hashes=[11, 12, 13], parent=None, tokens=ev.tokens_bytes(prompt[:6]))))
    d = r.choose(prompt)
    assert (d.process, d.matched) == ("b", {"a": 0, "b": 3})
    # A gap: b's blocks are dropped until its snapshot arrives, and a resync is requested.
    r.on_batch(_batch(0xB, 2, ev.Removed(hashes=[13])))
    assert r.resync_requests == [0xB] and r.choose(prompt).matched["b"] == 0
    r.on_batch(_batch(0xB, 3, ev.Removed(hashes=[12])))  # before the snapshot: ignored
    r.on_batch(_batch(0xB, 4, ev.Cleared(), ev.Stored(hashes=[11], parent=None, tokens=ev.tokens_bytes([1, 2])),
                      snapshot=True))
    r.on_batch(_batch(0xB, 5, ev.Stored(hashes=[12], parent=11, tokens=ev.tokens_bytes([3, 4]))))
    assert r.choose(prompt).matched == {"a": 0, "b": 2}
    # Its registration disappears: never chosen again, its blocks are gone.
    r.remove_worker(0xB)
    r.on_batch(_batch(0xB, 6, ev.Stored(hashes=[13], parent=12, tokens=ev.tokens_bytes([5, 6]))))
    assert {r.choose(prompt).process for _ in range(20)} == {"a"}
    assert r.index is not None and r.index.block_count(0xB) == 0


def test_router_starting_late_asks_for_a_snapshot() -> None:
    r = KvRouter("prefix", 2)
    r.add_worker(_reg(0xA, "a"), known_before_start=True)
    assert r.resync_requests == [0xA]
    r.on_batch(_batch(0xA, 41, ev.Stored(hashes=[1], parent=None, tokens=ev.tokens_bytes([1, 2]))))
    assert r.choose([1, 2]).matched == {"a": 0}  # not trusted before the snapshot
    r.on_batch(_batch(0xA, 42, ev.Stored(hashes=[1], parent=None, tokens=ev.tokens_bytes([1, 2])), snapshot=True))
    assert r.choose([1, 2]).matched == {"a": 1}


def test_load_breaks_ties_and_strategies() -> None:
    r = KvRouter("prefix", 2, rng=random.Random(1))
    r.add_worker(_reg(1, "a"))
    r.add_worker(_reg(2, "b"))
    busy = r.choose([1, 2, 3, 4])
    r.started(busy)
    assert r.choose([1, 2, 3, 4]).worker != busy.worker  # nothing cached anywhere: the idle one
    rr = KvRouter("round_robin", 2)
    rr.add_worker(_reg(1, "a"))
    rr.add_worker(_reg(2, "b"))
    assert [rr.choose([1]).process for _ in range(4)] == ["a", "b", "a", "b"]
    rnd = KvRouter("random", 2, rng=random.Random(3))
    rnd.add_worker(_reg(1, "a"))
    rnd.add_worker(_reg(2, "b"))
    assert {rnd.choose([1]).process for _ in range(50)} == {"a", "b"}


def test_batches_survive_the_wire() -> None:
    batch = _batch(7, 3, ev.Stored(hashes=[1, b"\x01\x02"], parent=None, tokens=ev.tokens_bytes([1, 2, 3, 4])),
                   ev.Removed(hashes=[1]), ev.Cleared())
    assert ev.batch_decoder.decode(ev.batch_encoder.encode(batch)) == batch


def test_match_with_many_workers() -> None:
    """More than 8 workers share blocks: the dense mask path gives the same answer as the sparse one."""
    index = FlatIndex(2)
    for w in range(40):
        depth = 1 + w % 3
        index.apply_stored(w, None, [f"{w}-{i}" for i in range(depth)], [1, 2, 3, 4, 5, 6][: 2 * depth])
    assert index.match(index.hasher.chain([1, 2, 3, 4, 5, 6])) == {w: 1 + w % 3 for w in range(40)}


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(0, 2100), split=st.integers(0, 2100), bs=st.sampled_from([1, 3, 16]))
def test_a_chain_continued_from_its_parent_is_the_whole_chain(seed: int, n: int, split: int, bs: int) -> None:
    """The vectorised chain (a cumulative sum) agrees with itself block by block, across table growth."""
    tokens = np.random.default_rng(seed).integers(0, 2**31 - 1, n * bs, dtype=np.int32)
    h = BlockHasher(bs)
    whole = h.chain(tokens)
    k = min(split, n)
    head = h.chain(tokens[: k * bs])
    assert head + h.chain(tokens[k * bs:], parent=head[-1]) == whole if k else h.chain(tokens) == whole
    assert len(set(whole)) == n and all(0 <= x < 2**60 for x in whole)
    assert h.chain(tokens.tobytes()) == whole == BlockHasher(bs).chain(tokens.tolist())
