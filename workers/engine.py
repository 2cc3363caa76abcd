"""vLLM's AsyncLLM built from vLLM's own CLI parser, and the one generate loop every worker uses.

Reusing AsyncEngineArgs.add_cli_args means every `vllm serve` engine flag works on our workers
unchanged; our own flags are added beside them.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from workers.common.protocol import GenerateChunk, GenerateRequest, TokenLogprob
from workers.runtime.annotated import ErrorCode, StreamError
from workers.runtime.serve import serve_prometheus

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


def make_parser(description: str) -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=description)
    AsyncEngineArgs.add_cli_args(parser)
    add_worker_flags(parser)
    return parser


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every engine worker takes beside vLLM's (workers.kinds lists them per kind)."""
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve vLLM's Prometheus metrics (vllm:num_requests_running, ...) on this port")


def engine_args_from(args: argparse.Namespace) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(args)


def build_engine(engine_args: Any, metrics_port: int | None = None, stat_loggers: list[Any] | None = None,
                 health: Callable[[], str | None] | None = None) -> AsyncLLM:
    """The engine, and its Prometheus metrics on `metrics_port` (vLLM's stat loggers fill the default
    registry of this process; `launcher status` and Prometheus read them there) with `/health` beside
    them, answered by `health` (the worker's `WorkerContext.unhealthy`).

    Built in vLLM's OpenAI-server usage context: unset scheduler limits (max-num-batched-tokens,
    max-num-seqs) then default exactly as under `vllm serve` (8,192 batched tokens on an H200, where
    the engine context gives 2,048), so a worker schedules like the server users compare it with."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER,
                                       stat_loggers=stat_loggers)
    if metrics_port is not None:
        serve_prometheus(metrics_port, "vLLM", health)
    return engine


def logprobs_of(token_ids: Any, steps: Any) -> list[TokenLogprob]:
    """vLLM's per-token {token id: Logprob} dicts -> the sampled token's text and logprob, and the top ones."""
    out: list[TokenLogprob] = []
    for token_id, step in zip(token_ids, steps, strict=False):
        chosen = step.get(token_id)
        # vLLM gives the top k by rank, plus the sampled token when it is not among them: leave that one out.
        extra = chosen is not None and (chosen.rank or 0) > len(step) - 1
        top = sorted(((tid, lp) for tid, lp in step.items() if not (extra and tid == token_id)),
                     key=lambda kv: kv[1].rank or 0)
        out.append({
            "token": (chosen.decoded_token if chosen is not None else None) or "",
            "logprob": float(chosen.logprob) if chosen is not None else float("-inf"),
            "top": [[lp.decoded_token or "", float(lp.logprob)] for _, lp in top],
        })
    return out


def registration_of(engine: Any, engine_args: Any) -> dict[str, Any]:
    """What a frontend or router needs to know of an engine worker: model, served name, context, KV blocks."""
    names = engine_args.served_model_name
    served = names[0] if isinstance(names, list) and names else (names or engine_args.model)
    cache = engine.vllm_config.cache_config
    return {
        "model": engine_args.model,
        "block_size": cache.block_size,
        "extra": {"served_model_name": served, "max_model_len": engine.vllm_config.model_config.max_model_len,
                  "num_gpu_blocks": cache.num_gpu_blocks,  # the KV router weighs placements against it
                  "started_at": int(time.time())},
    }


class EngineHandler:
    """Turns GenerateRequest dicts into engine calls and RequestOutputs into GenerateChunk deltas."""

    def __init__(self, engine: AsyncLLM, worker_name: str = "", on_engine_dead: Callable[[], None] | None = None
                 ) -> None:
        self.engine = engine
        self.worker_name = worker_name
        self.on_engine_dead = on_engine_dead  # the worker fails at once instead of at the watchdog's next look
        self._tokenizer: Any = None

    async def tokenizer(self) -> Any:
        if self._tokenizer is None:
            tok = self.engine.get_tokenizer()  # a coroutine in some vLLM releases, a plain call in others
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok
        return self._tokenizer

    async def prompt_of(self, req: GenerateRequest) -> Any:
        from vllm.inputs import TokensPrompt

        if req.token_ids is not None:
            return TokensPrompt(prompt_token_ids=req.token_ids)
        if req.messages is not None:
            tok = await self.tokenizer()
            ids = tok.apply_chat_template(req.messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return TokensPrompt(prompt_token_ids=list(ids))
        return req.prompt

    def sampling_params(self, req: GenerateRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:
            params = SamplingParams(**req.sampling)
        except (TypeError, ValueError) as exc:  # vLLM's own check of the values: the caller's mistake
            raise StreamError(f"invalid sampling parameters: {exc}", ErrorCode.BAD_REQUEST) from None
        params.output_kind = RequestOutputKind.DELTA
        if req.kv_transfer_params is not None:
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": req.kv_transfer_params}
        return params

    async def generate(self, raw: dict[str, Any]) -> AsyncIterator[GenerateChunk]:
        """The engine's outputs as chunks; a dead engine is the typed `engine_dead` error (the caller
        continues the stream elsewhere) and tells the worker to go."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for chunk in self._generate(raw):
                yield chunk
        except VLLMClientError as exc:  # vLLM's own verdict that the request is at fault (a 4xx there too)
            raise StreamError(str(exc), ErrorCode.BAD_REQUEST) from None
        except EngineDeadError:
            if self.on_engine_dead is not None:
                self.on_engine_dead()
            raise StreamError(f"the vLLM engine of {self.worker_name or 'this worker'} died",
                              ErrorCode.ENGINE_DEAD) from None

    async def _generate(self, raw: dict[str, Any]) -> AsyncIterator[GenerateChunk]:
        req = GenerateRequest.model_validate(raw)
        prompt = await self.prompt_of(req)
        params = self.sampling_params(req)
        request_id = req.request_id
        finished = False
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                completion = out.outputs[0]
                chunk: GenerateChunk = {"text": completion.text, "token_ids": list(completion.token_ids)}
                if completion.logprobs:
                    chunk["logprobs"] = logprobs_of(completion.token_ids, completion.logprobs)
                if out.finished:
                    finished = True
                    chunk["finish_reason"] = completion.finish_reason
                    chunk["stop_reason"] = completion.stop_reason
                    chunk["prompt_tokens"] = len(out.prompt_token_ids or [])
                    chunk["cached_tokens"] = out.num_cached_tokens
                    chunk["kv_transfer_params"] = out.kv_transfer_params
                    chunk["worker"] = self.worker_name
                yield chunk
        finally:
            if not finished and not self.engine.errored:
                # The client went away or the worker is stopping: free the engine's slot now.
                await self.engine.abort(request_id)
