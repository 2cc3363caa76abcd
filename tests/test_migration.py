"""Mid-stream migration and drain, one piece of logic at a time, over a real nats-server.

The "engines" here are scripted handlers whose next token is a function of the whole context (prompt +
tokens so far), as greedy decoding is: a continuation sent elsewhere must then give exactly the tokens of
an uninterrupted run. The whole path on real vLLM runs in test_chaos_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import until
from workers.frontend.catalog import Catalog
from workers.frontend.dispatch import Dispatcher, StreamBroken
from workers.runtime import requestplane
from workers.runtime.annotated import ErrorCode
from workers.runtime.registry import Registration

MODEL = "/models/smol"


def next_token(context: list[int]) -> int:
    return (sum(context) * 31 + len(context)) % 997


class ScriptedWorker:
    """Serves `generate` like a greedy engine; `hang_after` tokens, it stops answering (as if killed)."""

    def __init__(self, instance: int, hang_after: int | None = None) -> None:
        self.instance = instance
        self.hang_after = hang_after
        self.requests: list[dict[str, Any]] = []
        self.server: requestplane.EndpointServer | None = None
        self.nc: Any = None
        self.reg = Registration(namespace="ns", component="vllm", endpoint="generate", subject="ns.vllm.generate",
                                lease_id=instance, instance_id=instance, model=MODEL,
                                extra={"served_model_name": "smol", "max_model_len": 4096})

    async def handler(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(request)
        context = list(request["token_ids"])
        max_tokens = request["sampling"]["max_tokens"]
        for i in range(max_tokens):
            if self.hang_after is not None and i == self.hang_after:
                await asyncio.Event().wait()  # silent from here on, like a killed process
            token = next_token(context)
            context.append(token)
            chunk: dict[str, Any] = {"text": f"<{token}>", "token_ids": [token]}
            if i == max_tokens - 1:
                chunk["finish_reason"] = "length"
            yield chunk
            await asyncio.sleep(0)

    async def start(self, nats: str) -> None:
        self.nc = await requestplane.connect(nats, f"scripted-{self.instance}")
        self.server = requestplane.EndpointServer(self.nc, self.reg.subject, self.reg.instance_subject, self.handler)
        await self.server.start()

    async def kill(self) -> None:
        """Gone without a word: no error event, no end marker."""
        await self.nc.close()


def reference(prompt: list[int], n: int) -> list[int]:
    context = list(prompt)
    for _ in range(n):
        context.append(next_token(context))
    return context[len(prompt):]


async def collect(dispatcher: Dispatcher, payload: dict[str, Any], tokens: list[int] | None = None) -> list[int]:
    tokens = [] if tokens is None else tokens
    async for chunk in dispatcher.generate("smol", payload):
        tokens += chunk.get("token_ids") or []
    return tokens


def payload(max_tokens: int = 12, **sampling: Any) -> dict[str, Any]:
    return {"request_id": "cmpl-1", "token_ids": [5, 6, 7], "sampling": {"max_tokens": max_tokens, **sampling}}


async def deployment(nats: str, *workers: ScriptedWorker, migration_limit: int = 3
                     ) -> tuple[Any, Catalog, Dispatcher]:
    for w in workers:
        await w.start(nats)
    catalog = Catalog()
    for w in workers:
        catalog.put(w.reg.key, w.reg)
    nc = await requestplane.connect(nats, "test-frontend")
    # A long idle timeout: the loss must be seen from the registration, not from silence.
    return nc, catalog, Dispatcher(nc, catalog, timeout=30, retries=2, migration_limit=migration_limit)


def test_a_stream_whose_worker_dies_goes_on_elsewhere_with_the_same_tokens(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        dying, other = ScriptedWorker(1, hang_after=4), ScriptedWorker(2)
        nc, catalog, dispatcher = await deployment(services.nats, dying, other)
        dispatcher.inflight[2] = 1  # the first pick is the dying one
        try:
            seen: list[int] = []
            task = asyncio.create_task(collect(dispatcher, payload(12), seen))
            await until(lambda: len(seen) == 4, 10, "the client got the dying worker's 4 tokens")
            await dying.kill()
            loop = asyncio.get_running_loop()
            deleted_at = loop.time()
            catalog.delete(dying.reg.key)  # what the supervisor's lease revocation shows the frontend
            tokens = await asyncio.wait_for(task, 10)
            assert tokens == reference([5, 6, 7], 12)  # one unbroken stream, as without the fault
            assert dispatcher.migrated == 1
            (cont,) = other.requests
            assert cont["token_ids"] == [5, 6, 7, *reference([5, 6, 7], 4)]
            assert cont["sampling"]["max_tokens"] == 8
            assert cont["request_id"] != "cmpl-1"
            assert loop.time() - deleted_at < 5  # not the 30 s idle timeout
        finally:
            await nc.close()
            await other.kill()

    asyncio.run(run())


async def killed_mid_stream(dispatcher: Dispatcher, catalog: Catalog, dying: ScriptedWorker, max_tokens: int,
                            after: int) -> asyncio.Task[list[int]]:
    """A stream of `max_tokens` whose lone instance dies (and is unregistered) after sending `after` tokens."""
    seen: list[int] = []
    task = asyncio.create_task(collect(dispatcher, payload(max_tokens), seen))
    await until(lambda: len(seen) == after, 10, f"the client got the dying instance's {after} tokens")
    await dying.kill()
    catalog.delete(dying.reg.key)
    return task


def test_a_stream_whose_only_instance_dies_waits_for_its_replacement(services) -> None:  # type: ignore[no-untyped-def]
    """The lone way in (one monolith worker) dies mid-stream and the supervisor starts it again: the stream waits up to
    the request timeout for it and goes on there, instead of ending with an error the client cannot retry."""
    async def run() -> None:
        dying, replacement = ScriptedWorker(11, hang_after=3), ScriptedWorker(12)
        nc, catalog, dispatcher = await deployment(services.nats, dying)
        dispatcher.timeout = 5
        try:
            task = await killed_mid_stream(dispatcher, catalog, dying, 10, after=3)
            await until(lambda: 11 not in dispatcher.inflight, 10, "the stream to the dead instance ended")
            assert not task.done(), "it waits for another instance rather than failing at once"
            await replacement.start(services.nats)
            catalog.put(replacement.reg.key, replacement.reg)  # registered again, under a new instance id
            assert await asyncio.wait_for(task, 10) == reference([5, 6, 7], 10)
            (cont,) = replacement.requests
            assert cont["sampling"]["max_tokens"] == 7 and dispatcher.migrated == 1
        finally:
            await nc.close()
            await replacement.kill()

    asyncio.run(run())


def test_a_stream_whose_only_instance_never_comes_back_fails_after_the_request_timeout(services
                                                                                     ) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        dying = ScriptedWorker(13, hang_after=2)
        nc, catalog, dispatcher = await deployment(services.nats, dying)
        dispatcher.timeout = 1
        try:
            task = await killed_mid_stream(dispatcher, catalog, dying, 6, after=2)
            with pytest.raises(StreamBroken) as broken:
                await asyncio.wait_for(task, 10)
            assert broken.value.error.status == 503
        finally:
            await nc.close()

    asyncio.run(run())


def test_structured_output_is_not_migrated_and_ends_with_an_error(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        dying, other = ScriptedWorker(3, hang_after=2), ScriptedWorker(4)
        nc, catalog, dispatcher = await deployment(services.nats, dying, other)
        dispatcher.inflight[4] = 1
        try:
            seen: list[int] = []
            task = asyncio.create_task(collect(dispatcher, payload(8, structured_outputs={"choice": ["a", "b"]}), seen))
            await until(lambda: len(seen) == 2, 10, "the client got the dying worker's tokens")
            await dying.kill()
            catalog.delete(dying.reg.key)
            with pytest.raises(StreamBroken) as broken:
                await asyncio.wait_for(task, 10)
            assert broken.value.error.status == 503
            assert other.requests == [] and dispatcher.migrated == 0
        finally:
            await nc.close()
            await other.kill()

    asyncio.run(run())


def test_migration_stops_at_its_limit(services) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        dying, other = ScriptedWorker(5, hang_after=2), ScriptedWorker(6)
        nc, catalog, dispatcher = await deployment(services.nats, dying, other, migration_limit=0)
        dispatcher.inflight[6] = 1
        try:
            seen: list[int] = []
            task = asyncio.create_task(collect(dispatcher, payload(8), seen))
            await until(lambda: len(seen) == 2, 10, "the client got the dying worker's tokens")
            await dying.kill()
            catalog.delete(dying.reg.key)
            with pytest.raises(StreamBroken):
                await asyncio.wait_for(task, 10)
            assert other.requests == []
        finally:
            await nc.close()
            await other.kill()

    asyncio.run(run())


def test_a_draining_server_finishes_in_flight_takes_nothing_new_and_hands_back_the_rest(services) -> None:  # type: ignore[no-untyped-def]
    """drain(): a short request in flight completes; a new one finds nobody (no-responders, retried
    elsewhere by the caller); one that outlasts the drain ends with shutting_down (migrated elsewhere)."""

    async def run() -> None:
        release = asyncio.Event()
        started: list[str] = []

        async def handler(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            started.append(request["request_id"])
            yield {"text": "a", "token_ids": [1]}
            if request["request_id"] == "long":
                await asyncio.Event().wait()
            await release.wait()
            yield {"text": "b", "token_ids": [2], "finish_reason": "stop"}

        server_nc = await requestplane.connect(services.nats, "draining")
        server = requestplane.EndpointServer(server_nc, "ns.d.generate", "ns.d.generate.1", handler)
        await server.start()
        nc = await requestplane.connect(services.nats, "client")

        async def ask(request_id: str) -> list[Any]:
            return [i async for i in requestplane.stream(nc, "ns.d.generate.1", {"request_id": request_id}, 10)]

        try:
            short, long_ = asyncio.create_task(ask("short")), asyncio.create_task(ask("long"))
            await until(lambda: len(started) == 2, 10, "both requests reached the handler")
            drain = asyncio.create_task(server.drain(timeout=1.0))
            await until(lambda: not server.accepting, 5, "the request subjects are dropped")
            release.set()
            late = await ask("late")
            assert late[-1].is_error() and late[-1].code == ErrorCode.NO_RESPONDERS
            assert [i.data["token_ids"] for i in await short] == [[1], [2]]
            cut = await long_
            assert cut[-1].is_error() and cut[-1].code == ErrorCode.SHUTTING_DOWN
            assert await drain == 1
            assert "late" not in started
        finally:
            await nc.close()
            await server_nc.close()

    asyncio.run(run())
