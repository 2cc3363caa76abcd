"""Send one request to an instance of the model's entry component and stream its chunks back.

Instances are picked by fewest requests this frontend has in flight on them (ties in turn), so load
spreads over monolith instances; a router or decode instance is picked the same way and decides the
rest itself. A failure before the first token (a dead worker: NATS no-responders; no ack; silence)
is retried on another instance, up to `retries` times; after the first token the stream migrates
(`Dispatcher`), up to `migration_limit` times. The decision is made on the typed error code, never
on the message.

A router hands the request off to the worker it chose (requestplane.Handoff), and the worker streams
here directly. When that worker is lost, the router is not at fault: the request goes to a router again
(the same one, if it is the only one) with the lost workers in `avoid`, which it passes over.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.errors import ApiError, BadRequest, NoWorker, WorkerFailed, WorkerSilent
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated, ErrorCode, instance_lost
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
    if code in (ErrorCode.NO_RESPONDERS, ErrorCode.SHUTTING_DOWN, ErrorCode.WORKER_LOST, ErrorCode.ENGINE_DEAD,
                ErrorCode.MESSAGES_LOST):
        return NoWorker(f"no instance of {where} could take the request: {text}")
    if code in (ErrorCode.NO_ANSWER, ErrorCode.SILENT):
        return WorkerSilent(f"{where}: {text}")
    return WorkerFailed(f"{where}: {text}")


def migratable(payload: dict[str, Any]) -> bool:
    """Structured output is not continued elsewhere (as in Dynamo): the grammar's state after the
    tokens so far cannot be handed to another engine, so a continuation could break the format."""
    sampling = payload.get("sampling") or {}
    return not any(sampling.get(k) for k in ("structured_outputs", "guided_decoding"))


def continuation(payload: dict[str, Any], generated: list[int], migration: int) -> dict[str, Any]:
    """The request that continues a stream elsewhere: the prompt plus the tokens already sent, with
    `max_tokens` (and `min_tokens`) reduced by them, under a request id of its own."""
    sampling = dict(payload.get("sampling") or {})
    for key in ("max_tokens", "min_tokens"):
        if isinstance(sampling.get(key), int):
            sampling[key] = max(0, sampling[key] - len(generated))
    return {**payload, "request_id": f"{payload.get('request_id')}-m{migration}",
            "token_ids": [*payload["token_ids"], *generated], "sampling": sampling}


class Dispatcher:
    """Picks instances, retries before the first token, migrates after it.

    A stream whose instance is lost (its registration deleted, it drained, it went silent, its engine
    died: the codes of `annotated.RETRYABLE`) after tokens were sent is continued on another instance,
    at most `migration_limit` times: the prompt and the tokens so far are sent again and `max_tokens`
    is reduced by them, so at temperature 0 the client's stream is the one it would have had."""

    def __init__(self, nc: requestplane.NATS, catalog: Catalog, timeout: float, retries: int,
                 migration_limit: int = 3) -> None:
        self.nc = nc
        self.catalog = catalog
        self.timeout = timeout
        self.retries = retries
        self.migration_limit = migration_limit
        self.inflight: defaultdict[int, int] = defaultdict(int)
        self.streams = requestplane.StreamTracker()
        catalog.on_delete.append(self._instance_gone)
        self._turn = 0
        self.retried = 0
        self.migrated = 0
        self.on_resend: Callable[[bool], None] = lambda migrated: None  # the metrics' hook (True: a migration)

    def _instance_gone(self, reg: Registration) -> None:
        if n := self.streams.lost(reg.instance, f"{reg.process or reg.component} unregistered"):
            log.warning("%s (%x) is gone with %d stream(s) in flight", reg.process or reg.component, reg.instance, n)

    def pick(self, route: ModelRoute, exclude: set[int]) -> Registration | None:
        candidates = [r for r in route.instances if r.instance not in exclude]
        if not candidates:
            return None
        least = min(self.inflight[r.instance] for r in candidates)
        tied = [r for r in candidates if self.inflight[r.instance] == least]
        self._turn += 1
        return tied[self._turn % len(tied)]

    async def _instance_within(self, model: str, seconds: float) -> bool:
        """Whether an instance serves `model` within `seconds` (woken by the catalog's changes)."""
        deadline = time.monotonic() + seconds
        while True:
            route = self.catalog.serving().get(model)
            if route is not None and route.instances:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.catalog.next_change(min(left, 0.5))

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The worker's chunks (text, token_ids, and the final one's counts); raises ApiError before the
        first chunk and StreamBroken after it."""
        tried: set[int] = set()
        avoid: set[int] = set()  # workers a router handed this request to that were lost
        last: ApiError | None = None
        generated: list[int] = []
        retries = migrations = 0
        waited = False
        request = payload
        while True:
            route = self.catalog.serving().get(model)
            # Prefer an instance not tried yet; mid-stream, any (a lone instance's stream must go on somewhere).
            inst = None if route is None else (self.pick(route, tried) or (self.pick(route, set()) if generated
                                                                             else None))
            if route is None or inst is None:
                if generated and last is not None and not waited:
                    # Mid-stream, and every instance is gone (a lone monolith being restarted): the client
                    # cannot ask again without repeating what it has, so wait a request_timeout for one.
                    waited = True
                    if await self._instance_within(model, self.timeout):
                        continue
                if last is not None:
                    raise StreamBroken(last) if generated else last
                raise NoWorker(f"no worker serves model '{model}' right now (starting, or down): retry shortly")
            where = f"{route.component} instance {inst.process or f'{inst.instance:x}'}"
            if last is not None:  # counted when sent again, as before
                if generated:
                    self.migrated += 1
                else:
                    self.retried += 1
                self.on_resend(bool(generated))
                log.warning("request %s: %s; %s on %s", payload.get("request_id"), last.message,
                            f"continuing after {len(generated)} token(s)" if generated else "trying again", where)
            self.inflight[inst.instance] += 1
            failure: Annotated | None = None
            handed: list[dict[str, Any]] = []
            if avoid:
                request = {**request, "avoid": sorted(avoid)}
            try:
                async for item in requestplane.stream(self.nc, inst.instance_subject, request, self.timeout,
                                                      self.streams, inst.instance, on_handoff=handed.append):
                    if item.is_error():
                        failure = item
                        break
                    data = item.data or {}
                    generated += data.get("token_ids") or ()
                    yield data
            finally:
                self.inflight[inst.instance] -= 1
                if not self.inflight[inst.instance]:
                    del self.inflight[inst.instance]
            if failure is None:
                return
            if handed:  # the worker it went to failed, not the router that chose it
                to = handed[-1]
                where = f"{where}, worker {(to.get('routing') or {}).get('process') or to['instance']}"
                avoid.add(to["instance"])
            else:
                tried.add(inst.instance)
            error = api_error(failure, where)
            if not instance_lost(failure.code):
                raise StreamBroken(error) if generated else error
            if generated:
                if migrations >= self.migration_limit or not migratable(payload):
                    raise StreamBroken(error)
                migrations += 1
                request = continuation(payload, generated, migrations)
            else:
                if retries >= self.retries:
                    raise error
                retries += 1
            last = error
