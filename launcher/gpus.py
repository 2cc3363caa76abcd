"""GPU checks at `up` (not `validate`: the topology may be validated on a laptop without GPUs);
launcher.validation.host_problems is where they are run from."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

from launcher.resolve import ResolvedProcess


class GpuError(Exception):
    pass


def visible_gpus() -> dict[int, str] | None:
    """index -> name from nvidia-smi; None when there is no NVIDIA driver on this host."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    gpus = {}
    for line in out.splitlines():
        if "," in line:
            idx, name = line.split(",", 1)
            gpus[int(idx)] = name.strip()
    return gpus


def check_gpus(procs: Iterable[ResolvedProcess], available: dict[int, str] | None = None) -> None:
    wanted: dict[int, str] = {}
    for proc in procs:
        for g in proc.gpus or ():
            wanted.setdefault(g, proc.name)
    if not wanted:
        return
    available = visible_gpus() if available is None else available
    if available is None:
        raise GpuError(f"the topology gives GPUs to {', '.join(sorted(set(wanted.values())))} but this host has no "
                       "NVIDIA driver (nvidia-smi not found); use cpus: on a CPU host")
    missing = {g: n for g, n in wanted.items() if g not in available}
    if missing:
        detail = ", ".join(f"GPU {g} ({n})" for g, n in sorted(missing.items()))
        raise GpuError(f"{detail}: not on this host, which has GPU(s) {sorted(available) or 'none'}")


def gpu_memory_by_pid() -> dict[int, int]:
    """pid -> GPU memory in MiB, for `status` on GPU hosts."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    usage: dict[int, int] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            usage[int(parts[0])] = usage.get(int(parts[0]), 0) + int(parts[1])
    return usage
