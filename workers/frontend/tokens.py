"""Tokenizers of the served models, loaded once each, used off the event loop.

The frontend tokenizes every prompt once (the chat template for messages) and sends token ids
onwards: the router hashes them and the worker feeds them to its engine as they are.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Tokenizers:
    def __init__(self) -> None:
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def get(self, path: str) -> Any:
        fut = self._loading.get(path)
        if fut is None:
            fut = self._loading[path] = asyncio.ensure_future(asyncio.to_thread(_load, path))
        try:
            return await asyncio.shield(fut)
        except Exception:
            self._loading.pop(path, None)  # try again next time (a transient read error)
            raise

    async def chat(self, path: str, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        tok = await self.get(path)
        return await asyncio.to_thread(_apply_template, tok, messages, add_generation_prompt)

    async def encode(self, path: str, text: str) -> list[int]:
        tok = await self.get(path)
        return await asyncio.to_thread(_encode, tok, text)


def _load(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _apply_template(tok: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
    ids: Any = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _encode(tok: Any, text: str) -> list[int]:
    """As vLLM encodes a completion prompt: the tokenizer's special tokens (BOS) included."""
    return [int(i) for i in tok(text)["input_ids"]]
