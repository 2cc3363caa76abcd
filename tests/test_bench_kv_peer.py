"""The side-by-side bench's workloads: the same prompts for every side, new ones per repetition, the
shapes the issue asks for; and its refusal to run without vllm-router. No vLLM started here."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import bench_kv_peer as b
from tests.helpers import DEMO_MODEL, ROOT

pytestmark = pytest.mark.skipif(not DEMO_MODEL.exists(), reason="needs models/SmolLM2-135M-Instruct (its tokenizer)")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_MODEL))


def test_shared_prefix_is_seeded_shuffled_and_long_enough(tokenizer: Any) -> None:
    w1 = b.shared_prefix("pressure", 7, tokenizer, 4, 1000, 64)
    assert w1.prompts == b.shared_prefix("pressure", 7, tokenizer, 4, 1000, 64).prompts
    assert not set(w1.prompts) & set(b.shared_prefix("pressure", 8, tokenizer, 4, 1000, 64).prompts)
    assert len(w1.prompts) == 64 and len(set(w1.prompts)) == 64
    assert all(n >= 1000 for n in w1.notes["prefix_tokens"])
    docs = sorted({p.split("Question")[0] for p in w1.prompts})
    assert len(docs) == 4
    order = [docs.index(p.split("Question")[0]) for p in w1.prompts]
    assert order[:8] != sorted(order[:8]) or len(set(order[:8])) > 2  # not a fixed A, B, C, D cycle
    assert any(order[i] == order[i + 1] for i in range(len(order) - 1))


def test_multiturn_turns_extend_the_previous_prompt(tokenizer: Any) -> None:
    w = b.multiturn(3, tokenizer, 8, 4, 500)
    assert len(w.conversations) == 8 and all(len(c) == 4 for c in w.conversations)
    for conv in w.conversations:
        for prev, nxt in itertools.pairwise(conv):
            assert nxt.startswith(prev + b.REPLY)  # a fixed reply, not the model's answer


def test_zipf_has_a_hot_head_and_a_tail_beyond_both_caches(tokenizer: Any) -> None:
    w = b.zipf(5, tokenizer, docs=16, doc_tokens=600, requests=128, exponent=1.0)
    assert w.prompts == b.zipf(5, tokenizer, docs=16, doc_tokens=600, requests=128, exponent=1.0).prompts
    counts = w.notes["requests_per_doc"]
    assert sum(counts) == 128 and counts[0] > 3 * max(counts[8:])  # rank 1 is hot, the tail cold
    assert w.notes["all_docs_tokens"] > 2 * 48 * 64  # more than both workers' caches together


def test_chat_turns_are_conversations_with_their_own_system_prompt(tokenizer: Any) -> None:
    w = b.chat(3, tokenizer, conversations=8, turns=4, system_tokens=500)
    assert len(w.chats) == 8 and all(len(users) == 4 for _, users in w.chats)
    assert len({system for system, _ in w.chats}) == 8
    assert all(len(tokenizer(system)["input_ids"]) >= 500 for system, _ in w.chats)


def test_refuses_to_run_without_vllm_router(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kv_peer.py"), "--reps", "1"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "pip install vllm-router==0.1.17" in proc.stderr
