"""End to end: two real vLLM CPU kv workers behind real KV routers, started by the launcher.

One deployment for the module (vLLM start-up is the expensive part): workers a and b, and three
routers reading the same KV events, one per strategy, each serving its own component. A user
checks the routing decision the router attaches to the last chunk (`routing`), and vLLM's own
count of prompt tokens served from its prefix cache (`cached_tokens`). What a router's index holds is
read from its metrics (`vllm_launcher_router_indexed_blocks`), so the tests wait for the KV events to
arrive instead of sleeping.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launcher.services import free_ports
from tests.helpers import CPU_ENGINE, CPU_ENV, Deployment, Services, metric, raw_chunks, up, wait_until, worker
from workers.common.protocol import GenerateRequest
from workers.kinds import KINDS
from workers.runtime.registry import Registration, Registry

BLOCK = 32
ROUTER, KV_WORKER = KINDS["router"], KINDS["kv_worker"]
COMPONENTS = {"prefix": ROUTER.component, "round_robin": f"{ROUTER.component}_rr",
              "random": f"{ROUTER.component}_random"}
METRICS = dict(zip(COMPONENTS, free_ports(len(COMPONENTS)), strict=True))  # each router's Prometheus port


def topology(model: Path) -> dict[str, Any]:
    return {
        "name": "e2e-kv-router",
        "backend": "subprocess",
        "model": str(model),
        "engine": {**CPU_ENGINE, "block-size": BLOCK, "enable-prefix-caching": True},
        "env": CPU_ENV,
        "workers": [
            worker("worker-a", KV_WORKER, cpus="0", ready_timeout=300),
            worker("worker-b", KV_WORKER, cpus="1", ready_timeout=300, restart={"policy": "never"}),
        ],
        "routers": [
            {"name": f"router-{s}", "strategy": s, "args": ["--component", c, "--metrics-port", str(METRICS[s])]}
            for s, c in COMPONENTS.items()
        ],
    }


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, services: Services, tiny_model: Path
               ) -> Iterator[Deployment]:
    d = up(tmp_path_factory.mktemp("kv-router"), topology(tiny_model), services)
    try:
        yield d
    finally:
        d.down()


def send(d: Deployment, strategy: str, prompt: str, max_tokens: int = 4) -> dict[str, Any]:
    """The final chunk of one request (it carries `routing`, `worker`, `cached_tokens`)."""
    req = GenerateRequest(prompt=prompt, sampling={"max_tokens": max_tokens, "temperature": 0.0})
    chunks = raw_chunks(d.services.nats, d.namespace, COMPONENTS[strategy], req)
    errors = [c for c in chunks if c.is_error()]
    assert not errors, errors
    final = chunks[-1].data
    assert "routing" in final, chunks
    return dict(final)


def indexed_blocks(strategy: str) -> dict[str, int]:
    """Worker -> KV blocks the router of `strategy` holds for it in its index (from its metrics)."""
    samples = metric(METRICS[strategy], "vllm_launcher_router_indexed_blocks")
    return {labels.removeprefix('worker="').removesuffix('"'): int(v) for labels, v in samples.items()}


def long_prompt(seed: int) -> str:
    words = [f"w{(seed * 7919 + i * 104729) % 1000}" for i in range(80)]
    return f"document {seed}: " + " ".join(words)


def test_repeated_prompt_goes_to_the_worker_that_cached_it(deployment: Deployment) -> None:
    first = send(deployment, "prefix", long_prompt(1))
    blocks = first["routing"]["blocks"]
    assert blocks >= 4, first["routing"]
    held = first["routing"]["process"]
    wait_until(lambda: indexed_blocks("prefix").get(held, 0) >= blocks, 30,
               "the KV events of the first request to reach the router")
    second = send(deployment, "prefix", long_prompt(1))
    chosen = second["routing"]["process"]
    assert chosen == first["routing"]["process"] == second["worker"], (first["routing"], second["routing"])
    assert second["routing"]["matched_blocks"][chosen] > 0, second["routing"]
    assert second["cached_tokens"] > 0, second  # vLLM itself served the prefix from its cache
    other = next(p for p in second["routing"]["matched_blocks"] if p != chosen)
    assert second["routing"]["matched_blocks"][other] == 0, second["routing"]
    # The router weighs placements against each worker's KV capacity, which the workers registered.
    registered = {r.process: r.extra.get("num_gpu_blocks") for r in _registrations(deployment)}
    assert all(isinstance(n, int) and n > 0 for n in registered.values()), registered
    assert {p: load.get("kv_blocks") for p, load in second["routing"]["load"].items()} == registered
    assert second["routing"]["load"][chosen]["cached_blocks"] >= blocks, second["routing"]


def test_round_robin_alternates(deployment: Deployment) -> None:
    chosen = [send(deployment, "round_robin", f"hello {i}")["routing"]["process"] for i in range(4)]
    assert chosen[0] != chosen[1] and chosen[:2] == chosen[2:], chosen
    assert set(chosen) == {"worker-a", "worker-b"}


def test_random_uses_both_workers(deployment: Deployment) -> None:
    chosen = {send(deployment, "random", f"hi {i}", max_tokens=1)["routing"]["process"] for i in range(16)}
    assert chosen == {"worker-a", "worker-b"}


def _registrations(d: Deployment, component: str = KV_WORKER.component) -> list[Registration]:
    async def run() -> list[Registration]:
        registry = await Registry.connect([d.services.etcd])
        try:
            return await registry.list(d.namespace, component)
        finally:
            await registry.client.close()

    return asyncio.run(run())


def _live_leases(d: Deployment, component: str = KV_WORKER.component) -> set[int]:
    return {r.instance for r in _registrations(d, component)}  # = first lease


def test_restarted_router_rebuilds_its_index_from_worker_snapshots(deployment: Deployment) -> None:
    first = send(deployment, "prefix", long_prompt(7))
    old_leases = _live_leases(deployment, ROUTER.component)
    os.kill(deployment.process("router-prefix")["pid"], signal.SIGKILL)  # the supervisor restarts it
    wait_until(lambda: (lambda leases: leases and not leases & old_leases)(_live_leases(deployment, ROUTER.component)),
               120, "the router to come back under a new lease")
    chosen = first["routing"]["process"]
    # Its resync requests are answered by snapshots on the event subject.
    wait_until(lambda: indexed_blocks("prefix").get(chosen, 0) >= first["routing"]["blocks"], 30,
               "the restarted router's index to hold the worker's snapshot")
    again = send(deployment, "prefix", long_prompt(7))
    assert again["routing"]["process"] == chosen, again["routing"]
    assert again["routing"]["matched_blocks"][chosen] > 0, again["routing"]


def test_killed_worker_is_never_chosen_after_its_lease_is_gone(deployment: Deployment) -> None:
    # Make worker-b hold a prefix first, so the prefix router would want it back.
    b_lease = None
    for i in range(20):
        routing = send(deployment, "round_robin", long_prompt(100 + i))["routing"]
        if routing["process"] == "worker-b":
            b_lease, prompt = int(routing["worker"], 16), long_prompt(100 + i)
            break
    assert b_lease is not None
    os.kill(deployment.process("worker-b")["pid"], signal.SIGKILL)
    # The supervisor revokes a dead process's lease (the TTL is 10 s anyway) ...
    wait_until(lambda: b_lease not in _live_leases(deployment), 30, "worker-b's lease to be gone")
    # ... and every router's etcd watch delivers the delete, which drops the worker from its index.
    wait_until(lambda: all("worker-b" not in indexed_blocks(s) and "worker-a" in indexed_blocks(s) for s in COMPONENTS),
               30, "every router to drop worker-b")
    for strategy in ("prefix", "round_robin", "random"):
        for _ in range(3):
            routing = send(deployment, strategy, prompt, max_tokens=1)["routing"]
            assert routing["process"] == "worker-a", routing
            assert "worker-b" not in routing["matched_blocks"], routing
