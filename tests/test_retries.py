"""Retries before the first token and migrations after it, decided by error code: through the KV router
(which hands each request off to a worker; the frontend's Dispatcher retries with the lost workers in
`avoid`) and through the prefill pick.

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

from tests.helpers import chunks_via, served, until
from workers.common.protocol import GenerateRequest
from workers.frontend.catalog import Catalog
from workers.frontend.dispatch import Dispatcher, StreamBroken
from workers.frontend.errors import ApiError, BadRequest, NoWorker
from workers.kv_router.router import KvRouter, RouterService
from workers.runtime import requestplane
from workers.runtime.annotated import ErrorCode, StreamError
from workers.runtime.registry import Registration
from workers.runtime.serve import WorkerContext
from workers.runtime.settings import RuntimeSettings

MODEL = "m"


class IdsOnly:
    """The router's tokenizer for requests that carry token ids (all of these tests')."""

    def ready(self, req: GenerateRequest) -> bool:
        return True

    def __call__(self, req: GenerateRequest) -> np.ndarray:
        return np.asarray(req.token_ids, dtype=np.int32)


Behaviour = Callable[[str, dict[str, Any]], AsyncIterator[Any]]


async def healthy(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    yield {"text": " Paris", "token_ids": [9], "worker": name}
    yield {"text": "", "token_ids": [], "finish_reason": "stop", "worker": name}


async def stopping(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    raise StreamError("worker shutting down: request aborted", code=ErrorCode.SHUTTING_DOWN)
    yield {}


async def refusing(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    raise StreamError("bad request: max_tokens must be at least 1", code=ErrorCode.BAD_REQUEST)
    yield {}


async def dying_after_a_token(name: str, req: dict[str, Any]) -> AsyncIterator[Any]:
    yield {"text": " Par", "token_ids": [7], "worker": name}
    raise StreamError("worker shutting down: request aborted", code=ErrorCode.SHUTTING_DOWN)


class Fleet:
    """Workers on per-instance subjects, registered straight into a KvRouter (no etcd needed here), a router
    serving on NATS, and a frontend's Dispatcher whose catalog lists them all."""

    def __init__(self, nats: str, ns: str) -> None:
        self.nats = nats
        self.ns = ns
        self.calls: Counter[str] = Counter()
        self.requests: dict[str, list[dict[str, Any]]] = {}  # what each worker was sent
        self.servers: list[requestplane.EndpointServer] = []
        self.conns: list[Any] = []
        self.router = KvRouter("round_robin", block_size=2)
        self.catalog = Catalog()

    async def add(self, name: str, instance: int, behaviour: Behaviour | None) -> None:
        """behaviour None: registered but not subscribed, like a worker killed -9 before its lease expired."""
        subject = requestplane.endpoint_subject(self.ns, "backend", "generate")
        reg = Registration(namespace=self.ns, component="backend", endpoint="generate", subject=subject,
                           lease_id=instance, process=name, block_size=2, model=MODEL)
        self.router.add_worker(reg)
        self.catalog.put(f"w/{instance:x}", reg)
        if behaviour is None:
            return

        async def handler(req: dict[str, Any]) -> AsyncIterator[Any]:
            self.calls[name] += 1
            self.requests.setdefault(name, []).append(req)
            async for item in behaviour(name, req):
                yield item

        nc = await requestplane.connect(self.nats, name)
        server = requestplane.EndpointServer(nc, subject, reg.instance_subject, handler)
        await server.start()
        self.servers.append(server)
        self.conns.append(nc)

    async def service(self) -> RouterService:
        ctx = WorkerContext(RuntimeSettings(self.ns, (), self.nats, "router", "localhost"))
        ctx.nc = await requestplane.connect(self.nats, "router")
        self.conns.append(ctx.nc)
        return RouterService(ctx, self.router, IdsOnly(), "backend")  # type: ignore[arg-type]

    async def dispatcher(self, service: RouterService, retries: int = 2) -> Dispatcher:
        """A frontend's Dispatcher whose one entry instance is `service`, served on NATS."""
        subject = requestplane.endpoint_subject(self.ns, "preprocess", "generate")
        reg = Registration(namespace=self.ns, component="preprocess", endpoint="generate", subject=subject,
                           lease_id=0x99, process="router", model=MODEL)
        assert service.ctx.nc is not None
        server = requestplane.EndpointServer(service.ctx.nc, subject, reg.instance_subject, service.generate)
        await server.start()
        self.servers.append(server)
        self.catalog.put("r/99", reg)
        nc = await requestplane.connect(self.nats, "frontend")
        self.conns.append(nc)
        return Dispatcher(nc, self.catalog, timeout=2, retries=retries)

    async def close(self) -> None:
        for server in self.servers:
            await server.stop()
        for nc in self.conns:
            await nc.close()


