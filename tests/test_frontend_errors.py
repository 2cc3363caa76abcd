"""The frontend's error answers, in-process: FrontendApp over httpx's ASGITransport, a catalog filled
with registrations, and a stub dispatcher that answers what each test scripts (no NATS, no engine).
The same answers over the network, from real workers, are in test_frontend_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.test_frontend_unit import catalog_of, reg
from workers.frontend.app import FrontendApp, Settings
from workers.frontend.catalog import Catalog
from workers.frontend.dispatch import StreamBroken, api_error
from workers.frontend.errors import WorkerFailed, WorkerSilent
from workers.frontend.tokens import Tokenizers
from workers.kinds import KINDS
from workers.runtime.annotated import Annotated, ErrorCode

ENTRY = KINDS["monolith"].component  # any kind with a way in would do
Script = Callable[[], AsyncIterator[dict[str, Any]]]


async def tokens(*texts: str) -> AsyncIterator[dict[str, Any]]:
    for i, text in enumerate(texts):
        yield {"text": text, "token_ids": [i], **({"finish_reason": "length"} if i == len(texts) - 1 else {})}


class StubDispatcher:
    """What FrontendApp uses of a Dispatcher: generate() and the retry/migration counters."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.retried = self.migrated = 0
        self.calls = 0

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        async for chunk in self.script():
            yield chunk


def call(method: str, path: str, script: Script | None = None, catalog: Catalog | None = None,
         settings: Settings | None = None, **kwargs: Any) -> httpx.Response:
    dispatcher = StubDispatcher(script or (lambda: tokens("a", "b")))
    app = FrontendApp(dispatcher, catalog or catalog_of(reg(ENTRY, 1)), Tokenizers(), settings or Settings())  # type: ignore[arg-type]

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://t") as http:
            response = await http.request(method, path, **kwargs)
            await response.aread()
            return response

    return asyncio.run(run())


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "smol", "prompt": [1, 2, 3], "max_tokens": 2, **fields}


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == r.status_code, body
    return dict(body["error"])


def test_a_good_request_is_answered() -> None:
    r = call("POST", "/v1/completions", json=completion())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not valid JSON"), (b"\"\xc3\x28\"", "not valid UTF-8"), (b"[1, 2]", "must be a JSON object"),
])
def test_a_body_that_is_not_a_json_object_is_400(content: bytes, message: str) -> None:
    r = call("POST", "/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["type"] == "BadRequestError" and message in error_of(r)["message"]


def test_a_bad_parameter_is_400_and_named() -> None:
    r = call("POST", "/v1/completions", json=completion(max_tokens="many"))
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"


def test_a_prompt_past_the_context_is_400() -> None:
    catalog = catalog_of(reg(ENTRY, 1, max_len=4))
    r = call("POST", "/v1/completions", catalog=catalog, json=completion(prompt=[1, 2, 3, 4, 5]))
    assert r.status_code == 400 and "maximum context length is 4 tokens" in error_of(r)["message"]


def test_an_unknown_model_is_404_naming_the_served_ones() -> None:
    r = call("POST", "/v1/completions", json=completion(model="gpt-9"))
    error = error_of(r)
    assert r.status_code == 404 and error["param"] == "model" and "Served models: smol" in error["message"]


def test_an_unknown_route_is_404() -> None:
    assert call("GET", "/v1/nothing").status_code == 404


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_is_413(declared: bool) -> None:
    body = json.dumps(completion(prompt="x" * 2000)).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: the limit is counted while reading
        yield body

    r = call("POST", "/v1/completions", settings=Settings(max_request_bytes=1024),
             **({"content": body} if declared else {"content": chunked()}))
    assert r.status_code == 413 and error_of(r)["type"] == "RequestTooLargeError"


@pytest.mark.parametrize(("header", "status"), [
    (None, 401), ("Bearer wrong", 401), ("Basic secret", 401), ("Bearer secret", 200),
])
def test_the_api_key_is_required_when_set(header: str | None, status: int) -> None:
    r = call("POST", "/v1/completions", settings=Settings(api_key="secret"), json=completion(),
             headers={"authorization": header} if header else {})
    assert r.status_code == status
    if status == 401:
        assert error_of(r)["type"] == "AuthenticationError"


@pytest.mark.parametrize("stream", [False, True])
def test_no_worker_to_take_it_is_503_with_retry_after(stream: bool) -> None:
    # The model is known (its kv workers registered) but nothing is a way in: no router is up.
    catalog = catalog_of(reg(KINDS["kv_worker"].component, 1))
    r = call("POST", "/v1/completions", catalog=catalog, json=completion(stream=stream))
    assert (r.status_code, r.headers.get("retry-after")) == (503, "5")
    assert error_of(r)["type"] == "ServiceUnavailableError"


@pytest.mark.parametrize("stream", [False, True])
def test_a_silent_worker_is_504(stream: bool) -> None:
    async def silent() -> AsyncIterator[dict[str, Any]]:
        raise WorkerSilent("vllm instance w: no token for 10 s")
        yield {}

    r = call("POST", "/v1/completions", script=silent, json=completion(stream=stream))
    assert r.status_code == 504 and error_of(r)["type"] == "GatewayTimeoutError"


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_worker_refuses_is_400(stream: bool) -> None:
    async def refused() -> AsyncIterator[dict[str, Any]]:
        raise api_error(Annotated.error("token id 99999 is out of vocabulary", code=ErrorCode.BAD_REQUEST), "w")
        yield {}

    r = call("POST", "/v1/completions", script=refused, json=completion(stream=stream))
    assert r.status_code == 400 and "out of vocabulary" in error_of(r)["message"]


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event() -> None:
    async def broken() -> AsyncIterator[dict[str, Any]]:
        yield {"text": "a", "token_ids": [1]}
        raise StreamBroken(WorkerFailed("vllm instance w: the engine failed"))

    r = call("POST", "/v1/completions", script=broken, json=completion(stream=True))
    assert r.status_code == 200  # already sent with the first token
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == (500, "InternalServerError") and "engine failed" in error["message"]


def test_a_model_whose_way_in_does_not_answer_the_route_is_404(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routes come from the entry kind's row: a kind without /v1/completions is not sent one."""
    from dataclasses import replace

    monkeypatch.setitem(KINDS, "monolith", replace(KINDS["monolith"], routes=("/v1/chat/completions",)))
    r = call("POST", "/v1/completions", json=completion())
    assert r.status_code == 404 and "does not serve /v1/completions" in error_of(r)["message"]
