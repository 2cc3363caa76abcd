"""`Registry.follow` on a real etcd: nothing registered between its list and its watch is missed, and
a delete made while its watch is down is seen after the re-list; then each of its users (the
frontend catalog, the decode worker's prefill pool, the KV router) reacting to a put, a delete, and
a delete during an outage.

The gaps are made deterministic, not waited for: the follower's list is wrapped so that the test acts
right after (or right before) it, on the real etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from launcher.services import free_port, start_etcd, stop_services
from tests.helpers import until
from workers.disaggregated.prefill_pool import PrefillPool
from workers.frontend.catalog import Catalog, follow
from workers.kv_router.router import KvRouter
from workers.runtime.registry import Put, Registration, Registry, Snapshot, Update


def registration(ns: str, component: str, instance: int) -> Registration:
    return Registration(namespace=ns, component=component, endpoint="generate", subject=f"{ns}.{component}.generate",
                        lease_id=instance, instance_id=instance, process=f"w{instance:x}", block_size=2)


async def register(registry: Registry, *regs: Registration) -> None:
    """Plain puts, no lease: what the test deletes is gone because the test said so, not by a TTL."""
    for reg in regs:
        await registry.client.put(reg.key.encode(), reg.encode())


async def deregister(registry: Registry, reg: Registration) -> None:
    await registry.client.delete(reg.key.encode())


def after_next_list(monkeypatch: pytest.MonkeyPatch, registry: Registry, act: Callable[[], Awaitable[object]],
                    before: bool = False) -> None:
    """Run `act` once, right after (or before) `registry`'s next get-prefix: a change in the gap
    between a list and its watch (or while a broken watch waits for its re-list)."""
    real = registry.client.get_prefix

    async def get_prefix(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(registry.client, "get_prefix", real)
        if before:
            await act()
        listed = await real(*args, **kwargs)
        if not before:
            await act()
        return listed

    monkeypatch.setattr(registry.client, "get_prefix", get_prefix)


async def next_update(updates: AsyncIterator[Update], timeout: float = 20) -> Update:
    return await asyncio.wait_for(anext(updates), timeout)


def test_a_registration_between_the_list_and_the_watch_is_seen(services, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ns = "rf1"
    a, b = registration(ns, "backend", 0xa), registration(ns, "backend", 0xb)

    async def run() -> tuple[Update, Update]:
        reader, writer = await Registry.connect([services.etcd]), await Registry.connect([services.etcd])
        updates = reader.follow(ns)
        try:
            await register(writer, a)
            after_next_list(monkeypatch, reader, lambda: register(writer, b))
            return await next_update(updates), await next_update(updates)
        finally:
            await updates.aclose()
            await reader.close()
            await writer.close()

    listed, then = asyncio.run(run())
    assert listed == Snapshot({a.key: a})
    assert then == Put(b.key, b)


def test_a_delete_while_etcd_is_down_is_seen_after_the_relist(tmp_path: Path) -> None:
    """etcd is stopped under a live watch and started again on the same data dir; a key is deleted
    before the follower lists again, so no watch ever carries that delete."""
    ns = "rf2"
    url = f"http://127.0.0.1:{free_port()}"
    etcd = [start_etcd(url, tmp_path)]
    a, b, c = (registration(ns, "backend", i) for i in (0xa, 0xb, 0xc))

    async def run() -> tuple[Update, Update, Update]:
        reader = await Registry.connect([url])
        updates = reader.follow(ns)
        try:
            writer = await Registry.connect([url])
            await register(writer, a, b)
            listed = await next_update(updates)
            await register(writer, c)
            watched = await next_update(updates)  # the watch is live (the follower waits at this Put)
            await writer.close()
            await asyncio.to_thread(stop_services, etcd)
            etcd[:] = [await asyncio.to_thread(start_etcd, url, tmp_path)]
            writer = await Registry.connect([url])
            await deregister(writer, a)
            await writer.close()
            return listed, watched, await next_update(updates, timeout=60)
        finally:
            await updates.aclose()
            await reader.close()

    try:
        listed, watched, relisted = asyncio.run(run())
    finally:
        stop_services(etcd)
    assert listed == Snapshot({a.key: a, b.key: b})
    assert watched == Put(c.key, c)
    assert relisted == Snapshot({b.key: b, c.key: c}, gone=frozenset({a.key}))


# ---- the users ------------------------------------------------------------------------------------

async def comes_and_goes(etcd: str, ns: str, component: str, monkeypatch: pytest.MonkeyPatch,
                         follower: Callable[[Registry], Awaitable[object]], known: Callable[[], Collection[int]]
                         ) -> None:
    """`known()` (the instance ids a user holds) follows etcd: the listed registration, a put, a delete,
    and a delete made while the user's watch is down (its etcd channel closed) before the re-list."""
    reader, writer = await Registry.connect([etcd]), await Registry.connect([etcd])
    a, b = registration(ns, component, 0xa), registration(ns, component, 0xb)
    await register(writer, a)
    task = asyncio.create_task(follower(reader))
    try:
        await until(lambda: set(known()) == {0xa}, 10, "the listed registration")
        await register(writer, b)
        await until(lambda: set(known()) == {0xa, 0xb}, 10, "a put")
        await deregister(writer, b)
        await until(lambda: set(known()) == {0xa}, 10, "a delete")
        after_next_list(monkeypatch, reader, lambda: deregister(writer, a), before=True)
        await reader.client.close()  # the watch ends; the follower lists again (reconnecting)
        await until(lambda: not known(), 10, "a delete while the watch was down")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reader.close()
        await writer.close()


