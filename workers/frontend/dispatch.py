"""Send one request to an instance of the model's entry component and stream its chunks back.

Instances are picked by fewest requests this frontend has in flight on them (ties in turn), so load
spreads over monolith instances; a router or decode instance is picked the same way and decides the
rest itself. A failure before the first token (a dead worker: NATS no-responders; no ack; silence)
is retried on another instance, up to `retries` times; after the first token the error ends the
stream. The decision is made on the typed error code, never on the message.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.errors import ApiError, BadRequest, NoWorker, WorkerFailed, WorkerSilent
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated, ErrorCode, retryable
from workers.runtime.registry import Registration

log = logging.getLogger(__name__)


class StreamBroken(Exception):
    """The worker failed after tokens were sent: the HTTP stream ends with an error event."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def api_error(item: Annotated, where: str) -> ApiError:
    """A worker's typed error as the HTTP error a client expects."""
    text = "; ".join(item.comment) or "the worker failed without a message"
    code = item.code
    if code == ErrorCode.BAD_REQUEST:
        return BadRequest(text)
    if code in (ErrorCode.NO_RESPONDERS, ErrorCode.SHUTTING_DOWN):
        return NoWorker(f"no instance of {where} could take the request: {text}")
    if code in (ErrorCode.NO_ANSWER, ErrorCode.SILENT):
        return WorkerSilent(f"{where}: {text}")
    return WorkerFailed(f"{where}: {text}")


class Dispatcher:
    def __init__(self, nc: requestplane.NATS, catalog: Catalog, timeout: float, retries: int) -> None:
        self.nc = nc
        self.catalog = catalog
        self.timeout = timeout
        self.retries = retries
        self.inflight: defaultdict[int, int] = defaultdict(int)
        self._turn = 0
        self.retried = 0  # read by the metrics

    def pick(self, route: ModelRoute, exclude: set[int]) -> Registration | None:
        candidates = [r for r in route.instances if r.instance not in exclude]
        if not candidates:
            return None
        least = min(self.inflight[r.instance] for r in candidates)
        tied = [r for r in candidates if self.inflight[r.instance] == least]
        self._turn += 1
        return tied[self._turn % len(tied)]

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The worker's chunks (text, token_ids, and the final one's counts); raises ApiError before the
        first chunk and StreamBroken after it."""
        tried: set[int] = set()
        last: ApiError | None = None
        for _ in range(self.retries + 1):
            route = self.catalog.serving().get(model)
            inst = self.pick(route, tried) if route is not None else None
            if route is None or inst is None:
                if last is not None:
                    raise last
                raise NoWorker(f"no worker serves model '{model}' right now (starting, or down): retry shortly")
            where = f"{route.component} instance {inst.process or f'{inst.instance:x}'}"
            if last is not None:
                self.retried += 1
                log.warning("request %s: %s; trying %s", payload.get("request_id"), last.message, where)
            sent = False
            self.inflight[inst.instance] += 1
            try:
                async for item in requestplane.stream(self.nc, inst.instance_subject, payload, self.timeout):
                    if item.is_error():
                        error = api_error(item, where)
                        if sent:
                            raise StreamBroken(error)
                        if not retryable(item.code, tokens_sent=False):
                            raise error
                        last = error
                        break
                    sent = True
                    yield item.data or {}
                else:
                    return
            finally:
                self.inflight[inst.instance] -= 1
                if not self.inflight[inst.instance]:
                    del self.inflight[inst.instance]
            tried.add(inst.instance)
        assert last is not None
        raise last
