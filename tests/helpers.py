"""Shared by the end-to-end tests: write a topology, run the real CLI, talk to the real deployment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.services import free_port_block
from workers.common.client import generate
from workers.common.protocol import GenerateRequest
from workers.kinds import KINDS, Kind
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "models" / "tiny-llama"
DEMO_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
LAUNCHER = [sys.executable, "-m", "launcher.cli"]

# The kinds tests name, looked up once here: a renamed kind is one edit in this file, and a topology names
# a kind as MONOLITH.name, a component as MONOLITH.component.
FRONTEND, ROUTER, PREFILL, DECODE, MONOLITH, KV_WORKER = (
    KINDS[k] for k in ("frontend", "router", "prefill", "decode", "monolith", "kv_worker"))

# Small and fast on 2 cores: no torch.compile, a small KV cache.
CPU_ENGINE = {"max-model-len": 1024, "enforce-eager": True}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


# Set by tests/conftest.py before each test: whether it is marked e2e (may start vLLM).
RUNNING_E2E = False


def allow_vllm() -> None:
    """For bench/ scripts: they start vLLM on purpose (the guard below is for the fast test tier)."""
    global RUNNING_E2E
    RUNNING_E2E = True


def _refuse_vllm_outside_e2e(model: Any) -> None:
    """A topology of a real model folder starts vLLM: only an e2e test may (see tests/conftest.py)."""
    if not RUNNING_E2E and isinstance(model, str) and (Path(model) / "config.json").exists():
        raise AssertionError(f"this test starts vLLM on {model} but is not in the e2e tier: take the model "
                             "from the tiny_model or demo_model fixture, which marks it e2e")


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "the condition", every: float = 0.1,
               alive: subprocess.Popen[Any] | None = None) -> Any:
    """The one way a test waits: poll `cond()` until it returns something true, and return that. An
    exception counts as not yet (the last one is shown if time runs out). `alive`: a process whose exit
    fails the wait at once. Measure the time around it where the wait's length is the result."""
    t0 = time.monotonic()
    error: Exception | None = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            error = exc
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {alive.returncode} first")
        if time.monotonic() - t0 >= timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}" + (f" (last error: {error!r})" if error else ""))
        time.sleep(every)


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "the condition", every: float = 0.02
                ) -> Any:
    """wait_until inside an event loop: `cond()` may return a coroutine (awaited), and the loop runs on."""
    t0 = time.monotonic()
    error: Exception | None = None
    while True:
        try:
            value = cond()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except Exception as exc:
            error = exc
        if time.monotonic() - t0 >= timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}" + (f" (last error: {error!r})" if error else ""))
        await asyncio.sleep(every)


def worker(name: str, kind: Kind, **fields: Any) -> dict[str, Any]:
    """A topology's `workers:` entry of `kind` (a row of workers.kinds.KINDS, never its name typed out)."""
    return {"name": name, "kind": kind.name, **fields}


def metric(port: int, name: str) -> dict[str, float]:
    """The samples of one Prometheus metric served on 127.0.0.1:`port`: label text (`worker="a"`, or ""
    without labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1) or "": float(m.group(2))
            for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M)}


@dataclass
class Services:
    etcd: str
    nats: str
    env: dict[str, str]


def launcher(args: list[str], env: dict[str, str], timeout: float = 600, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
    if args[:1] == ["up"] and len(args) > 1 and Path(ROOT, args[1]).is_file():
        with contextlib.suppress(yaml.YAMLError, AttributeError):
            _refuse_vllm_outside_e2e(yaml.safe_load(Path(ROOT, args[1]).read_text()).get("model"))
    try:
        proc = subprocess.run([*LAUNCHER, *args], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        if args[:1] == ["up"]:  # a worker in a crash loop keeps `up` waiting: the supervisor runs on
            raise AssertionError(f"launcher {' '.join(args)} did not return within {timeout:g} s"
                                 f"{_down_after_failed_up(args, env)}") from None
        raise
    if check and proc.returncode != 0:
        said = _down_after_failed_up(args, env) if args[:1] == ["up"] else ""
        raise AssertionError(f"launcher {' '.join(args)} exited {proc.returncode}{said}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _down_after_failed_up(up_args: list[str], env: dict[str, str]) -> str:
    """A failed `up` leaves what did start running (for `launcher logs`, as docker compose does): a test
    that stops on it must not leave that deployment behind for the next tests, or a host's next user.
    Returns what to add to the failure's message when `down` itself failed."""
    paths = [a for a in up_args[1:] if not a.startswith("-") and Path(ROOT, a).is_file()]
    host = up_args[up_args.index("--host") + 1] if "--host" in up_args[:-1] else None
    try:
        name = str(yaml.safe_load(Path(ROOT, paths[0]).read_text())["name"])
        down = subprocess.run([*LAUNCHER, "down", name, *(["--host", host] if host else [])],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=180, cwd=ROOT)
    except (IndexError, OSError, yaml.YAMLError, KeyError, TypeError, subprocess.TimeoutExpired) as exc:
        return f" (and taking it down failed: {exc!r})"
    if down.returncode == 0:
        return ""
    return f" (and `launcher down {name}` exited {down.returncode}: {down.stderr[-500:]})"


