"""The OpenAI-compatible HTTP API (Starlette): chat and text completions, models, health, metrics.

Responses match vLLM's OpenAI server field by field where it has the field: ids `chatcmpl-...` /
`cmpl-...`, `object`, `created`, `choices[].finish_reason` / `stop_reason`, `usage` with
`prompt_tokens_details.cached_tokens` when the worker knows it, SSE chunks ending in `data: [DONE]`,
the usage chunk (`choices: []`) with `stream_options.include_usage`.

A client that goes away (stream or not) cancels its generation: the task reading the worker's stream
is cancelled, and the request plane tells the worker, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.dispatch import Dispatcher, StreamBroken
from workers.frontend.errors import ApiError, BadRequest, BodyTooLarge, ModelNotFound, NotFound, NoWorker, Unauthorized
from workers.frontend.metrics import FrontendMetrics
from workers.frontend.protocol import ChatCompletionRequest, CompletionRequest, Endpoint
from workers.frontend.tokens import Tokenizers

log = logging.getLogger(__name__)

_json = msgspec.json.Encoder().encode


@dataclass
class Settings:
    api_key: str | None = None
    max_request_bytes: int = 1 << 20


@dataclass
class Prepared:
    """A validated request, tokenized, ready to send."""

    endpoint: Endpoint
    body: ChatCompletionRequest | CompletionRequest
    route: ModelRoute
    prompt_ids: list[int]
    payload: dict[str, Any]
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Outcome:
    """What the whole generation produced, for non-streaming answers, usage and metrics."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cached_tokens: int | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)


_DONE = object()
_GONE = object()


class ClientGone(Exception):
    pass


