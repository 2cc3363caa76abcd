"""vLLM's AsyncLLM in the frontend, with its engine core across NATS.

`vllm serve` is vLLM's OpenAI layer (render: chat template, tokenizer, SamplingParams with structured-
output constraints and generation_config defaults, validation; derender: detokenizing, stop strings,
n > 1, logprobs, tool-call and reasoning parsers, streaming) over an AsyncLLM, whose InputProcessor and
OutputProcessor run in the API process while the EngineCore runs elsewhere and speaks tokens only.
The frontend keeps all of that and moves only the engine core: `RemoteEngineCore` takes the place of
vLLM's ZMQ engine-core client and sends each EngineCoreRequest (token ids + SamplingParams) over NATS
to the deployment's way in (`Dispatcher`: least busy instance, retries before the first token, migration
after it); the worker answers with the engine core's outputs (`workers.engine.OutputTap`).

vLLM's scale-out render/derender classes (`vllm/entrypoints/scale_out/`) cover chat, completions,
responses and messages, but not `echo`, stop strings on a tokens-only engine ("check stop strings on
the coordinator") or a streaming parser state that is not replayed from scratch on every chunk, so the
frontend uses the next layer down, as Dynamo's `--dyn-chat-processor vllm` does: vLLM's input and output
processors, under vLLM's own serving classes. vLLM internals relied on (v0.32, pinned in pyproject):
`AsyncLLM.__init__` building its core through `EngineCoreClient.make_async_mp_client`, the core client's
`add_request_async` / `abort_requests_async` / `get_output_async`, `EngineCoreOutput(s)`,
`LogprobsLists` / `LogprobsTensors`, `PrefillStats`, `OutputProcessor.request_states` and
`RequestOutputCollector.put(Exception)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec

from workers.common.protocol import GenerateChunk, LogprobRows
from workers.frontend.dispatch import Dispatcher, StreamBroken
from workers.frontend.errors import ApiError

log = logging.getLogger(__name__)

# The vLLM release whose internals (listed above) this was written and tested against (scripts/setup.sh).
TESTED_VLLM = "0.32"


# Loop turns a failing request waits for its reader to take the outputs before the error (a reader that is
# gone never does: then the error replaces them, which nobody sees).
FAIL_DRAIN_TURNS = 100


@dataclass
class Failure:
    request_id: str
    error: ApiError


class Resources:
    """What AsyncLLM reads of its core client's resources: whether the engine is dead (never, here:
    a lost worker is the dispatcher's business)."""

    engine_dead = False


