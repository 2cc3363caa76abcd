"""A worker whose etcd lease is lost (revoked, or expired in an outage) comes back under the same identity.

Real etcd and nats-server; the worker is an EndpointServer registered through Registry (what every
worker does), the router a real RouterService watching etcd. Only the last test restarts (its own) etcd.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from launcher.services import free_port, start_etcd, stop_services
from tests.helpers import chunks_via, served, until
from tests.test_retries import IdsOnly
from workers.common.protocol import GenerateRequest
from workers.kv_router import events as ev
from workers.kv_router.router import KvRouter, RouterService
from workers.runtime import requestplane
from workers.runtime.registry import Registration, Registry
from workers.runtime.serve import WorkerContext
from workers.runtime.settings import RuntimeSettings


def test_a_revoked_lease_is_replaced_under_the_same_key(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[Registration, Registration, list[str]]:
        worker = await Registry.connect([services.etcd])
        other = await Registry.connect([services.etcd])  # the launcher, or an operator's etcdctl
        try:
            reg = Registration(namespace="ll1", component="backend", endpoint="generate",
                               subject="ll1.backend.generate", process="w")
            await worker.register(reg, ttl=3)
            (before,) = await other.list("ll1")
            await other.revoke(before.lease_id)

            async def back() -> bool:
                regs = await other.list("ll1")
                return len(regs) == 1 and regs[0].lease_id != before.lease_id

            await until(back, 10, "the registration back under a new lease")
            (after,) = await other.list("ll1")
            keys = [kv.key.decode() for kv in await other.client.get_prefix(b"ll1/")]
            return before, after, keys
        finally:
            await worker.close()
            await other.close()

    before, after, keys = asyncio.run(run())
    assert after.instance_id == before.instance_id == before.lease_id  # the identity is the first lease
    assert after.lease_id != before.lease_id  # the launcher finds the lease to revoke in the value
    assert after.key == before.key and keys == [before.key]
    assert after.instance_subject == before.instance_subject


def test_router_reaches_a_worker_and_takes_its_kv_events_after_its_lease_is_lost(services) -> None:  # type: ignore[no-untyped-def]
    ns = "ll2"

    async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"text": " Paris", "worker": "w"}
        yield {"text": "", "finish_reason": "stop", "worker": "w"}

    async def run() -> list[dict[str, Any]]:
        # The worker.
        w_nc = await requestplane.connect(services.nats, "w")
        w_reg = await Registry.connect([services.etcd])
        subject = requestplane.endpoint_subject(ns, "backend", "generate")
        lease = await w_reg.grant(ttl=3)
        reg = Registration(namespace=ns, component="backend", endpoint="generate", subject=subject,
                           lease_id=lease, instance_id=lease, process="w", block_size=2)
        server = requestplane.EndpointServer(w_nc, subject, reg.instance_subject, handler)
        await server.start()
        await w_reg.register(reg, ttl=3)
        # The router.
        ctx = WorkerContext(RuntimeSettings(ns, (services.etcd,), services.nats, "router", "localhost"))
        await ctx.connect()
        router = KvRouter("prefix", None)
        service = RouterService(ctx, router, IdsOnly(), "backend")  # type: ignore[arg-type]
        await service.start()
        operator = await Registry.connect([services.etcd])
        try:
            await until(lambda: lease in router.workers, 10, "the router sees the worker")
            await operator.revoke(lease)
            await until(lambda: lease not in router.workers, 10, "the router sees the key deleted")
            await until(lambda: lease in router.workers, 10, "the router sees the worker again")
            # Its KV events (tagged with its instance id) are taken again: a snapshot, as the resync asks.
            stored = ev.Stored(hashes=[11, 12], parent=None, tokens=ev.tokens_bytes([1, 2, 3, 4]))
            batch = ev.EventBatch(worker=lease, seq=7, block_size=2, events=[stored], snapshot=True)
            await w_nc.publish(ev.events_subject(ns), ev.batch_encoder.encode(batch))
            await until(lambda: router.choose([1, 2, 3, 4, 5]).matches.get(lease) == 2, 10,
                        "its KV events accepted")
            assert ctx.nc is not None
            async with served(ctx.nc, f"{ns}.preprocess.generate", service.generate):
                request = GenerateRequest(token_ids=[1, 2, 3, 4, 5]).model_dump(exclude_none=True)
                chunks, error = await chunks_via(w_nc, f"{ns}.preprocess.generate", request)
            assert error is None, error
            return chunks
        finally:
            service.stop()
            await operator.close()
            await ctx.close()
            await server.stop()
            await w_reg.close()
            await w_nc.close()

    chunks = asyncio.run(run())
    assert chunks[0]["text"] == " Paris" and chunks[-1]["routing"]["process"] == "w"


def test_the_lease_outlives_an_etcd_restart(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The keepalive stream breaks when etcd stops; the next refresh opens a new one, so the registration,
    under the same lease, outlives several TTLs after etcd is back (etcd renews a lease's TTL as it starts)."""
    url = f"http://127.0.0.1:{free_port()}"
    etcd = [start_etcd(url, tmp_path)]
    ttl = 2
    refreshed: list[int] = []
    refresh = Registry._refresh

    async def counted(stream: Any, lease_id: int) -> Any:
        reply = await refresh(stream, lease_id)
        refreshed.append(lease_id)
        return reply

    monkeypatch.setattr(Registry, "_refresh", staticmethod(counted))

    async def run() -> tuple[list[Registration], list[Registration]]:
        worker = await Registry.connect([url])
        reg = Registration(namespace="ll3", component="backend", endpoint="generate",
                           subject="ll3.backend.generate", process="w")
        try:
            await worker.register(reg, ttl=ttl)
            await until(lambda: refreshed, 10, "a refresh over the keepalive stream")  # the stream is open
            await asyncio.to_thread(stop_services, etcd)
            etcd[:] = [await asyncio.to_thread(start_etcd, url, tmp_path)]
            reader = await Registry.connect([url])
            try:
                before = await reader.list("ll3")
                since = len(refreshed)
                # Three refreshes over the new stream, more than a TTL: a keepalive that did not recover has none
                await until(lambda: len(refreshed) >= since + 3, 5 * ttl, "refreshes after the restart")
                return before, await reader.list("ll3")
            finally:
                await reader.close()
        finally:
            await worker.close()

    try:
        before, after = asyncio.run(run())
    finally:
        stop_services(etcd)
    assert [r.lease_id for r in before] == [r.lease_id for r in after] and len(after) == 1
