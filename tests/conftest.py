"""Fixtures: real etcd and nats-server on free ports (shared by the session), model folders; the tiers.

Each test deployment gets its own LAUNCHER_HOME and namespace, so tests never see each other's
processes, and nothing here touches the default ports a developer's own deployment may use.

Two tiers: `pytest -m "not e2e"` (unit and fast integration: fakes, real etcd/NATS, no vLLM) and the e2e
tier (real vLLM on CPU). A test is e2e when vLLM loads a model for it, and vLLM can only load one of the
model folders the `tiny_model` and `demo_model` fixtures give: every test that takes one of them,
directly or through a fixture of its own, is marked e2e here at collection (nobody writes the mark by
hand, so nobody can forget it). `tiny_tokenizer` gives the same folder to a test that only reads its
tokenizer. As a backstop, tests.helpers refuses to write or `up` a topology of a real model folder in a
test that is not marked e2e.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import services as svc
from tests import helpers
from tests.helpers import DEMO_MODEL, ROOT, TINY_MODEL, Services

# Fixtures whose model folder vLLM loads: a test that takes one (however indirectly) starts vLLM.
VLLM_MODEL_FIXTURES = frozenset({"tiny_model", "demo_model"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if VLLM_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):  # the whole fixture closure
            item.add_marker(pytest.mark.e2e)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture of the test (module-scoped ones included) runs: what tests.helpers checks.
    helpers.RUNNING_E2E = item.get_closest_marker("e2e") is not None


def _ensure_model(kind: str, path: Path) -> Path:
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_models.py"), kind, str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny model, for vLLM to load (marks the test e2e)."""
    return _ensure_model("tiny", TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Path:
    """The same folder, for a test that reads only its tokenizer (no vLLM: stays in the fast tier)."""
    return _ensure_model("tiny", TINY_MODEL)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """SmolLM2-135M-Instruct, for vLLM to load (marks the test e2e)."""
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