Outcome = tuple[list[dict[str, Any]], ApiError | None]


async def collect(dispatcher: Dispatcher, token_ids: list[int] | None = None) -> Outcome:
    chunks: list[dict[str, Any]] = []
    request = GenerateRequest(token_ids=token_ids or [1, 2, 3, 4], sampling={"max_tokens": 4}, output="tokens")
    try:
        async for chunk in dispatcher.generate(MODEL, request.model_dump(exclude_none=True)):
            chunks.append(chunk)
    except StreamBroken as exc:
        return chunks, exc.error
    except ApiError as exc:
        return chunks, exc
    return chunks, None


def test_a_dead_worker_is_passed_over_when_the_request_is_sent_again(services) -> None:  # type: ignore[no-untyped-def]
    """A worker killed before its lease expired answers NATS 503 (no responders) to the handed-off request:
    the frontend asks the router again with that worker in `avoid`, and the router chooses another."""
    async def run() -> tuple[list[Outcome], Fleet]:
        fleet = Fleet(services.nats, "rt1")
        await fleet.add("dead", 0x10, None)
        await fleet.add("alive", 0x20, healthy)
        dispatcher = await fleet.dispatcher(await fleet.service())
        try:
            return [await collect(dispatcher) for _ in range(4)], fleet
        finally:
            await fleet.close()

    results, fleet = asyncio.run(run())
    assert all(err is None for _, err in results), results
    assert all(chunks[0]["worker"] == "alive" for chunks, _ in results)
    assert all(r.get("avoid") is None for r in fleet.requests["alive"])  # the router keeps `avoid` to itself
    # the router's decision rides on the final chunk, as when it relayed the stream
    assert all(chunks[-1]["routing"]["process"] == "alive" for chunks, _ in results)


