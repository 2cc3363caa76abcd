"""The frontend's HTTP answers when things go wrong, through vLLM's own OpenAI server (built over the tiny
model's config and tokenizer: no engine) and a stub dispatcher that plays the workers' part."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_frontend_unit import catalog_of, reg
from workers.frontend.app import FrontendApp, Settings
from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.dispatch import StreamBroken, api_error
from workers.frontend.errors import WorkerFailed, WorkerSilent
from workers.frontend.model_apps import ModelApps
from workers.frontend.openai_layer import build_openai_app, serve_args
from workers.kinds import KINDS
from workers.runtime.annotated import Annotated, ErrorCode

ENTRY = KINDS["monolith"].component  # any kind with a way in would do
Script = Callable[[], AsyncIterator[dict[str, Any]]]


async def tokens(*ids: int) -> AsyncIterator[dict[str, Any]]:
    """A worker's answer in output "tokens": one token per chunk, the last one finished."""
    for i, token in enumerate(ids):
        yield {"token_ids": [token], **({"finish_reason": "length"} if i == len(ids) - 1 else {})}


class StubDispatcher:
    """What the frontend uses of a Dispatcher: generate() and the retry/migration counters."""

    def __init__(self) -> None:
        self.script: Script = lambda: tokens(72, 73)
        self.retried = self.migrated = 0
        self.calls = 0

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        async for chunk in self.script():
            yield chunk


class Harness:
    """One event loop and one vLLM app for the module (building it reads the model's config)."""

    def __init__(self, model: Path, config_extra: dict[str, Any] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.dispatcher = StubDispatcher()
        self.catalog = catalog_of(reg(ENTRY, 1, max_len=64))
        route = self.catalog.serving()["smol"]
        config = {"model": str(model), "served_model_name": ["smol"], **(config_extra or {})}
        self.openai = self.loop.run_until_complete(
            build_openai_app(serve_args(str(model), []), route, config, self.dispatcher))  # type: ignore[arg-type]

    def call(self, method: str, path: str, script: Script | None = None, catalog: Catalog | None = None,
             settings: Settings | None = None, **kwargs: Any) -> httpx.Response:
        self.dispatcher.script = script or (lambda: tokens(72, 73))
        catalog = catalog or self.catalog
        app = FrontendApp(self.dispatcher, catalog, settings or Settings(),  # type: ignore[arg-type]
                          ModelApps(catalog, self._built))

        async def run() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://t") as http:
                response = await http.request(method, path, **kwargs)
                await response.aread()
                return response

        return self.loop.run_until_complete(run())

    async def _built(self, route: ModelRoute) -> Any:
        return self.openai

    def close(self) -> None:
        """Stop vLLM's output handler on this loop, then the loop: nothing left for the collector to finalize
        later (an AsyncLLM left on an abandoned loop logs errors, and broke pytest's own imports at exit)."""
        self.openai.state.engine_client.shutdown()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tiny_model: Path) -> Iterator[Harness]:
    h = Harness(tiny_model)
    yield h
    h.close()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "smol", "prompt": [1, 2, 3], "max_tokens": 2, **fields}


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == r.status_code, body
    return dict(body["error"])


def test_a_good_request_is_answered(harness: Harness) -> None:
    r = harness.call("POST", "/v1/completions", json=completion())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "fg"  # token ids 72, 73


