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

from workers.common.protocol import GenerateChunk, GenerateRequest, LogprobRows
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
                  "started_at": int(time.time()), "model_config": model_config_of(engine_args)},
    }


# The engine arguments that shape vLLM's OpenAI layer as `vllm serve` builds it (tokenizer, context,
# generation defaults, logprob limits, and `stream_interval`: tokens per streamed chunk, which vLLM applies
# in the API process's output processor, the frontend's here, not in the engine). A frontend builds its
# renderer and output processor from these, so what it validates, renders and streams is what this worker's
# engine would under `vllm serve` (the max_model_len it registers is the resolved one).
MODEL_CONFIG_FIELDS = ("model", "tokenizer", "tokenizer_mode", "trust_remote_code", "revision", "tokenizer_revision",
                       "hf_config_path", "hf_overrides", "served_model_name", "generation_config",
                       "override_generation_config", "max_logprobs", "logprobs_mode", "skip_tokenizer_init",
                       "enable_prompt_embeds", "config_format", "load_format", "seed", "stream_interval")


def model_config_of(engine_args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MODEL_CONFIG_FIELDS:
        value = getattr(engine_args, name, None)
        if value is None or isinstance(value, (str, int, float, bool, list, dict)):
            out[name] = value
        else:  # an enum or config object: its value, as the CLI would give it
            out[name] = getattr(value, "value", str(value))
    return out


class OutputTap:
    """The engine core's own outputs (EngineCoreOutput: new token ids, logprob rows by token id, finish
    reason, prefill stats) of the requests that asked for tokens, copied as AsyncLLM's output handler
    hands them to its OutputProcessor.

    A request still goes through `AsyncLLM.generate` (so aborts, vLLM's metrics and per-request stats stay
    as they are); its RequestOutputs only say when to send what the tap collected. Relies on vLLM internals
    (v0.32): `AsyncLLM.output_processor.process_outputs(outputs, ...)`, `OutputProcessor.request_states`
    and `RequestState.external_req_id`."""

    def __init__(self, engine: Any) -> None:
        self.sinks: dict[str, list[GenerateChunk]] = {}
        processor = engine.output_processor
        states = processor.request_states
        original = processor.process_outputs
        sinks = self.sinks

        def process_outputs(outputs: Any, *args: Any, **kwargs: Any) -> Any:
            if sinks:
                for out in outputs:
                    state = states.get(out.request_id)
                    sink = sinks.get(state.external_req_id) if state is not None else None
                    if sink is not None:
                        # Read now: the output processor hands `new_token_ids` on to the RequestOutput,
                        # whose collector extends that very list when its reader lags behind.
                        sink.append(step_of(out))
            return original(outputs, *args, **kwargs)

        processor.process_outputs = process_outputs

    def open(self, request_id: str) -> list[GenerateChunk]:
        sink: list[GenerateChunk] = []
        self.sinks[request_id] = sink
        return sink

    def close(self, request_id: str) -> None:
        self.sinks.pop(request_id, None)


def rows_of(ids: Any, logprobs: Any, ranks: Any) -> LogprobRows:
    return {"ids": ids.tolist(), "logprobs": logprobs.tolist(), "ranks": ranks.tolist()}


def step_of(o: Any) -> GenerateChunk:
    """One EngineCoreOutput as a chunk (copied out of vLLM's objects)."""
    step: GenerateChunk = {"token_ids": list(o.new_token_ids)}
    if o.new_logprobs is not None:
        step["lp"] = rows_of(*o.new_logprobs[:3])
    if o.new_prompt_logprobs_tensors is not None:
        step["plp"] = [rows_of(*o.new_prompt_logprobs_tensors[:3])]
    if o.prefill_stats is not None:
        step["cached_tokens"] = o.prefill_stats.num_cached_tokens
    if o.finish_reason is not None:
        step["finish_reason"] = o.finish_reason.name.lower()
        step["stop_reason"] = o.stop_reason
    return step


def tokens_chunk(steps: list[GenerateChunk]) -> GenerateChunk:
    """The steps of one request since the last chunk, merged into one (the rows of each kind concatenated)."""
    if len(steps) == 1:
        return steps[0]
    chunk: GenerateChunk = {"token_ids": [t for step in steps for t in step.get("token_ids", ())]}
    lp: LogprobRows | None = None
    for step in steps:
        if "lp" in step:
            rows = step["lp"]
            if lp is None:
                lp = {"ids": list(rows["ids"]), "logprobs": list(rows["logprobs"]), "ranks": list(rows["ranks"])}
            else:
                lp["ids"] += rows["ids"]
                lp["logprobs"] += rows["logprobs"]
                lp["ranks"] += rows["ranks"]
        if "plp" in step:
            chunk.setdefault("plp", []).extend(step["plp"])
        if "cached_tokens" in step and "cached_tokens" not in chunk:
            chunk["cached_tokens"] = step["cached_tokens"]
        if "finish_reason" in step:
            chunk["finish_reason"] = step["finish_reason"]
            chunk["stop_reason"] = step.get("stop_reason")
    if lp is not None:
        chunk["lp"] = lp
    return chunk


class EngineHandler:
    """Turns GenerateRequest dicts into engine calls: token ids and SamplingParams in, the engine core's
    outputs out (`output: "tokens"`, the frontend), or text chunks for the seed's client."""

    def __init__(self, engine: AsyncLLM, worker_name: str = "", on_engine_dead: Callable[[], None] | None = None
                 ) -> None:
        self.engine = engine
        self.worker_name = worker_name
        self.on_engine_dead = on_engine_dead  # the worker fails at once instead of at the watchdog's next look
        self._tokenizer: Any = None
        self.tap = OutputTap(engine)

    async def tokenizer(self) -> Any:
        if self._tokenizer is None:
            tok = self.engine.get_tokenizer()  # a coroutine in some vLLM releases, a plain call in others
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok
        return self._tokenizer

    async def prompt_of(self, req: GenerateRequest) -> Any:
        from vllm.inputs import TokensPrompt

        if req.token_ids is not None:
            prompt = TokensPrompt(prompt_token_ids=req.token_ids)
            if req.cache_salt is not None:
                prompt["cache_salt"] = req.cache_salt
            return prompt
        if req.messages is not None:  # the seed client's chat: the only place a worker applies a template
            tok = await self.tokenizer()
            ids = tok.apply_chat_template(req.messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return TokensPrompt(prompt_token_ids=list(ids))
        return req.prompt

    def sampling_params(self, req: GenerateRequest) -> Any:
        import msgspec
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:
            if req.output == "tokens":  # vLLM's own SamplingParams, as the frontend's renderer made them
                params = msgspec.convert(req.sampling, SamplingParams, strict=False)  # JSON keys: logit_bias ids
                # Text is the frontend's: it detokenizes and checks stop strings (and aborts us on one).
                params.detokenize = False
                params.stop = []
            else:
                params = SamplingParams(**req.sampling)
        except (TypeError, ValueError, msgspec.ValidationError) as exc:  # vLLM's own check: the caller's mistake
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
        if req.avoid:
            raise StreamError("`avoid` names instances for a router to pass over; this is an engine worker, which "
                              "serves what it is sent", ErrorCode.BAD_REQUEST)
        prompt = await self.prompt_of(req)
        params = self.sampling_params(req)
        request_id = req.request_id
        tokens = req.output == "tokens"
        sink = self.tap.open(request_id) if tokens else None
        finished = False
        try:
            async for out in self.engine.generate(prompt, params, request_id, priority=req.priority):
                completion = out.outputs[0]
                chunk: GenerateChunk
                if sink is not None:
                    chunk = tokens_chunk(sink)
                    sink.clear()
                else:
                    chunk = {"text": completion.text, "token_ids": list(completion.token_ids)}
                if out.finished:
                    finished = True
                    if sink is None:
                        chunk["finish_reason"] = completion.finish_reason
                        chunk["stop_reason"] = completion.stop_reason
                    chunk["prompt_tokens"] = len(out.prompt_token_ids or [])
                    chunk["cached_tokens"] = out.num_cached_tokens
                    chunk["kv_transfer_params"] = out.kv_transfer_params
                    chunk["worker"] = self.worker_name
                yield chunk
        finally:
            if tokens:
                self.tap.close(request_id)
            if not finished and not self.engine.errored:
                # The client went away or the worker is stopping: free the engine's slot now.
                await self.engine.abort(request_id)
