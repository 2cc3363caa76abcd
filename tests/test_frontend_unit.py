"""The frontend's decisions, one piece of logic at a time (no engine, no network): which component a
request goes to, which instance, how a worker's typed error becomes an HTTP status, how an OpenAI body
becomes vLLM sampling parameters. The whole path runs for real in test_frontend_e2e.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from workers.common.client import entry_of
from workers.frontend.catalog import Catalog
from workers.frontend.dispatch import Dispatcher, api_error
from workers.frontend.errors import BadRequest, NoWorker, WorkerFailed, WorkerSilent
from workers.kinds import KINDS, entry_component, entry_components
from workers.runtime.annotated import Annotated, ErrorCode
from workers.runtime.registry import Registration

MODEL = "/models/smol"


def reg(component: str, instance: int, served: str | None = "smol", max_len: int | None = 2048) -> Registration:
    extra = {"served_model_name": served, "max_model_len": max_len} if KINDS_BY_COMPONENT[component].engine else {}
    return Registration(namespace="ns", component=component, endpoint="generate", subject=f"ns.{component}.generate",
                        lease_id=instance, instance_id=instance, model=MODEL, extra=extra)


KINDS_BY_COMPONENT = {k.component: k for k in KINDS.values()}


def catalog_of(*regs: Registration) -> Catalog:
    cat = Catalog()
    for r in regs:
        cat.put(r.key, r)
    return cat


def test_entry_order_is_router_then_decode_then_monolith() -> None:
    assert entry_components() == ("preprocess", "decode", "vllm")
    assert entry_component({"kv_worker", "router", "frontend"}) == "preprocess"
    assert entry_component({"prefill", "decode"}) == "decode"
    assert entry_component({"prefill"}) is None
    assert entry_of({"vllm", "frontend"}, None) == "vllm"
    assert entry_of({"vllm"}, "decode") is None


def test_catalog_routes_to_the_best_entry_and_forgets_the_gone() -> None:
    cat = catalog_of(reg("backend", 1), reg("backend", 2), reg("preprocess", 3, served=None))
    route = cat.serving()["smol"]
    assert (route.component, [r.instance for r in route.instances], route.max_model_len) == ("preprocess", [3], 2048)
    cat.delete(reg("preprocess", 3).key)  # the router left: kv workers are not an entry of their own
    assert cat.serving() == {} and "smol" in cat.routes()


def test_dispatcher_spreads_over_the_least_busy_instances() -> None:
    cat = catalog_of(reg("vllm", 1), reg("vllm", 2), reg("vllm", 3))
    d = Dispatcher(nc=None, catalog=cat, timeout=1, retries=1)  # type: ignore[arg-type]
    route = cat.serving()["smol"]
    d.inflight[1] = 2
    d.inflight[2] = 1
    assert d.pick(route, set()).instance == 3  # type: ignore[union-attr]
    d.inflight[3] = 1
    picks = {d.pick(route, set()).instance for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {2, 3}  # ties take turns
    assert d.pick(route, {2, 3}).instance == 1  # type: ignore[union-attr]
    assert d.pick(route, {1, 2, 3}) is None


@pytest.mark.parametrize(("code", "error"), [
    (ErrorCode.BAD_REQUEST, BadRequest), (ErrorCode.NO_RESPONDERS, NoWorker), (ErrorCode.SHUTTING_DOWN, NoWorker),
    (ErrorCode.SILENT, WorkerSilent), (ErrorCode.NO_ANSWER, WorkerSilent), (ErrorCode.WORKER_ERROR, WorkerFailed),
    (None, WorkerFailed),
])
def test_worker_errors_map_to_statuses_by_code(code: ErrorCode | None, error: type) -> None:
    got = api_error(Annotated.error("whatever the text says", code=code), "vllm instance w")
    assert type(got) is error
    assert got.body()["error"]["code"] == got.status


def test_up_names_a_port_already_in_use() -> None:
    import socket

    from launcher.plan import ProcessSpec
    from launcher.validation import ports_in_use

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        spec = ProcessSpec(name="web", kind="frontend", argv=[], env={}, devices="-", tier=0, ports={"http": port})
        (problem,) = ports_in_use([spec])
        assert f"port {port} (web's http port) is already in use" in problem
    assert ports_in_use([spec]) == []


def test_a_dead_instance_is_retried_then_503(services) -> None:  # type: ignore[no-untyped-def]
    """Two registered instances nobody serves any more (killed before their leases went): the request is
    tried on each (no-responders is retryable), then fails with 503 (NoWorker, Retry-After), before any
    token, so vLLM's server answers the status. Real nats-server; no engine needed."""
    from workers.runtime import requestplane

    async def run() -> NoWorker | None:
        nc = await requestplane.connect(services.nats, "test-frontend")
        try:
            catalog = catalog_of(reg("vllm", 11), reg("vllm", 12))
            dispatcher = Dispatcher(nc, catalog, timeout=2, retries=2)
            payload = {"request_id": "r", "token_ids": [1, 2, 3], "sampling": {"max_tokens": 4}, "output": "tokens"}
            try:
                async for _ in dispatcher.generate("smol", payload):
                    pass
            except NoWorker as exc:
                assert dispatcher.retried == 1  # the second instance, then nothing left
                return exc
            return None
        finally:
            await nc.close()

    error = asyncio.run(run())
    assert error is not None and (error.status, error.headers()) == (503, {"Retry-After": "5"})