class RemoteEngineCore:
    """vLLM's async engine-core client interface, answered over NATS.

    Each EngineCoreRequest is one NATS request (a child request for each of n > 1); the worker's chunks
    become EngineCoreOutput on one queue, handed to vLLM's output handler in batches, as vLLM's ZMQ client
    delivers a whole engine step. A request that fails is
    ended in its own output collector with an exception vLLM's server turns into the HTTP status
    (GracefulHTTPError), and aborted; a stop string the output processor finds aborts the NATS stream."""

    def __init__(self, dispatcher: Dispatcher, model: Callable[[], str], observer: Any = None) -> None:
        self.dispatcher = dispatcher
        self.model = model  # the served name the dispatcher routes by
        self.observer = observer  # metrics: prompt(n), tokens(n, ttft, itl)
        self.outputs: asyncio.Queue[Any] = asyncio.Queue()  # EngineCoreOutput or Failure, in arrival order
        self._held: Any = None  # a Failure that ended the last batch, handled at the next call
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.resources = Resources()
        self.engine_ranks_managed = [0]
        self.output_processor: Any = None  # set once the AsyncLLM around it exists

    # ---- what AsyncLLM calls -------------------------------------------------------------------
    async def get_output_async(self) -> Any:
        """Every output that arrived since the last call, as one EngineCoreOutputs (as vLLM's own client
        returns a whole engine step): the output handler's loop, its stats and its turn of the event loop
        are paid once per batch, not once per request's chunk. A failure is acted on here, in stream order,
        after the outputs before it reached their request's collector: a batch ends before a failure, and
        the failure is handled at the next call."""
        from vllm.v1.engine import EngineCoreOutputs

        while True:
            item = self._held if self._held is not None else await self.outputs.get()
            self._held = None
            if isinstance(item, Failure):
                await self._fail(item.request_id, item.error)
                continue
            batch = [item]
            queue = self.outputs
            while not queue.empty():
                more = queue.get_nowait()
                if isinstance(more, Failure):
                    self._held = more
                    break
                batch.append(more)
            return EngineCoreOutputs(outputs=batch, timestamp=time.monotonic())

    async def add_request_async(self, request: Any) -> None:
        refused = self._unsupported(request)
        if refused is not None:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(refused)
        payload = payload_of(request)
        self.tasks[request.request_id] = asyncio.create_task(self._run(request.request_id, payload))

    async def abort_requests_async(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            task = self.tasks.pop(request_id, None)
            if task is not None and not task.done():
                task.cancel()  # closing the dispatcher's stream publishes the cancel to the worker

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    async def is_sleeping_async(self) -> bool:
        return False

    async def reset_mm_cache_async(self) -> None:
        return None

    async def reset_prefix_cache_async(self, *args: Any, **kwargs: Any) -> bool:
        return False

    async def reset_encoder_cache_async(self) -> None:
        return None

    async def check_health_async(self) -> None:
        return None

    async def is_scheduler_paused_async(self) -> bool:
        return False

    def get_kv_event_sources(self) -> dict[int, Any]:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        for task in self.tasks.values():
            task.cancel()

    # ---- the request plane ---------------------------------------------------------------------
    @staticmethod
    def _unsupported(request: Any) -> str | None:
        """What the request plane cannot carry yet, said as a 400 rather than dropped."""
        if getattr(request, "mm_features", None):
            return "multimodal input is not supported by this deployment's frontend"
        if getattr(request, "prompt_embeds", None) is not None:
            return "prompt_embeds is not supported by this deployment's frontend"
        if getattr(request, "lora_request", None) is not None:
            return "LoRA adapters are not supported by this deployment's frontend"
        return None

    async def _run(self, request_id: str, payload: dict[str, Any]) -> None:
        started = time.perf_counter()
        last: float | None = None
        if self.observer is not None:
            self.observer.prompt(len(payload["token_ids"]))
        try:
            async for chunk in self.dispatcher.generate(self.model(), payload):
                out = engine_core_output(request_id, chunk)  # type: ignore[arg-type]
                n = len(out.new_token_ids)
                if n and self.observer is not None:
                    now = time.perf_counter()
                    self.observer.tokens(n, now - started if last is None else None,
                                         None if last is None else (now - last) / n)
                    last = now
                self.outputs.put_nowait(out)
                if out.finish_reason is not None:
                    return
            self.outputs.put_nowait(Failure(request_id, ApiError("the worker's stream ended without a finish reason")))
        except StreamBroken as exc:
            self.outputs.put_nowait(Failure(request_id, exc.error))
        except ApiError as exc:
            self.outputs.put_nowait(Failure(request_id, exc))
        except asyncio.CancelledError:  # aborted: the client went away, or a stop string ended it
            raise
        except Exception as exc:  # a bug here must end the request, never hang it
            log.exception("request %s failed in the frontend", request_id)
            self.outputs.put_nowait(Failure(request_id, ApiError(f"{type(exc).__name__}: {exc}")))
        finally:
            self.tasks.pop(request_id, None)

    async def _fail(self, request_id: str, error: ApiError) -> None:
        """End the request (and, for n > 1, its siblings) with the error's HTTP status, after what it
        produced so far: an exception put in vLLM's output collector replaces an output not yet taken, so
        the reader (awaiting it) gets a few turns of the loop to take it first."""
        from vllm.exceptions import GracefulHTTPError

        processor = self.output_processor
        state = processor.request_states.get(request_id) if processor is not None else None
        if state is None or state.queue is None:
            return
        queue = state.queue
        for _ in range(FAIL_DRAIN_TURNS):
            if queue.output is None:
                break
            await asyncio.sleep(0)
        parent = state.parent_req
        ids = [request_id] if parent is None else list(getattr(parent, "child_requests", ()) or [request_id])
        to_abort = processor.abort_requests(ids, internal=True)
        for other in to_abort:
            task = self.tasks.pop(other, None)
            if task is not None and other != request_id:
                task.cancel()
        queue.put(GracefulHTTPError(error.message, HTTPStatus(error.status)))


def payload_of(request: Any) -> dict[str, Any]:
    """An EngineCoreRequest as the `generate` endpoint's request (workers.common.protocol)."""
    params = request.sampling_params
    sampling = msgspec.to_builtins(params)
    # SamplingParams omits fields at their default, and max_tokens' default (16) is a common value: a router
    # reading the payload took an absent max_tokens for "unknown" and priced 256 decode tokens instead of 16.
    if params.max_tokens is not None:
        sampling["max_tokens"] = params.max_tokens
    payload: dict[str, Any] = {"request_id": request.request_id, "token_ids": list(request.prompt_token_ids),
                               "sampling": sampling, "output": "tokens"}
    if request.priority:
        payload["priority"] = request.priority
    if request.cache_salt is not None:
        payload["cache_salt"] = request.cache_salt
    kv = (params.extra_args or {}).get("kv_transfer_params") if params.extra_args else None
    if kv is not None:
        payload["kv_transfer_params"] = kv
    return payload


def _lists(rows: LogprobRows) -> Any:
    import numpy as np
    from vllm.v1.outputs import LogprobsLists

    return LogprobsLists(np.asarray(rows["ids"], dtype=np.int64), np.asarray(rows["logprobs"], dtype=np.float32),
                         np.asarray(rows["ranks"], dtype=np.int64))


def _tensors(pieces: list[LogprobRows]) -> Any:
    import torch
    from vllm.v1.outputs import LogprobsTensors

    ids = [r for p in pieces for r in p["ids"]]
    lps = [r for p in pieces for r in p["logprobs"]]
    ranks = [r for p in pieces for r in p["ranks"]]
    return LogprobsTensors(torch.tensor(ids, dtype=torch.int64), torch.tensor(lps, dtype=torch.float32),
                           torch.tensor(ranks, dtype=torch.int64))


def engine_core_output(request_id: str, chunk: GenerateChunk) -> Any:
    """A worker's chunk (output "tokens") as the EngineCoreOutput vLLM's output processor takes."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason
    from vllm.v1.metrics.stats import PrefillStats

    finish = chunk.get("finish_reason")
    out = EngineCoreOutput(request_id=request_id, new_token_ids=list(chunk.get("token_ids") or ()))
    if "lp" in chunk:
        out.new_logprobs = _lists(chunk["lp"])
    if chunk.get("plp"):
        out.new_prompt_logprobs_tensors = _tensors(chunk["plp"])
    if finish is not None:
        out.finish_reason = FinishReason[str(finish).upper()]
        out.stop_reason = chunk.get("stop_reason")
        out.kv_transfer_params = chunk.get("kv_transfer_params")
    cached = chunk.get("cached_tokens")
    if isinstance(cached, int):
        out.prefill_stats = PrefillStats(num_cached_tokens=cached)
    return out


def build_engine(vllm_config: Any, core: RemoteEngineCore) -> Any:
    """vLLM's AsyncLLM over `core`: AsyncLLM builds its engine-core client through one factory, which
    answers `core` while it is built (nothing else reads the factory then)."""
    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.executor import Executor

    if not str(vllm.__version__).startswith(TESTED_VLLM):
        log.warning("vLLM %s: the frontend's remote engine core was written against vLLM %s internals (AsyncLLM, "
                    "EngineCoreOutput); if requests fail, install vLLM %s (scripts/setup.sh)", vllm.__version__,
                    TESTED_VLLM, TESTED_VLLM)
    factory = EngineCoreClient.__dict__["make_async_mp_client"]
    EngineCoreClient.make_async_mp_client = staticmethod(lambda **_: core)  # type: ignore[method-assign]
    try:
        engine = AsyncLLM(vllm_config, Executor.get_class(vllm_config), log_stats=False, log_requests=False)
    finally:
        EngineCoreClient.make_async_mp_client = factory  # type: ignore[method-assign]
    core.output_processor = engine.output_processor
    return engine

