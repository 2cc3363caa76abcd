"""ExampleConnector's shared storage, seen from a decode worker that must prefill locally.

ExampleConnector keys a prompt's KV by a hash of its block-aligned token ids: one folder, one
safetensors file per layer, written layer by layer during the prefill's forward pass. It decides
"the KV is there" from the folder alone. A prefill worker killed mid-pass leaves a folder with only
some layers; a decode worker that then runs the prompt itself would try to load the missing layers
and its engine would die. So before a local prefill that follows a failed remote one, the folder
of that prompt is removed: the local run computes the KV (and stores a complete copy).

The folder name mirrors vLLM 0.32's ExampleConnector (`_found_match_for_prompt`); if vLLM changes
it, this finds nothing and removes nothing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

CONNECTOR = "ExampleConnector"
DEFAULT_PATH = "/tmp"  # ExampleConnector's own default


def aligned_length(num_tokens: int, block_size: int) -> int:
    """ExampleConnector's align_to_block_size(len - 1): the whole blocks before the last prompt token."""
    return (num_tokens - 2) // block_size * block_size


def prompt_folder(storage_path: str, token_ids: list[int], block_size: int) -> Path:
    import numpy as np
    from vllm.utils.hashing import safe_hash

    ids = np.asarray(token_ids[:aligned_length(len(token_ids), block_size)], dtype=np.int64)
    return Path(storage_path) / safe_hash(ids.tobytes(), usedforsecurity=False).hexdigest()


class SharedStorage:
    def __init__(self, storage_path: str, block_size: int) -> None:
        self.storage_path = storage_path
        self.block_size = block_size

    @classmethod
    def of(cls, kv_transfer_config: object, block_size: int | None) -> SharedStorage | None:
        """Only for ExampleConnector; None for connectors that hand KV over otherwise."""
        if getattr(kv_transfer_config, "kv_connector", None) != CONNECTOR or not block_size:
            return None
        extra = getattr(kv_transfer_config, "kv_connector_extra_config", None) or {}
        return cls(str(extra.get("shared_storage_path", DEFAULT_PATH)), block_size)

    def discard(self, token_ids: list[int]) -> bool:
        """Remove what a failed prefill may have left for this prompt; True if there was something."""
        if aligned_length(len(token_ids), self.block_size) <= 0:
            return False
        folder = prompt_folder(self.storage_path, token_ids, self.block_size)
        if not folder.is_dir():
            return False
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s: a failed prefill may have left it incomplete", folder)
        return True