@pytest.mark.parametrize("max_tokens", [16, 17, 1])
def test_the_request_plane_payload_states_max_tokens_even_at_vllms_default(max_tokens: int) -> None:
    """vLLM's SamplingParams omits fields at their default, and max_tokens' default is 16. The router prices a
    request's decode from the payload's max_tokens (256 tokens when absent), so a request for 16 tokens was
    priced as 256: 4 blocks of 64 too many, enough to send it away from its cached prefix under load."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    from workers.common.protocol import GenerateRequest
    from workers.frontend.remote_engine import payload_of

    request = EngineCoreRequest(request_id="r", prompt_token_ids=[1, 2, 3], mm_features=None,
                                sampling_params=SamplingParams(max_tokens=max_tokens), pooling_params=None,
                                arrival_time=0.0, lora_request=None, cache_salt=None, data_parallel_rank=None)
    sent = GenerateRequest.model_validate(payload_of(request))
    assert sent.sampling.get("max_tokens") == max_tokens


def test_outputs_reach_vllm_in_batches_and_a_failure_after_what_came_before_it() -> None:
    """The worker's chunks reach vLLM's output handler as one EngineCoreOutputs per batch (what arrived since
    its last call, as vLLM's own client hands it a whole engine step), and a failing request is ended only
    after the outputs that arrived before its failure were handed over, and before those after it."""
    from vllm.v1.engine import EngineCoreOutput

    from workers.frontend.remote_engine import Failure, RemoteEngineCore

    async def run() -> list[Any]:
        core = RemoteEngineCore(None, lambda: "m")  # type: ignore[arg-type]
        seen: list[Any] = []

        async def fail(request_id: str, error: Any) -> None:
            seen.append(("failed", request_id))

        core._fail = fail  # type: ignore[method-assign]
        for rid in ("a", "b"):
            core.outputs.put_nowait(EngineCoreOutput(request_id=rid, new_token_ids=[1]))
        core.outputs.put_nowait(Failure("c", BadRequest("boom")))
        core.outputs.put_nowait(EngineCoreOutput(request_id="d", new_token_ids=[2]))
        for _ in range(2):
            batch = await core.get_output_async()
            seen.append([out.request_id for out in batch.outputs])
        core.outputs.put_nowait(EngineCoreOutput(request_id="e", new_token_ids=[3]))  # the queue was empty
        seen.append([out.request_id for out in (await core.get_output_async()).outputs])
        return seen

    assert asyncio.run(run()) == [["a", "b"], ("failed", "c"), ["d"], ["e"]]
