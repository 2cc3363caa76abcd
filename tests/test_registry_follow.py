"""`Registry.follow` on a real etcd: nothing registered between its list and its watch is missed, and
a delete made while its watch is down is seen after the re-list.

The gaps are made deterministic, not waited for: the follower's list is wrapped so that the test acts
right after (or right before) it, on the real etcd.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.services import free_port, start_etcd, stop_services
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