def test_retries_are_bounded_and_never_the_same_worker_twice(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[Counter[str], Outcome]:
        fleet = Fleet(services.nats, "rt2")
        for i in range(5):
            await fleet.add(f"w{i}", 0x30 + i, stopping)
        dispatcher = await fleet.dispatcher(await fleet.service(), retries=2)
        try:
            outcome = await collect(dispatcher)
            return fleet.calls, outcome
        finally:
            await fleet.close()

    calls, (chunks, err) = asyncio.run(run())
    assert chunks == []
    assert sum(calls.values()) == 3 and max(calls.values()) == 1  # 1 + 2 retries, never the same worker twice
    assert isinstance(err, NoWorker) and "shutting down" in err.message, err


def test_a_bad_request_is_never_retried(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> tuple[Counter[str], Outcome]:
        fleet = Fleet(services.nats, "rt3")
        await fleet.add("a", 0x40, refusing)
        await fleet.add("b", 0x41, refusing)
        dispatcher = await fleet.dispatcher(await fleet.service())
        try:
            return fleet.calls, await collect(dispatcher)
        finally:
            await fleet.close()

    calls, (_, err) = asyncio.run(run())
    assert sum(calls.values()) == 1
    assert isinstance(err, BadRequest), err


def test_a_stream_whose_worker_dies_goes_on_on_another_worker(services) -> None:  # type: ignore[no-untyped-def]
    """After a token, the frontend migrates: the prompt plus the token so far go to the router again, with the
    lost worker in `avoid`; the other worker continues, and the router's count of requests in flight returns
    to 0 from both workers' end reports."""
    async def run() -> tuple[Fleet, Outcome, KvRouter]:
        fleet = Fleet(services.nats, "rt4")
        await fleet.add("a", 0x50, dying_after_a_token)
        await fleet.add("b", 0x51, healthy)
        service = await fleet.service()
        dispatcher = await fleet.dispatcher(service)
        try:
            outcome = await collect(dispatcher, [1, 2, 3, 4])
            await until(lambda: not fleet.router.decisions, 5, "both workers' end reports")
            return fleet, outcome, fleet.router
        finally:
            await fleet.close()

    fleet, (chunks, err), router = asyncio.run(run())
    assert err is None, err
    assert "".join(c["text"] for c in chunks) == " Par Paris" and chunks[-1]["finish_reason"] == "stop"
    assert chunks[0]["worker"] == "a" and chunks[-1]["worker"] == "b"
    assert fleet.calls == Counter({"a": 1, "b": 1})
    assert fleet.requests["b"][0]["token_ids"] == [1, 2, 3, 4, 7]  # the continuation: prompt + the token so far
    assert all(v.inflight_requests == 0 for v in router.workers.values())


def test_the_router_forgets_a_request_whose_end_report_was_lost() -> None:
    """A worker's load report lists the routers' requests it serves: one missing from it LOST_END_AFTER after
    its handoff ended without its report reaching the router, and no longer counts."""
    import time

    from workers.kv_router import events as ev
    from workers.kv_router import router as kv

    router = KvRouter("prefix", block_size=2)
    router.ends_to = "_INBOX.r.ends"
    reg = Registration(namespace="n", component="backend", endpoint="generate", subject="n.backend.generate",
                       lease_id=0x60, process="w", block_size=2)
    router.add_worker(reg)
    old, young = router.choose([1, 2, 3, 4]), router.choose([5, 6, 7, 8])
    router.started(old)
    router.started(young)
    old.started -= kv.LOST_END_AFTER + 1
    listed = ev.Load(worker=0x60, running=1, waiting=0, kv_usage=0.1, routed={router.ends_to: [old.id]})
    router.on_load(listed)
    assert set(router.decisions) == {old.id, young.id}  # listed, or too young to judge
    router.on_load(ev.Load(worker=0x60, running=0, waiting=0, kv_usage=0.0, routed={"_INBOX.other.ends": [3]}))
    assert set(router.decisions) == {young.id}
    assert router.workers[0x60].inflight_requests == 1
    router.on_load(ev.Load(worker=0x60, running=0, waiting=0, kv_usage=0.0))  # a report that does not say
    assert set(router.decisions) == {young.id}
    router.ended(young.id)
    assert not router.decisions and router.workers[0x60].inflight_requests == 0
    assert time.monotonic() - young.started < kv.LOST_END_AFTER


def test_a_worker_whose_registration_goes_ends_its_requests_in_flight() -> None:
    router = KvRouter("round_robin", block_size=2)
    for w in (0x70, 0x71):
        router.add_worker(Registration(namespace="n", component="backend", endpoint="generate",
                                       subject="n.backend.generate", lease_id=w, process=f"w{w:x}", block_size=2))
    decisions = [router.choose([1, 2, 3, i]) for i in range(4)]
    for d in decisions:
        router.started(d)
    router.remove_worker(0x70)
    assert {d.worker for d in router.decisions.values()} == {0x71} and len(router.decisions) == 2


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
    sends them) is routed: tokenizing runs off the router's event loop."""
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


def test_a_lone_worker_that_was_avoided_is_chosen_again(services) -> None:  # type: ignore[no-untyped-def]
    """`avoid` is a preference: a stream whose lone worker lost messages (a NATS restart) goes on there, since
    the worker is alive; passing over it would leave no worker at all."""
    async def run() -> tuple[tuple[list[dict[str, Any]], Any], Fleet]:
        fleet = Fleet(services.nats, "rt5")
        await fleet.add("lone", 0x60, healthy)
        service = await fleet.service()
        subject = requestplane.endpoint_subject(fleet.ns, "preprocess", "generate")
        async with served(service.ctx.nc, subject, service.generate):
            caller = await requestplane.connect(fleet.nats, "frontend")
            fleet.conns.append(caller)
            request = GenerateRequest(token_ids=[1, 2, 3, 4], avoid=[0x60]).model_dump(exclude_none=True)
            outcome = await chunks_via(caller, subject, request)
        await fleet.close()
        return outcome, fleet

    (chunks, error), fleet = asyncio.run(run())
    assert error is None, error
    assert chunks[-1]["routing"]["process"] == "lone" and fleet.calls == Counter({"lone": 1})
