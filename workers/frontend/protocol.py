"""OpenAI request bodies, validated field by field, and the worker's `sampling` dict built from them.

Field names, defaults and ranges follow vLLM's own OpenAI server (vllm/entrypoints/openai/protocol.py)
where it has the field, so a client moving between `vllm serve` and this frontend sees the same API.
Unknown fields are accepted and ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.frontend.errors import BadRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool | None = None  # vLLM's: choices carry token_ids (and prompt_token_ids once)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadRequest(f"n={self.n} is not supported: this server returns one choice per request (n=1)",
                             param="n")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return None

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        """vLLM SamplingParams keyword arguments; unset fields keep vLLM's defaults."""
        out: dict[str, Any] = {"max_tokens": max_tokens}
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.min_tokens:
            out["min_tokens"] = self.min_tokens
        if not self.skip_special_tokens:
            out["skip_special_tokens"] = False
        if self.include_stop_str_in_output:
            out["include_stop_str_in_output"] = True
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise BadRequest("logit_bias keys are token ids (integers as strings)", param="logit_bias") from None
        logprobs = self.requested_logprobs()
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str | None:
        """The text of the message; content parts other than text are refused (no multimodal model here)."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"content part of type {part.get('type')!r} is not supported (text only)",
                                 param="messages")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must contain at least one message")
        return messages

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": m.role, "content": m.text() or ""}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise BadRequest("echo is not supported", param="echo")
        if self.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise BadRequest("best_of other than 1 is not supported", param="best_of")

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """One prompt (text or token ids); a batch of several is refused with a clear 400."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise BadRequest("prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [int(x) for x in p]  # type: ignore[arg-type]
        if len(p) != 1:
            raise BadRequest(f"a batch of {len(p)} prompts is not supported: send one prompt per request",
                             param="prompt")
        only = p[0]
        return only if isinstance(only, str) else list(only)  # type: ignore[arg-type]


Endpoint = Literal["chat", "completions"]
