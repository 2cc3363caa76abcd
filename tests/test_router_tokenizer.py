"""The router's tokenizer: prompts encoded at once (tokenizers), the same ids as transformers' once loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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



def test_token_ids_need_no_transformers(tiny_tokenizer: Path) -> None:
    """Behind a frontend (token ids only) the router never starts loading transformers (and torch): in a
    fresh interpreter, no loading thread runs and transformers is not imported."""
    code = textwrap.dedent(f"""
        import sys, threading
        from workers.common.protocol import GenerateRequest
        from workers.kv_router.router import Tokenizer
        tok = Tokenizer({str(tiny_tokenizer)!r})
        req = GenerateRequest(token_ids=[1, 2, 3])
        assert tok.ready(req) and tok(req).tolist() == [1, 2, 3]
        print(sorted(t.name for t in threading.enumerate()), "transformers" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['MainThread'] False", out.stdout + out.stderr
