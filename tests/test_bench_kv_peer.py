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


def test_refuses_to_run_without_vllm_router(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kv_peer.py"), "--reps", "1"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "pip install vllm-router==0.1.17" in proc.stderr
