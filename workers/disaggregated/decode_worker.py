"""A decode worker: asks a prefill worker to run the prompt, then decodes from the KV it left.

    python -m workers.disaggregated.decode_worker --model DIR_OR_ID \
        --kv-transfer-config '{"kv_connector": "ExampleConnector", "kv_role": "kv_consumer", ...}' [any vLLM flag]

It serves component `decode` (endpoint `generate`), so clients talk to it exactly as to a monolith
(`python -m workers.common.client --component decode`). Per request:

1. pick the prefill instance with the least outstanding work (workers.disaggregated.prefill_pool);
2. send it the same prompt with max_tokens=1 and kv_transfer_params {"do_remote_decode": true};
3. run the request here with the kv_transfer_params the prefill returned, so the connector loads
   the prompt's KV instead of computing it.

If the chosen prefill instance is lost (NATS no-responders, no answer or silence past
--prefill-timeout, shutting down: retryable error codes), another one is tried, at most
--prefill-retries times. If none is registered, none is left, or the error is not one a retry cures,
the prompt is prefilled here and the log says so: a client never waits on a dead prefill worker.
The final chunk names the prefill worker used (`prefill_worker`, "local" for a local prefill) so a
user can see where the prompt ran.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from workers.common.protocol import GenerateRequest
from workers.disaggregated.kvconfig import adapt_argv
from workers.disaggregated.prefill_pool import PrefillInstance, PrefillPool
from workers.disaggregated.prefill_worker import kv_role_of
from workers.disaggregated.shared_storage import SharedStorage
from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser, registration_of
from workers.kinds import KINDS
from workers.runtime import requestplane
from workers.runtime.annotated import ErrorCode, retryable
from workers.runtime.serve import WorkerContext, run_worker, setup_logging
from workers.runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)

DEFAULT_COMPONENT = KINDS["decode"].component
DEFAULT_PREFILL_COMPONENT = KINDS["prefill"].component
DEFAULT_PREFILL_TIMEOUT = 5.0
DEFAULT_PREFILL_RETRIES = 2
LOCAL = "local"


class PrefillFailed(Exception):
    """The remote prefill gave no usable answer; `code` (an ErrorCode) says whether another instance may."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


def prefill_request(req: GenerateRequest) -> dict[str, Any]:
    """The same prompt, one token, and the flag that tells the producer to keep the KV for a remote decode."""
    sampling = {k: v for k, v in req.sampling.items() if k not in ("min_tokens", "n")}
    sampling["max_tokens"] = 1
    remote = req.model_copy(update={
        "request_id": f"{req.request_id}-prefill",
        "sampling": sampling,
        "kv_transfer_params": {"do_remote_decode": True},
    })
    return remote.model_dump(exclude_none=True)


