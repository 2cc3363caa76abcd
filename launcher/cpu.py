"""The engine dtype a CPU worker computes fastest in, chosen from the host's CPU flags.

Why: vLLM's CPU build runs a bfloat16 checkpoint in bfloat16 by default, and on a CPU without
AVX512-BF16 or AMX-BF16 every bfloat16 matmul is emulated (converted to float32 and back). On such a
CPU a shared-prefix SmolLM2 workload took 71.5 s in bfloat16 and 41.6 s in float32 (`vllm serve`, same
run, 1.7x); where the CPU has the instructions, bfloat16 is the faster one. The plan asks this module
only for CPU workers whose topology leaves `dtype` unset, and never overrides an explicit one.

The flags are an argument (a set of /proc/cpuinfo flag names) so the choice is unit-testable on any
machine; `read_cpu_flags` reads this host's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Either one gives native bfloat16 matmuls to oneDNN / vLLM's CPU kernels.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    """dtype: the value for vLLM's --dtype; reason: one line for `launcher plan`."""

    dtype: str
    reason: str


def read_cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """The first processor's flags, or None where they cannot be read (not Linux, no permission)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


def choose_cpu_dtype(flags: Iterable[str] | None) -> DtypeChoice | None:
    """bfloat16 where the CPU computes it natively, float32 where it would be emulated.

    None when the flags are unknown: then vLLM's own default stands (the plan says so).
    """
    if flags is None:
        return None
    have = sorted(set(flags) & set(BF16_FLAGS))
    wanted = "/".join(BF16_FLAGS)
    if have:
        return DtypeChoice("bfloat16", f"dtype bfloat16: this CPU has {'/'.join(have)} (native bfloat16 matmuls)")
    return DtypeChoice("float32", f"dtype float32: this CPU has no {wanted}, bfloat16 would be emulated "
                                  "(measured 1.7x slower)")
