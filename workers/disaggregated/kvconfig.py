"""Adapt the topology's --kv-transfer-config to the KVTransferConfig of the vLLM installed here.

The topology's fields kv_rank, kv_parallel_size and kv_ip come from vLLM V0's PyNccl pipes; vLLM V1
(0.32 here) dropped them, and its KVTransferConfig refuses unknown keys, so passing the topology's
block unchanged would stop the worker at argument parsing. The launcher still validates them
(launcher.rules): they describe the deployment. Here, before vLLM parses its flags, keys the installed
KVTransferConfig does not have are removed (and logged), and for NixlConnector an address given as
kv_ip / kv_port becomes the NIXL side channel (VLLM_NIXL_SIDE_CHANNEL_HOST / _PORT) unless those
are already set: that is the address a decode worker on another host connects to.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

FLAG = "--kv-transfer-config"
# Used when vLLM cannot be imported (e.g. for a unit test): the fields of vLLM 0.32's KVTransferConfig.
FALLBACK_FIELDS = frozenset({"kv_connector", "engine_id", "kv_buffer_device", "kv_role", "kv_port",
                             "kv_connector_extra_config", "kv_connector_module_path", "enable_permute_local_kv",
                             "kv_load_failure_policy"})


def vllm_fields() -> frozenset[str]:
    try:
        from vllm.config import KVTransferConfig
    except Exception:
        return FALLBACK_FIELDS
    return frozenset(f.name for f in dataclasses.fields(KVTransferConfig))


def adapt(config: dict[str, object], known: frozenset[str], env: MutableMapping[str, str]
          ) -> tuple[dict[str, object], dict[str, object]]:
    """(config for vLLM, the dropped seed-only keys); may set NIXL side-channel variables in env."""
    if config.get("kv_connector") == "NixlConnector":
        if config.get("kv_ip") is not None:
            env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", str(config["kv_ip"]))
        if config.get("kv_port") is not None and "kv_ip" in config:
            env.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(config["kv_port"]))
    kept = {k: v for k, v in config.items() if k in known}
    dropped = {k: v for k, v in config.items() if k not in known}
    return kept, dropped


def adapt_argv(argv: list[str], env: MutableMapping[str, str] | None = None,
               known: frozenset[str] | None = None) -> list[str]:
    """argv with its --kv-transfer-config (either `FLAG JSON` or `FLAG=JSON`) rewritten by `adapt`."""
    env = os.environ if env is None else env
    known = vllm_fields() if known is None else known
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == FLAG and i + 1 < len(out):
            pos, raw, prefix = i + 1, out[i + 1], ""
        elif arg.startswith(FLAG + "="):
            pos, raw, prefix = i, arg[len(FLAG) + 1:], FLAG + "="
        else:
            continue
        try:
            config = json.loads(raw)
        except ValueError:
            return out  # vLLM's own parser reports it
        if not isinstance(config, dict):
            return out
        kept, dropped = adapt(config, known, env)
        if dropped:
            log.info("kv-transfer-config: %s are the topology's (checked by the launcher), not this vLLM's: "
                     "not passed on", ", ".join(f"{k}={v}" for k, v in dropped.items()))
        out[pos] = prefix + json.dumps(kept)
        return out
    return out
