"""Random Llama models for the GPU runs, made on the GPU machine (it has transformers, no hub).

    python bench/gpu/make_gpu_model.py tiny  models/tiny-llama    # scripts/make_models.py's tiny model
    python bench/gpu/make_gpu_model.py small models/gpu-llama     # ~150M parameters, for timing

Why a second size: the tiny model (hidden 128, 2 layers) measures mostly Python and transport
overhead on an H200; `small` (hidden 1024, 12 layers) gives the GPU real work per token while still
loading in seconds. Its weights use a larger init (std 0.1) and an 8x lm_head so that greedy logits have
clear margins:
a random model with flat logits can flip an argmax between a monolith and a 1P1D deployment on
last-bit differences, which would fail the equality check for no real reason.
Idempotent: a folder that holds a config.json is left alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent.parent


def make_small(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # The tokenizer (byte-level BPE, 512 tokens, chat template) is the tiny model's: make that first.
    tiny = out.with_name(out.name + ".tok")
    if not (tiny / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_models.py"), "tiny", str(tiny)], check=True)
    tok = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.1, dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # logits std ~25 instead of ~3: greedy margins well above bf16 noise
    model = model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", choices=["tiny", "small"])
    p.add_argument("out", type=Path)
    args = p.parse_args()
    out: Path = args.out
    if (out / "config.json").exists():
        print(f"{out}: already there")
        return
    if args.size == "tiny":
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_models.py"), "tiny", str(out)], check=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    make_small(out)
    print(f"{out}: made")


if __name__ == "__main__":
    main()