def write_topology(path: Path, topo: dict[str, Any]) -> Path:
    # Metrics ports of its own: the default ones (9400...) may be held by a deployment left running on
    # this host, e.g. the demo, which README runs just before the tests.
    _refuse_vllm_outside_e2e(topo.get("model"))
    topo.setdefault("metrics_port_base", free_port_block(16))
    if topo.get("model") == str(TINY_MODEL):
        # vLLM 0.32's CPU build kills its engine core at the first request of this random model in
        # bfloat16 on CPUs with AMX (seen 2026-12-05; fine with AVX512-BF16 alone), and the plan picks
        # bfloat16 on every CPU with native bf16. The tiny model's tests are about the launcher, not the
        # dtype: they pin float32, which runs on every CPU. The bfloat16 choice itself is exercised by
        # the SmolLM2 tests (the plan's pick on such CPUs) and tests/test_cpu_dtype.py.
        topo["engine"] = {"dtype": "float32", **topo.get("engine", {})}
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


@dataclass
class Deployment:
    name: str
    namespace: str
    topology: Path
    env: dict[str, str]
    services: Services

    def status(self) -> dict[str, Any]:
        return json.loads(launcher(["status", self.name, "--json"], self.env).stdout)

    def process(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["processes"] if p["name"] == name)

    def down(self) -> subprocess.CompletedProcess[str]:
        return launcher(["down", self.name], self.env)

    def ask(self, request: GenerateRequest, component: str = MONOLITH.component, idle_timeout: float = 10.0
            ) -> list[Annotated]:
        return asyncio.run(ask(self.services.nats, self.namespace, component, request, idle_timeout))


async def ask(nats: str, namespace: str, component: str, request: GenerateRequest,
              idle_timeout: float = 10.0) -> list[Annotated]:
    nc = await requestplane.connect(nats, "test-client")
    try:
        subject = requestplane.endpoint_subject(namespace, component, "generate")
        return [item async for item in generate(nc, subject, request, idle_timeout)]
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def served(nc: Any, subject: str, handler: requestplane.Handler) -> AsyncIterator[requestplane.EndpointServer]:
    """`handler` (a RouterService's `generate`, say) served on `subject` as its process would serve it."""
    server = requestplane.EndpointServer(nc, subject, f"{subject}.1", handler)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def chunks_via(nc: Any, subject: str, request: dict[str, Any], idle_timeout: float = 5.0
                     ) -> tuple[list[dict[str, Any]], Annotated | None]:
    """What a caller of `subject` gets: the data chunks, and the error that ended the stream (None: none)."""
    chunks: list[dict[str, Any]] = []
    async for item in requestplane.stream(nc, subject, request, idle_timeout):
        if item.is_error():
            return chunks, item
        chunks.append(item.data)
    return chunks, None


def raw_chunks(nats: str, namespace: str, component: str, request: GenerateRequest) -> list[Annotated]:
    """The worker's own chunks (text deltas, counts), not the client's accumulated text."""

    async def run() -> list[Annotated]:
        nc = await requestplane.connect(nats, "test-client")
        try:
            subject = requestplane.endpoint_subject(namespace, component, "generate")
            return [a async for a in requestplane.stream(nc, subject, request.model_dump(exclude_none=True), 10)]
        finally:
            await nc.close()

    return asyncio.run(run())


def up(tmp: Path, topo: dict[str, Any], services: Services, extra_args: list[str] | None = None,
       timeout: float = 600) -> Deployment:
    path = write_topology(tmp / f"{topo['name']}.yaml", topo)
    launcher(["up", str(path), *(extra_args or [])], services.env, timeout=timeout)
    return Deployment(topo["name"], topo.get("namespace", topo["name"]), path, services.env, services)
