"""vLLM's AsyncLLM built from vLLM's own CLI parser, and the one generate loop every worker uses.

Reusing AsyncEngineArgs.add_cli_args means every `vllm serve` engine flag works on our workers
unchanged; our own flags are added beside them.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from workers.common.protocol import GenerateChunk, GenerateRequest

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


def make_parser(description: str) -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=description)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def engine_args_from(args: argparse.Namespace) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(args)


def build_engine(engine_args: Any) -> AsyncLLM:
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args)


class EngineHandler:
    """Turns GenerateRequest dicts into engine calls and RequestOutputs into GenerateChunk deltas."""

    def __init__(self, engine: AsyncLLM, worker_name: str = "") -> None:
        self.engine = engine
        self.worker_name = worker_name
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

        params = SamplingParams(**req.sampling)
        params.output_kind = RequestOutputKind.DELTA
        if req.kv_transfer_params is not None:
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": req.kv_transfer_params}
        return params

    async def generate(self, raw: dict[str, Any]) -> AsyncIterator[GenerateChunk]:
        req = GenerateRequest.model_validate(raw)
        prompt = await self.prompt_of(req)
        params = self.sampling_params(req)
        request_id = req.request_id
        finished = False
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                completion = out.outputs[0]
                chunk: GenerateChunk = {"text": completion.text, "token_ids": list(completion.token_ids)}
                if out.finished:
                    finished = True
                    chunk["finish_reason"] = completion.finish_reason
                    chunk["prompt_tokens"] = len(out.prompt_token_ids or [])
                    chunk["cached_tokens"] = out.num_cached_tokens
                    chunk["kv_transfer_params"] = out.kv_transfer_params
                    chunk["worker"] = self.worker_name
                yield chunk
        finally:
            if not finished:
                # The client went away or the worker is stopping: free the engine's slot now.
                await self.engine.abort(request_id)