class DisaggregatedHandler:
    """The decode component's `generate`: remote prefill first, local decode after."""

    def __init__(self, nc: requestplane.NATS, engine: EngineHandler, pool: PrefillPool,
                 prefill_timeout: float = DEFAULT_PREFILL_TIMEOUT, storage: SharedStorage | None = None,
                 max_retries: int = DEFAULT_PREFILL_RETRIES) -> None:
        self.nc = nc
        self.max_retries = max_retries
        self.engine = engine
        self.pool = pool
        self.prefill_timeout = prefill_timeout
        self.storage = storage

    async def discard_partial_kv(self, req: GenerateRequest) -> None:
        """Before a local prefill that follows a failed remote one (see workers.disaggregated.shared_storage)."""
        if self.storage is None:
            return
        try:
            prompt = await self.engine.prompt_of(req)
            if isinstance(prompt, dict):
                ids = list(prompt["prompt_token_ids"])
            else:
                ids = list((await self.engine.tokenizer()).encode(prompt))
            self.storage.discard(ids)
        except Exception as exc:  # best effort: never fail the request for it
            log.warning("request %s: could not check the shared KV storage: %s", req.request_id, exc)

    async def remote_prefill(self, inst: PrefillInstance, req: GenerateRequest) -> dict[str, Any]:
        """Run the prefill on `inst`; return its final chunk (kv_transfer_params, worker, counts)."""
        final: dict[str, Any] | None = None
        with self.pool.lease(inst):
            async for item in requestplane.stream(self.nc, inst.subject, prefill_request(req),
                                                  self.prefill_timeout, self.pool.streams, inst.registration.instance):
                if item.is_error():
                    raise PrefillFailed("; ".join(item.comment) or "error without a message", item.code)
                chunk = item.data or {}
                if chunk.get("finish_reason") is not None or "kv_transfer_params" in chunk:
                    final = chunk
        if final is None:
            raise PrefillFailed("the stream ended without a final chunk")
        return final

    async def prefill(self, req: GenerateRequest) -> tuple[dict[str, Any] | None, str]:
        """(kv_transfer_params for the decode, name of the prefill worker or "local")."""
        tried: set[str] = set()
        while True:
            inst = self.pool.pick(exclude=tried)
            if inst is None:
                if tried:
                    log.warning("request %s: no other prefill worker to try; prefilling locally", req.request_id)
                else:
                    log.warning("request %s: no prefill worker registered; prefilling locally", req.request_id)
                return None, LOCAL
            tried.add(inst.key)
            started = time.monotonic()
            try:
                final = await self.remote_prefill(inst, req)
            except (PrefillFailed, OSError, asyncio.TimeoutError) as exc:
                code = exc.code if isinstance(exc, PrefillFailed) else ErrorCode.NO_ANSWER
                if code != ErrorCode.BAD_REQUEST:  # the request's fault, not the instance's
                    self.pool.mark_failed(inst, str(exc))
                await self.discard_partial_kv(req)
                if retryable(code, tokens_sent=False) and len(tried) <= self.max_retries:
                    log.warning("request %s: prefill on %s failed (%s: %s); trying another prefill worker",
                                req.request_id, inst.name, code, exc)
                    continue
                log.warning("request %s: prefill on %s failed (%s: %s); prefilling locally", req.request_id,
                            inst.name, code, exc)
                return None, LOCAL
            log.info("request %s: prefill on %s took %.3f s", req.request_id, inst.name, time.monotonic() - started)
            return final.get("kv_transfer_params"), str(final.get("worker") or inst.name)

    async def generate(self, raw: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = GenerateRequest.model_validate(raw)
        params: dict[str, Any] | None
        if req.kv_transfer_params is not None:
            # The caller already did the prefill (e.g. an external proxy): decode as asked.
            params, prefill_worker = req.kv_transfer_params, "caller"
        else:
            params, prefill_worker = await self.prefill(req)
        decode = req.model_copy(update={"kv_transfer_params": params})
        async for chunk in self.engine.generate(decode.model_dump(exclude_none=True)):
            out: dict[str, Any] = dict(chunk)
            if "finish_reason" in out:
                out["prefill_worker"] = prefill_worker
            yield out


async def serve(args: argparse.Namespace) -> int:
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()  # fail fast on a wrong endpoint, before minutes of model loading
    assert ctx.nc is not None and ctx.registry is not None
    engine_args = engine_args_from(args)
    if engine_args.kv_transfer_config is None:
        raise SystemExit("a decode worker needs --kv-transfer-config (kv_connector, kv_role kv_consumer)")
    pool = PrefillPool(engine_args.model)
    engine = build_engine(engine_args, args.metrics_port, health=ctx.unhealthy)
    ctx.on_shutdown.append(engine.shutdown)
    ctx.watch_engine(engine)
    # Know the prefill workers before taking the first request (they start before decode workers).
    updates = ctx.registry.follow(settings.namespace, args.prefill_component)
    pool.apply(await anext(updates))
    follower = asyncio.create_task(pool.follow(updates))

    def stop_following() -> None:
        follower.cancel()

    ctx.on_shutdown.append(stop_following)
    block_size = engine.vllm_config.cache_config.block_size  # the platform's choice when the flag is absent
    storage = SharedStorage.of(engine_args.kv_transfer_config, block_size)
    engine_handler = EngineHandler(engine, settings.process_name, ctx.engine_died)
    handler = DisaggregatedHandler(ctx.nc, engine_handler, pool, args.prefill_timeout, storage,
                                   max_retries=args.prefill_retries)
    await ctx.serve(args.component, KINDS["decode"].endpoint, handler.generate, **registration_of(engine, engine_args),
                    kv_role=kv_role_of(engine_args))
    log.info("serving %s with %d prefill instance(s) known", args.component, len(pool.instances))
    return await ctx.run_until_stopped()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This kind's flags beside vLLM's (workers.kinds lists them)."""
    parser.add_argument("--component", default=DEFAULT_COMPONENT,
                        help=f"registration component (default: {DEFAULT_COMPONENT})")
    parser.add_argument("--prefill-component", default=DEFAULT_PREFILL_COMPONENT,
                        help=f"component the prefill workers serve (default: {DEFAULT_PREFILL_COMPONENT})")
    parser.add_argument("--prefill-timeout", type=float, default=DEFAULT_PREFILL_TIMEOUT,
                        help="seconds of silence from a prefill worker before prefilling locally "
                             f"(default: {DEFAULT_PREFILL_TIMEOUT})")
    parser.add_argument("--prefill-retries", type=int, default=DEFAULT_PREFILL_RETRIES,
                        help="other prefill workers tried when one is lost, before prefilling locally "
                             f"(default: {DEFAULT_PREFILL_RETRIES})")


def main() -> None:
    setup_logging()
    parser = make_parser(__doc__ or "")
    add_flags(parser)
    run_worker(serve(parser.parse_args(adapt_argv(sys.argv[1:]))))


if __name__ == "__main__":
    main()
