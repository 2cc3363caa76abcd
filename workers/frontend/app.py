"""The frontend's HTTP app: vLLM's own OpenAI server behind the frontend's gate.

The gate (an ASGI layer around vLLM's FastAPI app, `workers.frontend.openai_layer`) does what only a
deployment needs: `/health` (503 while no worker serves), `/live`, `/metrics` (the frontend's
`vllm_launcher_frontend_*`), the API key (`--api-key-env`), the body limit (413), and a 503 with
`Retry-After` while no worker serves. Everything else (every OpenAI route, its validation and its
errors) is vLLM's, so a client gets what `vllm serve` gives it.

A client that goes away (stream or not) cancels its generation: vLLM's server aborts the request, which
cancels the NATS stream, and the request plane tells the worker, which aborts the engine request.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from workers.frontend.catalog import Catalog
from workers.frontend.dispatch import Dispatcher
from workers.frontend.errors import ApiError, BodyTooLarge, NoWorker, Unauthorized
from workers.frontend.metrics import FrontendMetrics
from workers.frontend.model_apps import ModelApps

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes anyone may call without the API key (as `vllm serve --api-key` leaves them open).
OPEN_PATHS = ("/health", "/live", "/metrics", "/ping", "/version")
OWN_PATHS = ("/health", "/live", "/metrics")


@dataclass
class Settings:
    api_key: str | None = None
    max_request_bytes: int = 1 << 20


class Observer:
    """What the remote engine core reports per request, into the frontend's metrics.

    Each metric's child for this model is looked up once: `labels()` costs 10-25 us a call (multiprocess
    mode: a lock and a key built per call), against 6 us for both updates of a token on a held child, and
    this runs for every token of every stream."""

    def __init__(self, metrics: FrontendMetrics, model: str) -> None:
        self.metrics = metrics
        self.model = model

    @functools.cached_property
    def _input_tokens(self) -> Any:
        return self.metrics.input_tokens.labels(self.model)

    @functools.cached_property
    def _output_tokens(self) -> Any:
        return self.metrics.output_tokens.labels(self.model)

    @functools.cached_property
    def _ttft(self) -> Any:
        return self.metrics.ttft.labels(self.model)

    @functools.cached_property
    def _itl(self) -> Any:
        return self.metrics.itl.labels(self.model)

    def prompt(self, n: int) -> None:
        self._input_tokens.inc(n)

    def tokens(self, n: int, ttft: float | None, per_token: float | None) -> None:
        """`n` tokens came: the first ones of their request after `ttft` s, or `per_token` s each after
        the previous ones."""
        self._output_tokens.inc(n)
        if ttft is not None:
            self._ttft.observe(ttft)
        if per_token is not None:
            itl = self._itl
            for _ in range(n):
                itl.observe(per_token)


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _stream_error(first: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
    """(status, body, headers) when a stream's first event is vLLM's error event: nothing was generated,
    so the client gets the status (503 with Retry-After, 504, 400) as a request without `stream` would."""
    if not first.startswith(b"data: {\"error\""):
        return None
    try:
        event = json.loads(first.split(b"\n", 1)[0][len(b"data: "):])
        code = int(event["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None
    headers = [(b"retry-after", str(NoWorker.retry_after).encode())] if code == NoWorker.status else []
    return code, json.dumps(event).encode(), headers


class FrontendApp:
    def __init__(self, dispatcher: Dispatcher, catalog: Catalog, settings: Settings, models: ModelApps,
                 metrics: FrontendMetrics | None = None) -> None:
        self.dispatcher = dispatcher
        self.catalog = catalog
        self.settings = settings
        self.models = models  # vLLM's app per served model, built as each model's workers register
        self.metrics = metrics or FrontendMetrics()
        dispatcher.on_resend = self._count_resend
        self.own = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/live", self.live, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ])
        self.app: ASGIApp = self.asgi

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "http" and scope.get("path") in OWN_PATHS:
            await self.own(scope, receive, send)
        else:
            await self.gate(scope, receive, send)

    # ---- the gate in front of vLLM's app ---------------------------------------------------------
    def _authorized(self, scope: Scope) -> bool:
        key = self.settings.api_key
        if key is None or scope.get("path", "") in OPEN_PATHS:
            return True
        given = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the limit (declared or counted)."""
        limit = self.settings.max_request_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            if len(body) > limit:
                return None
            if not message.get("more_body", False):
                break
        return bytes(body)

    async def gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            any_app = self.models.any_app()
            if any_app is not None:
                await any_app(scope, receive, send)
            return
        if not self._authorized(scope):
            await _send_error(send, Unauthorized("a valid API key is required: send `Authorization: Bearer <key>`"))
            return
        body = await self._body(scope, receive)
        if body is None:
            await _send_error(send, BodyTooLarge(f"the request body is over the limit of "
                                                 f"{self.settings.max_request_bytes} bytes"))
            return
        model, stream = self._model_and_stream(body)
        try:
            if not self.catalog.serving():
                openai = None
            elif scope.get("method") == "POST":  # the model it names, or the deployment's own
                openai = await self.models.for_model(model)
            else:
                openai = await self.models.any_built()
        except ApiError as exc:
            await _send_error(send, exc)
            return
        if openai is None:
            await _send_error(send, NoWorker("no worker serves a model right now (starting, or down): retry shortly"))
            return
        if scope.get("method") == "GET" and scope.get("path") == "/v1/models":  # every model's cards, vLLM's own
            await JSONResponse(await self.models.models_body())(scope, receive, send)
            return
        await self._forward(openai, scope, body, model, stream, receive, send)

    async def _forward(self, openai: ASGIApp, scope: Scope, body: bytes, model: str, stream: bool, receive: Receive,
                       send: Send) -> None:
        started = time.perf_counter()
        endpoint = scope["path"].rsplit("/", 1)[-1] or scope["path"]
        status = 499
        finished = False
        sent_body = False

        async def replay() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect" and not finished:
                self.metrics.cancelled.labels(model).inc()
            return message

        held: Message | None = None  # a stream's 200, until its first event shows it is not an error
        swallow = False

        async def watch(message: Message) -> None:
            nonlocal status, finished, held, swallow
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if stream and status == 200:
                    held = message
                    return
            elif message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    finished = True
                if swallow:  # the rest of a stream that failed before its first token ("data: [DONE]")
                    if finished:
                        await send({"type": "http.response.body", "body": b""})
                    return
                if held is not None:
                    start, held = held, None
                    error = _stream_error(message.get("body", b""))
                    if error is not None:  # failed before the first token: say it as the HTTP status
                        status, swallow = error[0], True
                        await send({"type": "http.response.start", "status": status,
                                    "headers": [(b"content-type", b"application/json"), *error[2]]})
                        await send({"type": "http.response.body", "body": error[1], "more_body": not finished})
                        return
                    await send(start)
            await send(message)

        inflight = self.metrics.inflight.labels(model)
        inflight.inc()
        try:
            await openai(scope, replay, watch)
        finally:
            inflight.dec()
            if scope.get("method") == "POST":
                self.metrics.requests.labels(endpoint, model, "stream" if stream else "unary", str(status)).inc()
                self.metrics.duration.labels(model).observe(time.perf_counter() - started)

    @staticmethod
    def _model_and_stream(body: bytes) -> tuple[str, bool]:
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return "", False
        if not isinstance(data, dict):
            return "", False
        return str(data.get("model") or ""), bool(data.get("stream"))

    # ---- the frontend's own routes ---------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.catalog.serving() and self.models.first.is_set():
            return Response(status_code=200)
        return JSONResponse(NoWorker("no worker serves any model yet").body(), status_code=503,
                            headers={"Retry-After": str(NoWorker.retry_after)})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    def _count_resend(self, migrated: bool) -> None:
        """Counted when it happens (not when /metrics is read: another process of the group may answer that)."""
        (self.metrics.migrations if migrated else self.metrics.retries).inc()

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