@pytest.mark.parametrize("content", [b"{not json", b"\"\xc3\x28\"", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_is_400(harness: Harness, content: bytes) -> None:
    r = harness.call("POST", "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400  # vLLM's answer (FastAPI's for a body it cannot parse)


def test_a_bad_parameter_is_400_and_named(harness: Harness) -> None:
    r = harness.call("POST", "/v1/completions", json=completion(max_tokens="many"))
    assert r.status_code == 400 and error_of(r)["param"] == "body.max_tokens"  # as vLLM names it


def test_a_prompt_past_the_context_is_400(harness: Harness) -> None:
    # The context is the one the workers registered (64 here), not the model's own.
    r = harness.call("POST", "/v1/completions", json=completion(prompt=[5] * 70))
    assert r.status_code == 400 and "64" in error_of(r)["message"]


def test_an_unknown_model_is_404_naming_the_served_ones(harness: Harness) -> None:
    r = harness.call("POST", "/v1/completions", json=completion(model="gpt-9"))
    error = error_of(r)
    assert r.status_code == 404 and "gpt-9" in error["message"] and "smol" in error["message"]


def test_an_unknown_route_is_404(harness: Harness) -> None:
    assert harness.call("GET", "/v1/nothing").status_code == 404


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_is_413(harness: Harness, declared: bool) -> None:
    body = json.dumps(completion(prompt="x" * 2000)).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: the limit is counted while reading
        yield body

    r = harness.call("POST", "/v1/completions", settings=Settings(max_request_bytes=1024),
             **({"content": body} if declared else {"content": chunked()}))
    assert r.status_code == 413 and error_of(r)["type"] == "RequestTooLargeError"


@pytest.mark.parametrize(("header", "status"), [
    (None, 401), ("Bearer wrong", 401), ("Basic secret", 401), ("Bearer secret", 200),
])
def test_the_api_key_is_required_when_set(harness: Harness, header: str | None, status: int) -> None:
    r = harness.call("POST", "/v1/completions", settings=Settings(api_key="secret"), json=completion(),
             headers={"authorization": header} if header else {})
    assert r.status_code == status
    if status == 401:
        assert error_of(r)["type"] == "AuthenticationError"


@pytest.mark.parametrize("stream", [False, True])
def test_no_worker_to_take_it_is_503_with_retry_after(harness: Harness, stream: bool) -> None:
    # The model is known (its kv workers registered) but nothing is a way in: no router is up.
    catalog = catalog_of(reg(KINDS["kv_worker"].component, 1))
    r = harness.call("POST", "/v1/completions", catalog=catalog, json=completion(stream=stream))
    assert (r.status_code, r.headers.get("retry-after")) == (503, "5")
    assert error_of(r)["type"] == "ServiceUnavailableError"


@pytest.mark.parametrize("stream", [False, True])
def test_a_silent_worker_is_504(harness: Harness, stream: bool) -> None:
    async def silent() -> AsyncIterator[dict[str, Any]]:
        raise WorkerSilent("vllm instance w: no token for 10 s")
        yield {}

    r = harness.call("POST", "/v1/completions", script=silent, json=completion(stream=stream))
    assert r.status_code == 504 and "no token for 10 s" in error_of(r)["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_worker_refuses_is_400(harness: Harness, stream: bool) -> None:
    async def refused() -> AsyncIterator[dict[str, Any]]:
        raise api_error(Annotated.error("token id 99999 is out of vocabulary", code=ErrorCode.BAD_REQUEST), "w")
        yield {}

    r = harness.call("POST", "/v1/completions", script=refused, json=completion(stream=stream))
    assert r.status_code == 400 and "out of vocabulary" in error_of(r)["message"]


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event(harness: Harness) -> None:
    async def broken() -> AsyncIterator[dict[str, Any]]:
        yield {"token_ids": [72]}
        raise StreamBroken(WorkerFailed("vllm instance w: the engine failed"))

    r = harness.call("POST", "/v1/completions", script=broken, json=completion(stream=True))
    assert r.status_code == 200  # already sent with the first token
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "f"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "engine failed" in error["message"]



@pytest.fixture(scope="module")
def batched(tiny_model: Path) -> Iterator[Harness]:
    """The same app, built from a registration that carries `stream_interval` 4 (`engine: {stream-interval: 4}`)."""
    h = Harness(tiny_model, {"stream_interval": 4})
    yield h
    h.close()


def test_the_engine_stream_interval_batches_the_stream_as_vllm_serve_does(harness: Harness, batched: Harness) -> None:
    """The stream_interval the workers registered is applied where `vllm serve` applies it (the API process's
    output processor): a worker's 9 tokens, sent one per engine step, leave as the first token and then at
    least 4 at a time (vLLM also merges what the client has not read yet), with the same text as unbatched."""
    async def paced() -> AsyncIterator[dict[str, Any]]:  # one token per engine step of ~20 ms
        async for chunk in tokens(*range(72, 81)):
            await asyncio.sleep(0.02)
            yield chunk

    def stream(h: Harness) -> list[str]:
        r = h.call("POST", "/v1/completions", script=paced, json=completion(max_tokens=9, stream=True))
        assert r.status_code == 200, r.text
        return [json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                if line.startswith("data: {")]

    every, grouped = stream(harness), stream(batched)
    assert "".join(grouped) == "".join(every) and len("".join(every)) == 9
    assert len(grouped) <= 3 and all(len(t) >= 4 for t in grouped[1:-1]), grouped  # 1 | 2-5 | 6-9
    assert len(every) > len(grouped), (every, grouped)  # unbatched, the steps show (9 chunks unless merged)


def test_a_worker_registers_the_stream_interval_it_was_given(tiny_model: Path) -> None:
    """The other half of the path: `--stream-interval` given to a worker goes into the model configuration it
    registers, which frontends build vLLM's layer from (else the flag would be accepted and ignored)."""
    from workers.engine import engine_args_from, make_parser, model_config_of

    args = make_parser("worker").parse_args(["--model", str(tiny_model), "--stream-interval", "4"])
    assert model_config_of(engine_args_from(args))["stream_interval"] == 4