class RecordingCatalog(Catalog):
    """The listeners' view: a delete for each key that goes, outage or not."""

    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[str] = []

    def delete(self, key: str) -> None:
        self.deleted.append(key)
        super().delete(key)


def test_the_frontend_catalog_follows_etcd(services, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ns = "rf-catalog"
    catalog = RecordingCatalog()
    asyncio.run(comes_and_goes(services.etcd, ns, "vllm", monkeypatch, lambda r: follow(r, ns, catalog),
                               lambda: [reg.instance for reg in catalog.by_key.values()]))
    assert catalog.deleted == [registration(ns, "vllm", i).key for i in (0xb, 0xa)]


def test_the_prefill_pool_follows_etcd(services, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ns = "rf-prefill"
    pool = PrefillPool()
    asyncio.run(comes_and_goes(services.etcd, ns, "prefill", monkeypatch,
                               lambda r: pool.follow(r.follow(ns, "prefill")),
                               lambda: [i.registration.instance for i in pool.instances.values()]))


def test_the_kv_router_follows_etcd(services, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """KvRouter's side (what RouterService feeds it; test_lease_loss runs the whole service)."""
    ns = "rf-router"
    router = KvRouter("prefix", None)

    async def feed(registry: Registry) -> None:
        async for update in registry.follow(ns, "backend"):
            router.on_registry(update)

    asyncio.run(comes_and_goes(services.etcd, ns, "backend", monkeypatch, feed, lambda: router.workers))
    assert router.gone == {0xa, 0xb}


def test_a_relist_purges_the_vanished_worker_from_the_router() -> None:
    """The Snapshot's `gone` takes the delete path: the index and the in-flight bookkeeping forget it."""
    router = KvRouter("prefix", 2)
    a, b = registration("ns", "backend", 0xa), registration("ns", "backend", 0xb)
    router.on_registry(Snapshot({a.key: a, b.key: b}), known_before_start=True)
    assert set(router.awaiting_snapshot) == {0xa, 0xb}  # registered before the router: asked for a snapshot
    decision = router.choose([1, 2, 3, 4])
    router.started(decision)
    assert router.inflight.workers() == [decision.worker]
    c = registration("ns", "backend", 0xc)
    router.on_registry(Snapshot({c.key: c}, gone=frozenset({a.key, b.key})))
    assert set(router.workers) == {0xc} and router.gone == {0xa, 0xb}
    assert decision.worker not in router.inflight.workers() and not router.awaiting_snapshot


def test_a_router_and_a_decode_worker_leave_another_models_workers_aside() -> None:
    """Two models under one component (a worker's `model:`): a router routes only to kv_workers of its own
    model and drops the others' KV events, and a decode worker's prefill pool holds only its model's prefill
    workers; either would otherwise hand one model's tokens or KV to another model's engine."""
    import numpy as np

    from workers.kv_router import events as ev

    def of(model: str, instance: int, component: str = "backend") -> Registration:
        return dataclasses.replace(registration("ns", component, instance), model=model)

    mine, other = of("/m/a", 0xa), of("/m/b", 0xb)
    router = KvRouter("prefix", 2, model="/m/a")
    other_tokens = np.array([1, 2, 3, 4], dtype="<i4").tobytes()  # its events came before its registration
    router.on_batch(ev.EventBatch(worker=0xb, seq=0, block_size=2, events=[ev.Stored([11, 12], None, other_tokens)]))
    router.on_registry(Snapshot({mine.key: mine, other.key: other}))
    assert set(router.workers) == {0xa}
    assert router.index is not None and router.index.block_count(0xb) == 0
    router.on_batch(ev.EventBatch(worker=0xb, seq=1, block_size=2, events=[ev.Stored([13], None, other_tokens[:8])]))
    assert router.index.block_count(0xb) == 0
    assert {router.choose([1, 2, 3, 4]).worker for _ in range(8)} == {0xa}
    fresh = KvRouter("prefix", None, model="/m/a")  # block size not known yet: an unknown worker's events
    fresh.on_batch(ev.EventBatch(worker=0xb, seq=0, block_size=2, events=[ev.Stored([11, 12], None, other_tokens)]))
    assert fresh.index is None and fresh.block_size is None  # do not set it (it may be another model's)
    anyone = KvRouter("prefix", 2)  # no model given: every worker, as before
    anyone.on_registry(Snapshot({mine.key: mine, other.key: other}))
    assert set(anyone.workers) == {0xa, 0xb}

    pool = PrefillPool("/m/a")
    pa, pb = of("/m/a", 0xc, "prefill"), of("/m/b", 0xd, "prefill")
    pool.apply(Snapshot({pa.key: pa, pb.key: pb}))
    pool.apply(Put(pb.key, pb))
    assert [i.registration.instance for i in pool.instances.values()] == [0xc]
    picked = pool.pick()
    assert picked is not None and picked.registration.instance == 0xc
