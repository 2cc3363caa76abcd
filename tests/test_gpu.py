"""Issue 7: the GPU runs (bench/gpu/), and the parts of them that can be checked without a GPU.

The GPU tests call bench/gpu/run_gpu.sh exactly as a person on a GPU machine would, and pass when
its run reports no FAIL line; without nvidia-smi they are skipped and say so. The other tests
check, on any machine, what the GPU runs depend on: the GPU topologies pass `launcher validate`
(schema and rules against the installed vLLM), and install.sh reassembles a split wheel from
bundles that arrive one command at a time, in any order, and says which bundles are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_DIR = ROOT / "bench" / "gpu"


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return sum(line.startswith("GPU ") for line in proc.stdout.splitlines()) if proc.returncode == 0 else 0


needs_gpu = pytest.mark.skipif(shutil.which("nvidia-smi") is None,
                               reason="no nvidia-smi: the GPU runs need NVIDIA GPUs (bench/gpu/README.md)")


@pytest.mark.parametrize("topology", sorted(p.name for p in (GPU_DIR / "topologies").glob("*.yaml")))
def test_gpu_topologies_validate(topology: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(GPU_DIR / "topologies" / topology)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_install_reassembles_split_wheel_from_bundles_in_any_order(tmp_path: Path) -> None:
    big = os.urandom(3000)
    small = os.urandom(500)
    parts = [big[:1200], big[1200:2400], big[2400:]]
    lock = ["# test lock", f"wheel always big-1.0-py3-none-any.whl {_sha(big)} {len(big)}",
            f"wheel always small-1.0-py3-none-any.whl {_sha(small)} {len(small)}"]
    lock += [f"part - big-1.0-py3-none-any.whl.part-{k:02d} {_sha(p)} {len(p)} big-1.0-py3-none-any.whl"
             for k, p in enumerate(parts)]
    (tmp_path / "wheels.lock").write_text("\n".join(lock) + "\n")
    bundles = {"bundle-1": {"big-1.0-py3-none-any.whl.part-00": parts[0]},
               "bundle-2": {"big-1.0-py3-none-any.whl.part-01": parts[1], "small-1.0-py3-none-any.whl": small},
               "bundle-3": {"big-1.0-py3-none-any.whl.part-02": parts[2]}}
    (tmp_path / "bundles.txt").write_text("\n".join(f"{b} 0.0 {' '.join(files)}" for b, files in bundles.items()))
    for b, files in bundles.items():
        (tmp_path / b).mkdir()
        for name, data in files.items():
            (tmp_path / b / name).write_bytes(data)
    env = {**os.environ, "GPU_LOCK": str(tmp_path / "wheels.lock"), "GPU_BUNDLES_TXT": str(tmp_path / "bundles.txt"),
           "GPU_PARTS": str(tmp_path / "parts"), "GPU_ASSEMBLE_ONLY": "1"}

    def install(*bundle: str) -> str:
        proc = subprocess.run(["bash", str(GPU_DIR / "install.sh"), *(str(tmp_path / b) for b in bundle)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "send: bundle-1 bundle-2" in install("bundle-3")
    assert "send: bundle-1 " in install("bundle-2")
    out = install("bundle-1")
    assert "reassembling big-1.0-py3-none-any.whl from 3 parts" in out
    assert "all 2 wheels present" in out
    assert (tmp_path / "parts" / "big-1.0-py3-none-any.whl").read_bytes() == big
    assert "all 2 wheels present" in install()  # idempotent: nothing new, nothing lost


def test_bundles_fit_one_carry() -> None:
    """Each bundle listed in bundles.txt is under the 64 MiB a device command may carry."""
    rows = [line.split() for line in (GPU_DIR / "bundles.txt").read_text().splitlines() if not line.startswith("#")]
    assert rows, "bundles.txt lists no bundle: run bench/gpu/make_bundles.py"
    assert all(float(r[1]) < 64 for r in rows), rows
    listed = {f for r in rows for f in r[2:]}
    locked = {line.split()[2] for line in (GPU_DIR / "wheels.lock").read_text().splitlines()
              if line.startswith(("part", "wheel")) and int(line.split()[4]) <= 60 * 1024 * 1024}
    assert locked <= listed, f"in wheels.lock but in no bundle: {sorted(locked - listed)}"


def _run_gpu(run: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(GPU_DIR / "run_gpu.sh"), run, *extra], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)
    result_file = tmp_path / f"{run}.json"
    assert result_file.exists(), proc.stdout[-5000:] + proc.stderr[-5000:]
    result = json.loads(result_file.read_text())
    failed = [c for c in result["checks"] if c["verdict"] == "FAIL"]
    assert not failed and proc.returncode == 0, json.dumps(failed, indent=1) + proc.stdout[-3000:]
    return dict(result)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.timeout(900)
def test_gpu_run1_monolith_one_gpu(tmp_path: Path) -> None:
    result = _run_gpu("run1", tmp_path)
    checks = {c["check"]: c["verdict"] for c in result["checks"]}
    assert checks.get("client answers through worker + NATS") == "PASS"
    assert checks.get("gpu-monolith GPUs released (nvidia-smi compute apps)") == "PASS"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.timeout(900)
def test_gpu_run2_1p1d_and_kv_router_two_gpus(tmp_path: Path) -> None:
    if _gpu_count() < 2:
        pytest.skip(f"run 2 needs two GPUs; this host has {_gpu_count()}")
    result = _run_gpu("run2", tmp_path)
    checks = {c["check"]: c["verdict"] for c in result["checks"]}
    assert checks.get("1P1D greedy output equals the monolith's") == "PASS"
    assert checks.get("a repeated long prompt lands on the worker that cached it") == "PASS"