class FrontendApp:
    def __init__(self, dispatcher: Dispatcher, catalog: Catalog, tokenizers: Tokenizers, settings: Settings,
                 metrics: FrontendMetrics | None = None) -> None:
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.tokenizers = tokenizers
        self.settings = settings
        self.metrics = metrics or FrontendMetrics()
        self._retried_seen = 0
        self._migrated_seen = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/live", self.live, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ], exception_handlers={ApiError: self._api_error, HTTPException: self._http_error})

    # ---- plumbing -------------------------------------------------------------------------------
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = NotFound if exc.status_code == 404 else BadRequest
        err = kind(f"{request.method} {request.url.path}: {exc.detail}")
        err.status = exc.status_code
        return JSONResponse(err.body(), status_code=exc.status_code)

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized("a valid API key is required: send `Authorization: Bearer <key>`")

    async def _read_json(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the request body is {int(declared)} bytes; the limit is {limit} bytes")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
        except ClientDisconnect:
            raise ClientGone() from None
        try:
            data = json.loads(bytes(body))
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc.msg} (line {exc.lineno} column "
                             f"{exc.colno})") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        return data

    def _parse(self, model: type[BaseModel], data: dict[str, Any]) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise BadRequest(f"{param}: {first['msg']}{more}", param=param) from None

    def _route(self, model: str, path: str) -> ModelRoute:
        routes = self.catalog.routes()
        route = routes.get(model)
        if route is None:
            served = ", ".join(sorted(self.catalog.serving())) or "none right now"
            raise ModelNotFound(f"The model `{model}` does not exist. Served models: {served}", param="model")
        if not route.instances:
            raise NoWorker(f"no worker serves model '{model}' right now (starting, or down): retry shortly")
        if path not in route.api_routes:  # its way in is a kind that does not answer this route
            raise NotFound(f"model `{model}` does not serve {path} (it serves {', '.join(route.api_routes)})")
        return route

    # ---- generation -------------------------------------------------------------------------------
    async def _prepare(self, request: Request, endpoint: Endpoint) -> Prepared:
        self._authorize(request)
        data = await self._read_json(request)
        schema = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
        body: ChatCompletionRequest | CompletionRequest = self._parse(schema, data)
        body.check_supported()
        route = self._route(body.model, request.url.path)
        if isinstance(body, ChatCompletionRequest):
            try:
                ids = await self.tokenizers.chat(route.path, body.template_messages(), body.add_generation_prompt)
            except ApiError:
                raise
            except Exception as exc:  # the model's chat template refused the messages (roles, order)
                raise BadRequest(f"messages: the chat template refused them: {exc}", param="messages") from None
        else:
            prompt = body.single_prompt()
            ids = prompt if isinstance(prompt, list) else await self.tokenizers.encode(route.path, prompt)
        max_tokens = self._max_tokens(body, route, len(ids))
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        payload = {"request_id": request_id, "token_ids": ids, "sampling": body.sampling(max_tokens)}
        return Prepared(endpoint, body, route, ids, payload, request_id)

    @staticmethod
    def _max_tokens(body: ChatCompletionRequest | CompletionRequest, route: ModelRoute, prompt_len: int) -> int:
        limit = route.max_model_len
        asked = body.requested_max_tokens()
        if limit is None:
            return asked or 16
        if prompt_len >= limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens. However, your prompt is "
                             f"{prompt_len} tokens. Please reduce the length of the prompt.", param="messages"
                             if isinstance(body, ChatCompletionRequest) else "prompt")
        if asked is None:
            return limit - prompt_len
        if prompt_len + asked > limit:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise BadRequest(f"This model's maximum context length is {limit} tokens. However, you requested "
                             f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the "
                             f"completion). Please reduce the prompt or {param}.", param=param)
        return asked

    async def _chunks(self, request: Request, prep: Prepared) -> AsyncGenerator[dict[str, Any], None]:
        """The worker's chunks; if the client disconnects, the generation is cancelled (and the worker
        told) and ClientGone is raised."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        gen = self.dispatcher.generate(prep.body.model, prep.payload)

        async def produce() -> None:
            try:
                async for chunk in gen:
                    queue.put_nowait(chunk)
                queue.put_nowait(_DONE)
            except Exception as exc:  # delivered to the reader, which raises it
                queue.put_nowait(exc)

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            producer.cancel()  # at once, even if nobody reads the queue any more
            queue.put_nowait(_GONE)

        producer = asyncio.create_task(produce())
        watcher = asyncio.create_task(watch())
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if item is _GONE:
                    raise ClientGone()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            watcher.cancel()
            producer.cancel()  # stops reading the worker's stream, which then sends the cancel
            self._count_retries()

    def _count_retries(self) -> None:
        retried, migrated = self.dispatcher.retried, self.dispatcher.migrated
        if retried > self._retried_seen:
            self.metrics.retries.inc(retried - self._retried_seen)
            self._retried_seen = retried
        if migrated > self._migrated_seen:
            self.metrics.migrations.inc(migrated - self._migrated_seen)
            self._migrated_seen = migrated

    def _usage(self, prep: Prepared, out: Outcome) -> dict[str, Any]:
        prompt = len(prep.prompt_ids)
        usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + out.completion_tokens,
                                 "completion_tokens": out.completion_tokens, "prompt_tokens_details": None}
        if out.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": out.cached_tokens}
        return usage

    @staticmethod
    def _absorb(out: Outcome, chunk: dict[str, Any]) -> None:
        out.text += chunk.get("text") or ""
        out.token_ids += chunk.get("token_ids") or ()
        out.completion_tokens += len(chunk.get("token_ids") or ())
        if chunk.get("logprobs"):
            out.logprobs.extend(chunk["logprobs"])
        if "finish_reason" in chunk:
            out.finish_reason = chunk.get("finish_reason")
            out.stop_reason = chunk.get("stop_reason")
            cached = chunk.get("cached_tokens")
            out.cached_tokens = int(cached) if isinstance(cached, int) else None

    def _logprobs(self, prep: Prepared, entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any] | None:
        if not entries:
            return None
        if prep.endpoint == "chat":
            return {"content": [{
                "token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in e["top"]],
            } for e in entries]}
        offsets, pos = [], offset
        for e in entries:
            offsets.append(pos)
            pos += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t: lp for t, lp in e["top"]} for e in entries], "text_offset": offsets}

    def _choice(self, prep: Prepared, text: str, finish: str | None, stop_reason: Any,
                logprobs: dict[str, Any] | None, stream: bool) -> dict[str, Any]:
        if prep.endpoint == "chat":
            if stream:
                return {"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish,
                        "stop_reason": stop_reason}
            return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None,
                                            "tool_calls": [], "reasoning_content": None},
                    "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason,
                "prompt_logprobs": None}

    def _envelope(self, prep: Prepared, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if prep.endpoint == "chat" \
            else "text_completion"
        return {"id": prep.request_id, "object": obj, "created": prep.created, "model": prep.body.model,
                "choices": choices}

    async def _serve(self, request: Request, endpoint: Endpoint) -> Response:
        started = time.perf_counter()
        model = "?"
        stream = False
        try:
            prep = await self._prepare(request, endpoint)
        except ApiError as exc:
            self.metrics.requests.labels(endpoint, model, "unknown", str(exc.status)).inc()
            raise
        except ClientGone:
            return Response(status_code=499)
        model, stream = prep.body.model, prep.body.stream
        self.metrics.input_tokens.labels(model).inc(len(prep.prompt_ids))
        if stream:
            return await self._stream(request, prep, started)
        inflight = self.metrics.inflight.labels(model)
        inflight.inc()
        status = "200"
        out = Outcome()
        try:
            first = True
            async for chunk in self._chunks(request, prep):
                if first and chunk.get("token_ids"):
                    self.metrics.ttft.labels(model).observe(time.perf_counter() - started)
                    first = False
                self._absorb(out, chunk)
        except StreamBroken as exc:
            status = str(exc.error.status)
            raise exc.error from None
        except ApiError as exc:
            status = str(exc.status)
            raise
        except ClientGone:
            status = "499"
            self.metrics.cancelled.labels(model).inc()
            return Response(status_code=499)
        finally:
            inflight.dec()
            self.metrics.requests.labels(endpoint, model, "unary", status).inc()
            self.metrics.output_tokens.labels(model).inc(out.completion_tokens)
            self.metrics.duration.labels(model).observe(time.perf_counter() - started)
        choice = self._choice(prep, out.text, out.finish_reason, out.stop_reason, self._logprobs(prep, out.logprobs),
                              stream=False)
        if prep.body.return_token_ids:
            choice.update(token_ids=out.token_ids, prompt_token_ids=prep.prompt_ids)
        body = self._envelope(prep, [choice], stream=False)
        body["usage"] = self._usage(prep, out)
        if prep.endpoint == "chat":
            body.update(system_fingerprint=None, prompt_logprobs=None, kv_transfer_params=None)
        return Response(_json(body), media_type="application/json", headers={"X-Request-Id": prep.request_id})

    async def _stream(self, request: Request, prep: Prepared, started: float) -> Response:
        """Wait for the first chunk before answering 200: until then a failure (no worker, a silent one,
        a bad request the worker refused) is still an HTTP status a client can act on."""
        model = prep.body.model
        inflight = self.metrics.inflight.labels(model)
        inflight.inc()
        chunks = self._chunks(request, prep)
        try:
            first = await anext(chunks, None)
        except (ApiError, ClientGone) as exc:
            inflight.dec()
            await chunks.aclose()
            status = str(exc.status) if isinstance(exc, ApiError) else "499"
            self.metrics.requests.labels(prep.endpoint, model, "stream", status).inc()
            if isinstance(exc, ApiError):
                raise
            self.metrics.cancelled.labels(model).inc()
            return Response(status_code=499)
        return StreamingResponse(self._sse(prep, started, first, chunks, inflight), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": prep.request_id})

    @staticmethod
    async def _after(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
                     ) -> AsyncIterator[dict[str, Any]]:
        if first is not None:
            yield first
            async for chunk in rest:
                yield chunk

    async def _sse(self, prep: Prepared, started: float, first_chunk: dict[str, Any] | None,
                   chunks: AsyncGenerator[dict[str, Any], None], inflight: Any) -> AsyncIterator[bytes]:
        model = prep.body.model
        status = "200"
        out = Outcome()
        last_token_at: float | None = None
        continuous = prep.body.continuous_usage
        sent_prompt_ids = False

        def event(obj: dict[str, Any]) -> bytes:
            return b"data: " + _json(obj) + b"\n\n"

        try:
            if prep.endpoint == "chat":
                first = self._envelope(prep, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}], stream=True)
                yield event(first)
            async for chunk in self._after(first_chunk, chunks):
                before = len(out.text)
                n_logprobs = len(out.logprobs)
                self._absorb(out, chunk)
                n = len(chunk.get("token_ids") or ())
                now = time.perf_counter()
                if n:
                    if last_token_at is None:
                        self.metrics.ttft.labels(model).observe(now - started)
                    else:
                        per_token = (now - last_token_at) / n
                        for _ in range(n):
                            self.metrics.itl.labels(model).observe(per_token)
                    last_token_at = now
                finish = chunk.get("finish_reason") if "finish_reason" in chunk else None
                text = out.text[before:]
                if not text and not n and finish is None:
                    continue
                logprobs = self._logprobs(prep, out.logprobs[n_logprobs:], before)
                choice = self._choice(prep, text, finish, chunk.get("stop_reason") if finish else None, logprobs,
                                      stream=True)
                if prep.body.return_token_ids:  # as vLLM: the delta's ids, the prompt's in the first chunk only
                    choice["token_ids"] = out.token_ids[len(out.token_ids) - n:]
                    if not sent_prompt_ids:
                        choice["prompt_token_ids"], sent_prompt_ids = prep.prompt_ids, True
                obj = self._envelope(prep, [choice], stream=True)
                if continuous:
                    obj["usage"] = self._usage(prep, out)
                yield event(obj)
            if prep.body.include_usage:
                final = self._envelope(prep, [], stream=True)
                final["usage"] = self._usage(prep, out)
                yield event(final)
            yield b"data: [DONE]\n\n"
        except (StreamBroken, ApiError) as exc:
            error = exc.error if isinstance(exc, StreamBroken) else exc
            status = str(error.status)
            yield event(error.body())
            yield b"data: [DONE]\n\n"
        except ClientGone:  # nobody to tell: end the body quietly (the worker was told by _chunks)
            status = "499"
            self.metrics.cancelled.labels(model).inc()
        except (asyncio.CancelledError, OSError):  # the server noticed the disconnect first
            status = "499"
            self.metrics.cancelled.labels(model).inc()
            raise
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()
            inflight.dec()
            self.metrics.requests.labels(prep.endpoint, model, "stream", status).inc()
            self.metrics.output_tokens.labels(model).inc(out.completion_tokens)
            self.metrics.duration.labels(model).observe(time.perf_counter() - started)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions")

    # ---- the rest ---------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        data: list[dict[str, Any]] = [
            {"id": name, "object": "model", "created": route.created, "owned_by": "vllm", "root": route.path,
             "parent": None, "max_model_len": route.max_model_len, "permission": []}
            for name, route in sorted(self.catalog.serving().items())]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        serving = self.catalog.serving()
        if serving:
            return Response(status_code=200)
        return JSONResponse(NoWorker("no worker serves any model yet").body(), status_code=503,
                            headers={"Retry-After": str(NoWorker.retry_after)})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)
