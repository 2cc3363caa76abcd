"""The router's tokenizer: prompts encoded at once (tokenizers), the same ids as transformers' once loaded."""

from __future__ import annotations

from pathlib import Path

from workers.common.protocol import GenerateRequest
from workers.kv_router.router import Tokenizer


def test_prompts_are_encoded_before_transformers_is_loaded_and_agree_with_it(tiny_tokenizer: Path) -> None:
    tok = Tokenizer(str(tiny_tokenizer))
    prompt = GenerateRequest(prompt="client 0 asks about item 5: tell me more")
    chat = GenerateRequest(messages=[{"role": "user", "content": "hi"}])
    assert tok.ready(prompt)
    early = tok(prompt).tolist()
    assert tok.loaded.wait(300), "transformers' tokenizer loads in the background"
    assert tok.fast is not None, "tokenizer.json agrees with transformers on the probes"
    assert tok.ready(chat) and len(tok(chat)) > 0
    assert early == list(tok.tok(prompt.prompt)["input_ids"])

