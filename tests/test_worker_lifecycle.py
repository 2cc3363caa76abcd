"""How a worker process ends, on a real etcd and nats-server: an engine death unregisters it at once
and gives the supervisor exitcodes.ENGINE_DEAD; SIGTERM drains (registration marked draining,
in-flight requests finish, the key goes last); /health beside the metrics says 503 while it cannot
serve.

The engine here is a stand-in with vLLM's `errored` flag (a real engine death is in test_chaos_e2e.py
and test_monolith_e2e.py): what is tested is the worker's reaction, not vLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx

from launcher.services import free_port
from tests.helpers import Services, until
from workers.runtime import exitcodes, requestplane
from workers.runtime.registry import Registry
from workers.runtime.serve import WorkerContext, serve_prometheus
from workers.runtime.settings import RuntimeSettings


class Engine:
    errored = False


def settings(services: Services, namespace: str, drain_timeout: float = 30.0) -> RuntimeSettings:
    return RuntimeSettings(namespace=namespace, etcd_endpoints=(services.etcd,), nats_server=services.nats,
                           process_name="w", host="h", drain_timeout=drain_timeout)


async def keys(services: Services, namespace: str) -> list[Any]:
    registry = await Registry.connect([services.etcd])
    try:
        return await registry.list(namespace)
    finally:
        await registry.client.close()


def test_health_answers_503_with_the_reason_once_the_engine_died(services: Services) -> None:
    ctx = WorkerContext(settings(services, "health"))
    engine = Engine()
    ctx._engine = engine
    port = free_port()
    serve_prometheus(port, "test", ctx.unhealthy)
    ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert ok.status_code == 200
    engine.errored = True
    dead = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert dead.status_code == 503 and "engine core died" in dead.json()["reason"]
    assert "process_cpu_seconds_total" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def test_an_engine_death_unregisters_at_once_and_exits_with_its_code(services: Services) -> None:
    async def run() -> None:
        ctx = WorkerContext(settings(services, "dead"))
        await ctx.connect()
        engine = Engine()
        ctx.watch_engine(engine, every=0.05)

        async def handler(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            yield {"text": "x", "token_ids": [1]}

        await ctx.serve("vllm", "generate", handler)
        exit_code = asyncio.create_task(ctx.run_until_stopped())
        await until(lambda: keys(services, "dead"), 5, "registered")
        engine.errored = True
        await until(lambda: _none(keys(services, "dead")), 5, "the key gone")
        assert await asyncio.wait_for(exit_code, 10) == exitcodes.ENGINE_DEAD

    asyncio.run(run())


async def _none(coro: Any) -> bool:
    return not await coro


def test_sigterm_drains_in_flight_requests_before_unregistering(services: Services) -> None:
    async def run() -> None:
        ctx = WorkerContext(settings(services, "drain"))
        await ctx.connect()
        release = asyncio.Event()
        started = asyncio.Event()

        async def handler(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            started.set()
            yield {"text": "a", "token_ids": [1]}
            await release.wait()
            yield {"text": "b", "token_ids": [2], "finish_reason": "stop"}

        reg = await ctx.serve("vllm", "generate", handler)
        exit_code = asyncio.create_task(ctx.run_until_stopped())
        nc = await requestplane.connect(services.nats, "client")
        try:
            stream = asyncio.create_task(_collect(requestplane.stream(nc, reg.instance_subject, {}, 10)))
            await asyncio.wait_for(started.wait(), 5)
            ctx._on_signal()  # what SIGTERM does
            await until(lambda: _draining(services), 5, "the registration says draining")
            assert ctx.unhealthy() is not None  # /health: 503 while draining
            release.set()
            items = await asyncio.wait_for(stream, 10)
            assert [i.data["token_ids"] for i in items] == [[1], [2]]  # finished, not cut
            assert await asyncio.wait_for(exit_code, 10) == 0
            assert await keys(services, "drain") == []
        finally:
            await nc.close()

    asyncio.run(run())


def test_a_drain_past_its_timeout_hands_the_rest_back_as_shutting_down(services: Services) -> None:
    async def run() -> None:
        ctx = WorkerContext(settings(services, "cut", drain_timeout=0.5))
        await ctx.connect()

        async def handler(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            yield {"text": "a", "token_ids": [1]}
            await asyncio.Event().wait()

        reg = await ctx.serve("vllm", "generate", handler)
        exit_code = asyncio.create_task(ctx.run_until_stopped())
        nc = await requestplane.connect(services.nats, "client")
        try:
            stream = asyncio.create_task(_collect(requestplane.stream(nc, reg.instance_subject, {}, 10)))
            await until(lambda: ctx.servers[0].in_flight == 1, 5, "the request in flight")
            ctx._on_signal()
            items = await asyncio.wait_for(stream, 10)
            assert items[-1].is_error() and items[-1].code == "shutting_down"
            assert await asyncio.wait_for(exit_code, 10) == 0
        finally:
            await nc.close()

    asyncio.run(run())


async def _collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def _draining(services: Services) -> bool:
    regs = await keys(services, "drain")
    return bool(regs) and all(r.draining for r in regs)
