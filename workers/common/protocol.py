"""The `generate` endpoint's request and response shapes, shared by clients and every worker kind.

Two kinds of caller:
- the OpenAI frontend renders with vLLM's own OpenAI layer and sends `output: "tokens"`: the prompt as
  token ids and `sampling` as vLLM's whole `SamplingParams` (msgspec builtins: structured-output
  constraints, stop token ids, logprobs, seed ... exactly as vLLM's renderer resolved them). The worker
  answers with the engine core's own outputs (new token ids, logprob rows by token id, finish reason)
  and never tokenizes or detokenizes; the frontend's vLLM output processor does that.
- the seed's client (`python -m workers.common.client`) sends text or messages and a few sampling
  fields, and gets text back (`output: "text"`, the default).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, Field, model_validator


class GenerateRequest(BaseModel):
    """Exactly one of prompt, messages (chat template applied by the worker) or token_ids."""

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    kv_transfer_params: dict[str, Any] | None = None
    # "tokens": token ids in, engine-core outputs out (the frontend); "text": the seed client's text chunks.
    output: Literal["text", "tokens"] = "text"
    priority: int = 0
    cache_salt: str | None = None
    # For a router only: instances (ids) not to choose, those the caller saw lost on this request's earlier
    # tries (a router hands a request off; the caller retries or migrates). An engine worker refuses it.
    avoid: list[int] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        given = [x for x in (self.prompt, self.messages, self.token_ids) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, messages, token_ids")
        if self.output == "tokens" and self.token_ids is None:
            raise ValueError('output "tokens" takes token_ids (render the prompt first)')
        return self


class LogprobRows(TypedDict):
    """vLLM's LogprobsLists/LogprobsTensors as lists: per position, the token ids and logprobs of the
    sampled (or prompt) token followed by the top ones, and the sampled token's rank."""

    ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class GenerateChunk(TypedDict, total=False):
    """One engine step (or several merged): the new tokens; the last chunk carries finish_reason and counts.

    `text` only for output "text"; `lp` (sample logprobs) and `plp` (prompt logprobs, in pieces as the
    engine computes them) only for output "tokens", where `finish_reason` is vLLM's FinishReason name."""

    text: str
    token_ids: list[int]
    lp: LogprobRows
    plp: list[LogprobRows]
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    cached_tokens: int | None
    kv_transfer_params: dict[str, Any] | None
    worker: str
