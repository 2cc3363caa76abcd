"""The `generate` endpoint's request and response shapes, shared by clients and every worker kind."""

from __future__ import annotations

import uuid
from typing import Any, TypedDict

from pydantic import BaseModel, Field, model_validator


class GenerateRequest(BaseModel):
    """Exactly one of prompt, messages (chat template applied by the worker) or token_ids."""

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    kv_transfer_params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        given = [x for x in (self.prompt, self.messages, self.token_ids) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, messages, token_ids")
        return self


class TokenLogprob(TypedDict):
    """One generated token's text and logprob, and the top alternatives as [text, logprob] pairs."""

    token: str
    logprob: float
    top: list[list[Any]]


class GenerateChunk(TypedDict, total=False):
    """One engine step: the new text and tokens; the last chunk carries finish_reason and counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[TokenLogprob]
    prompt_tokens: int
    cached_tokens: int | None
    kv_transfer_params: dict[str, Any] | None
    worker: str
