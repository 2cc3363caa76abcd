"""Fixtures: real etcd and nats-server on free ports (shared by the session), model folders.

Each test deployment gets its own LAUNCHER_HOME and namespace, so tests never see each other's
processes, and nothing here touches the default ports a developer's own deployment may use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import services as svc
from tests.helpers import DEMO_MODEL, ROOT, TINY_MODEL, Services


def _ensure_model(kind: str, path: Path) -> Path:
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_models.py"), kind, str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return _ensure_model("tiny", TINY_MODEL)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return _ensure_model("demo", DEMO_MODEL)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One etcd and one nats-server for the whole test session, on ports nobody else uses."""
    run_dir = tmp_path_factory.mktemp("services")
    etcd_url = f"http://127.0.0.1:{svc.free_port()}"
    nats_url = f"nats://127.0.0.1:{svc.free_port()}"
    started = [svc.start_etcd(etcd_url, run_dir), svc.start_nats(nats_url, run_dir)]
    launcher_home = tmp_path_factory.mktemp("launcher-home")
    env = {"ETCD_ENDPOINTS": etcd_url, "NATS_SERVER": nats_url, "LAUNCHER_HOME": str(launcher_home)}
    yield Services(etcd=etcd_url, nats=nats_url, env=env)
    svc.stop_services(started, grace=5)


@pytest.fixture()
def tmux_socket() -> Iterator[str]:
    """A private tmux server for one test; killed afterwards."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    name = f"launcher-test-{svc.free_port()}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)
