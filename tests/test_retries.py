"""Retries before the first token, decided by error code, through the KV router and the prefill pick.

Real nats-server; the workers are EndpointServers with scripted handlers (one piece of logic under
test: who is tried, how often, and what the caller sees).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from workers.common.protocol import GenerateRequest
from workers.kv_router.router import KvRouter, RouterService
from workers.runtime import requestplane
from workers.runtime.annotated import ErrorCode, StreamError
from workers.runtime.registry import Registration
from workers.runtime.serve import WorkerContext
from workers.runtime.settings import RuntimeSettings


class IdsOnly:
    """The router's tokenizer for requests that carry token ids (all of these tests')."""

    def ready(self, req: GenerateRequest) -> bool:
        return True

    def __call__(self, req: GenerateRequest) -> np.ndarray:
        return np.asarray(req.token_ids, dtype=np.int32)


Behaviour = Callable[[str, dict[str, Any]], AsyncIterator[Any]]


async def healthy(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    yield {"text": " Paris", "worker": name}
    yield {"text": "", "finish_reason": "stop", "worker": name}


async def stopping(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    raise StreamError("worker shutting down: request aborted", code=ErrorCode.SHUTTING_DOWN)
    yield {}


async def refusing(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    raise StreamError("bad request: max_tokens must be at least 1", code=ErrorCode.BAD_REQUEST)
    yield {}


async def dying_after_a_token(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    yield {"text": " Par", "worker": name}
    raise StreamError("worker shutting down: request aborted", code=ErrorCode.SHUTTING_DOWN)


class Fleet:
    """Workers on per-instance subjects, registered straight into a KvRouter (no etcd needed here)."""

    def __init__(self, nats: str, ns: str) -> None:
        self.nats = nats
        self.ns = ns
        self.calls: Counter[str] = Counter()
        self.servers: list[requestplane.EndpointServer] = []
        self.conns: list[Any] = []
        self.router = KvRouter("round_robin", block_size=2)

    async def add(self, name: str, instance: int, behaviour: Behaviour | None) -> None:
        """behaviour None: registered but not subscribed, like a worker killed -9 before its lease expired."""
        subject = requestplane.endpoint_subject(self.ns, "backend", "generate")
        reg = Registration(namespace=self.ns, component="backend", endpoint="generate", subject=subject,
                           lease_id=instance, process=name, block_size=2)
        self.router.add_worker(reg)
        if behaviour is None:
            return

        async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
            self.calls[name] += 1
            async for item in behaviour(name, req):
                yield item

        nc = await requestplane.connect(self.nats, name)
        server = requestplane.EndpointServer(nc, subject, reg.instance_subject, handler)
        await server.start()
        self.servers.append(server)
        self.conns.append(nc)

    async def service(self, max_retries: int = 2) -> RouterService:
        ctx = WorkerContext(RuntimeSettings(self.ns, (), self.nats, "router", "localhost"))
        ctx.nc = await requestplane.connect(self.nats, "router")
        self.conns.append(ctx.nc)
        return RouterService(ctx, self.router, IdsOnly(),  # type: ignore[arg-type]
                             "backend", idle_timeout=2, max_retries=max_retries)

    async def close(self) -> None:
        for server in self.servers:
            await server.stop()
        for nc in self.conns:
            await nc.close()


async def collect(service: RouterService) -> tuple[list[dict[str, Any]], StreamError | None]:
    chunks: list[dict[str, Any]] = []
    try:
        async for chunk in service.generate(GenerateRequest(token_ids=[1, 2, 3, 4]).model_dump(exclude_none=True)):
            chunks.append(chunk)
    except StreamError as exc:
        return chunks, exc
    return chunks, None


def test_router_retries_a_dead_worker_on_another(services) -> None:  # type: ignore[no-untyped-def]
    """A worker killed before its lease expired answers NATS 503 (no responders): the request goes elsewhere."""
    async def run() -> list[tuple[list[dict[str, Any]], StreamError | None]]:
        fleet = Fleet(services.nats, "rt1")
        await fleet.add("dead", 0x10, None)
        await fleet.add("alive", 0x20, healthy)
        service = await fleet.service()
        try:
            return [await collect(service) for _ in range(4)]
        finally:
            await fleet.close()

    results = asyncio.run(run())
    assert all(err is None for _, err in results), results
    assert all(chunks[0]["worker"] == "alive" for chunks, _ in results)


def test_router_retries_at_most_n_times(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[Counter[str], StreamError | None]:
        fleet = Fleet(services.nats, "rt2")
        for i in range(5):
            await fleet.add(f"w{i}", 0x30 + i, stopping)
        service = await fleet.service(max_retries=2)
        try:
            chunks, err = await collect(service)
            assert chunks == []
            return fleet.calls, err
        finally:
            await fleet.close()

    calls, err = asyncio.run(run())
    assert sum(calls.values()) == 3 and max(calls.values()) == 1  # 1 + 2 retries, never the same worker twice
    assert err is not None and err.code == ErrorCode.SHUTTING_DOWN


def test_router_never_retries_a_bad_request(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[Counter[str], StreamError | None]:
        fleet = Fleet(services.nats, "rt3")
        await fleet.add("a", 0x40, refusing)
        await fleet.add("b", 0x41, refusing)
        service = await fleet.service()
        try:
            _, err = await collect(service)
            return fleet.calls, err
        finally:
            await fleet.close()

    calls, err = asyncio.run(run())
    assert sum(calls.values()) == 1
    assert err is not None and err.code == ErrorCode.BAD_REQUEST


def test_router_never_retries_after_the_first_token(services) -> None:  # type: ignore[no-untyped-def]
    """Tokens already reached the caller: a retry would repeat them, so the stream ends with the error."""
    async def run() -> tuple[Counter[str], list[dict[str, Any]], StreamError | None]:
        fleet = Fleet(services.nats, "rt4")
        await fleet.add("a", 0x50, dying_after_a_token)
        await fleet.add("b", 0x51, dying_after_a_token)
        service = await fleet.service()
        try:
            chunks, err = await collect(service)
            return fleet.calls, chunks, err
        finally:
            await fleet.close()

    calls, chunks, err = asyncio.run(run())
    assert sum(calls.values()) == 1
    assert [c["text"] for c in chunks] == [" Par"]
    assert err is not None and err.code == ErrorCode.SHUTTING_DOWN


# ---- the decode worker's prefill pick -------------------------------------------------------------

class FakeEngine:
    """Only the decode after the prefill; this test is about which prefill instance is asked."""

    async def generate(self, raw: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"text": "x", "finish_reason": "stop", "kv": raw.get("kv_transfer_params")}


async def prefilled(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    yield {"text": "", "finish_reason": "length", "worker": name, "kv_transfer_params": {"from": name}}


async def prefill_with(nats: str, ns: str, workers: list[tuple[str, Behaviour | None]], max_retries: int
                       ) -> tuple[dict[str, Any] | None, str, Counter[str], list[str]]:
    """Prefill instances keyed in pick order (a-, b-, ...); returns (params, prefill worker, calls, set aside)."""
    from workers.disaggregated.decode_worker import DisaggregatedHandler
    from workers.disaggregated.prefill_pool import PrefillPool

    pool = PrefillPool()
    calls: Counter[str] = Counter()
    conns: list[Any] = []
    servers: list[requestplane.EndpointServer] = []
    subject = requestplane.endpoint_subject(ns, "prefill", "generate")
    for i, (name, behaviour) in enumerate(workers):
        reg = Registration(namespace=ns, component="prefill", endpoint="generate", subject=subject,
                           lease_id=0x100 + i, process=name)
        pool.put(f"{chr(97 + i)}-{name}", reg)
        if behaviour is None:
            continue

        def handler(req: dict[str, Any], name: str = name, behaviour: Behaviour = behaviour) -> AsyncIterator[Any]:
            calls[name] += 1
            return behaviour(name, req)

        nc_w = await requestplane.connect(nats, name)
        server = requestplane.EndpointServer(nc_w, subject, reg.instance_subject, handler)
        await server.start()
        conns.append(nc_w)
        servers.append(server)
    nc = await requestplane.connect(nats, "decode")
    try:
        handler = DisaggregatedHandler(nc, FakeEngine(), pool, prefill_timeout=2,  # type: ignore[arg-type]
                                       max_retries=max_retries)
        params, used = await handler.prefill(GenerateRequest(prompt="hi"))
        return params, used, calls, sorted(i.name for i in pool.instances.values() if i.failed)
    finally:
        for server in servers:
            await server.stop()
        for c in [*conns, nc]:
            await c.close()


def test_prefill_pick_tries_another_instance_when_one_is_lost(services) -> None:  # type: ignore[no-untyped-def]
    params, used, calls, aside = asyncio.run(prefill_with(
        services.nats, "pf1", [("dead", None), ("stopping", stopping), ("good", prefilled)], max_retries=2))
    assert used == "good" and params == {"from": "good"}
    assert calls == Counter({"stopping": 1, "good": 1})
    assert aside == ["dead", "stopping"]


def test_prefill_retries_are_bounded_then_local(services) -> None:  # type: ignore[no-untyped-def]
    params, used, calls, _ = asyncio.run(prefill_with(
        services.nats, "pf2", [("dead", None), ("stopping", stopping), ("good", prefilled)], max_retries=1))
    assert used == "local" and params is None
    assert calls == Counter({"stopping": 1})


def test_prefill_bad_request_is_not_retried_nor_blamed_on_the_instance(services) -> None:  # type: ignore[no-untyped-def]
    params, used, calls, aside = asyncio.run(prefill_with(
        services.nats, "pf3", [("picky", refusing), ("good", prefilled)], max_retries=2))
    assert used == "local" and params is None and calls == Counter({"picky": 1}) and aside == []


class SlowText(IdsOnly):
    """A tokenizer that takes its time on text (like ~2,000 tokens on a busy core), and says when it ends."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.finished = threading.Event()

    def __call__(self, req: GenerateRequest) -> np.ndarray:
        if req.token_ids is not None:
            return super().__call__(req)
        self.started.set()
        self.finished.wait(5)  # released by the test once the other request was answered
        return np.asarray([1, 2, 3, 4], dtype=np.int32)


def test_tokenizing_a_prompt_does_not_hold_up_other_requests(services) -> None:  # type: ignore[no-untyped-def]
    """While one request's text is being tokenized, a request that came later (token ids, as the frontend
    sends them) is routed and answered: tokenizing runs off the router's event loop."""
    async def run() -> list[str]:
        fleet = Fleet(services.nats, "rt-tok")
        await fleet.add("w", 0x50, healthy)
        service = await fleet.service()
        slow = SlowText()
        service.tokenizer = slow  # type: ignore[assignment]
        order: list[str] = []

        async def send(name: str, req: GenerateRequest) -> None:
            async for _ in service.generate(req.model_dump(exclude_none=True)):
                pass
            order.append(name)

        try:
            text = asyncio.create_task(send("text", GenerateRequest(prompt="a long document")))
            await asyncio.wait_for(asyncio.to_thread(slow.started.wait, 5), 6)  # the text request is being tokenized
            await asyncio.wait_for(send("ids", GenerateRequest(token_ids=[1, 2, 3, 4])), 10)
            slow.finished.set()
            await asyncio.wait_for(text, 10)
            return order
        finally:
            await fleet.close()

    assert asyncio.run(run()) == ["ids", "text"]
