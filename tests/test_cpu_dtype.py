"""The plan picks a CPU worker's dtype from the CPU flags, says why, and never overrides the user."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launcher.cpu import choose_cpu_dtype, read_cpu_flags
from launcher.plan import Endpoints, build_plan
from launcher.topology import load_topology

ENDPOINTS = Endpoints(etcd=["http://10.0.0.1:2379"], nats="nats://10.0.0.1:4222")
NO_BF16 = frozenset({"avx2", "avx512f", "fma"})
HAS_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
HAS_AMX = frozenset({"avx2", "amx_bf16", "amx_tile"})


def plan_of(tmp_path: Path, text: str, flags: frozenset[str] | None):  # type: ignore[no-untyped-def]
    path = tmp_path / "t.yaml"
    path.write_text(text)
    topo, _ = load_topology(path)
    return build_plan(topo, ENDPOINTS, cpu_flags=flags)


def dtype_of(argv: list[str]) -> str | None:
    return argv[argv.index("--dtype") + 1] if "--dtype" in argv else None


def test_choice_follows_the_flags() -> None:
    emulated = choose_cpu_dtype(NO_BF16)
    assert emulated is not None and emulated.dtype == "float32"
    assert "no avx512_bf16/amx_bf16" in emulated.reason and "emulated" in emulated.reason
    for flags in (HAS_BF16, HAS_AMX):
        native = choose_cpu_dtype(flags)
        assert native is not None and native.dtype == "bfloat16"
    assert choose_cpu_dtype(None) is None


def test_reads_proc_cpuinfo_format(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu\n")
    assert read_cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert read_cpu_flags(tmp_path / "missing") is None


def test_cpu_worker_gets_the_choice_and_the_reason(tmp_path: Path) -> None:
    text = "name: t\nmodel: m\nworkers:\n  - {name: w}\n"
    (spec,) = plan_of(tmp_path, text, NO_BF16)
    assert dtype_of(spec.argv) == "float32"
    assert any(n.startswith("dtype float32:") for n in spec.notes)
    (spec,) = plan_of(tmp_path, text, HAS_BF16)
    assert dtype_of(spec.argv) == "bfloat16"


def test_explicit_dtype_wins_topology_wide_and_per_worker(tmp_path: Path) -> None:
    (spec,) = plan_of(tmp_path, "name: t\nmodel: m\nengine: {dtype: bfloat16}\nworkers:\n  - {name: w}\n", NO_BF16)
    assert dtype_of(spec.argv) == "bfloat16" and spec.argv.count("--dtype") == 1 and spec.notes == []
    (spec,) = plan_of(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: w, engine: {dtype: half}}\n", HAS_BF16)
    assert dtype_of(spec.argv) == "half" and spec.notes == []


def test_gpu_workers_are_untouched(tmp_path: Path) -> None:
    (spec,) = plan_of(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: w, gpus: [0]}\n", NO_BF16)
    assert dtype_of(spec.argv) is None and spec.notes == []


def test_unknown_flags_leave_vllm_default(tmp_path: Path) -> None:
    from launcher.plan import HostCpu, cpu_engine_defaults
    from launcher.topology import Worker

    flags, notes = cpu_engine_defaults(Worker(name="w"), {}, HostCpu(None, known=True))
    assert flags == {} and "could not be read" in notes[0]


def test_plan_cli_shows_the_choice(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers:\n  - {name: w}\n")
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = choose_cpu_dtype(read_cpu_flags())  # this host's own choice
    if expected is not None:
        assert f"note: {expected.reason}" in out.stdout
        assert f"--dtype {expected.dtype}" in out.stdout
