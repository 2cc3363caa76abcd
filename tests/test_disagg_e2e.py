"""Disaggregated serving on real vLLM (CPU), real etcd and nats-server: prefill and decode workers
handing the KV cache over through ExampleConnector's shared storage.

What a user checks: the disaggregated deployment answers like a monolithic worker (same text under
greedy decoding), the prompt's KV really came from the prefill worker (the decode worker reports the
prompt tokens as cached), two prefill workers both take work, and a prefill worker that dies
mid-run costs no client a hang. The pool's bookkeeping has plain unit tests at the end.

Deployments are class-scoped so only one runs at a time (the machine has 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from launcher.services import free_port
from tests.helpers import (
    CPU_ENGINE,
    CPU_ENV,
    DECODE,
    MONOLITH,
    PREFILL,
    ROOT,
    Deployment,
    Services,
    launcher,
    metric,
    raw_chunks,
    until,
    up,
)
from workers.common.protocol import GenerateRequest
from workers.disaggregated.decode_worker import LOCAL, prefill_request
from workers.disaggregated.kvconfig import adapt_argv
from workers.disaggregated.prefill_pool import PrefillPool
from workers.disaggregated.shared_storage import SharedStorage, prompt_folder
from workers.runtime import requestplane
from workers.runtime.annotated import Annotated
from workers.runtime.registry import Registration

# Long enough that several whole KV blocks cross (ExampleConnector moves whole blocks only).
FILLER = ("The museum's archive lists paintings, letters, maps and coins collected over two centuries by "
          "travellers, merchants and scholars, each catalogued with its origin, date and condition. ") * 4
QUESTIONS = ["what is the capital of france?", "name three primary colours.", "what does a bee make?"]


def kv(role: str, rank: int, size: int) -> dict[str, Any]:
    return {"kv_connector": "ExampleConnector", "kv_role": role, "kv_rank": rank, "kv_parallel_size": size}


def chat(question: str, max_tokens: int = 24) -> GenerateRequest:
    """The question first: ExampleConnector (and the prefix cache) key on the prompt's leading blocks,
    so prompts must differ there for each to be new to every engine."""
    return GenerateRequest(messages=[{"role": "user", "content": f"{question}\n\nContext: {FILLER}"}],
                           sampling={"max_tokens": max_tokens, "temperature": 0})


def final_of(items: list[Annotated]) -> tuple[str, dict[str, Any]]:
    """(whole text, last data chunk) of a raw worker stream; fails on an error item."""
    assert items and not any(i.is_error() for i in items), [i for i in items if i.is_error()]
    chunks = [i.data for i in items if isinstance(i.data, dict)]
    return "".join(c.get("text", "") for c in chunks), chunks[-1]


@pytest.fixture(scope="class")
def pd(tmp_path_factory: pytest.TempPathFactory, services: Services, demo_model: Path) -> Iterator[Deployment]:
    """1P1D of the demo model plus a monolithic worker of the same model, in one deployment."""
    topo = {
        # float32: in bfloat16, the KV loaded from the prefill and the one a monolith computes itself come
        # from differently chunked passes, and a near-tie between two tokens can flip a greedy pick.
        "name": "pd-1p1d", "model": str(demo_model), "engine": {**CPU_ENGINE, "dtype": "float32"}, "env": CPU_ENV,
        "workers": [
            # restart never: the kill test below wants the prefill worker to stay dead.
            {"name": "prefill", "kind": PREFILL.name, "kv_transfer": kv("kv_producer", 0, 2), "ready_timeout": 300,
             "restart": {"policy": "never"}, "metrics_port": free_port()},
            {"name": "decode", "kind": DECODE.name, "kv_transfer": kv("kv_consumer", 1, 2), "ready_timeout": 300},
            {"name": "vllm", "kind": MONOLITH.name, "ready_timeout": 300},
        ],
    }
    dep = up(tmp_path_factory.mktemp("pd"), topo, services)
    yield dep
    dep.down()


class TestOnePrefillOneDecode:
    def test_every_process_ready_and_registered(self, pd: Deployment) -> None:
        procs = {p["name"]: p for p in pd.status()["processes"]}
        assert set(procs) == {"prefill", "decode", "vllm"}
        assert all(p["state"] == "ready" and p["registered"] for p in procs.values()), procs

    def test_same_text_as_monolith_and_the_kv_crossed(self, pd: Deployment) -> None:
        for question in QUESTIONS:
            req = chat(question)
            mono_text, mono_final = final_of(raw_chunks(pd.services.nats, pd.namespace, MONOLITH.component, req))
            pd_text, pd_final = final_of(raw_chunks(pd.services.nats, pd.namespace, DECODE.component, req))
            assert pd_text == mono_text, question
            assert pd_final["prefill_worker"] == "prefill"
            # The decode worker computed only the prompt's tail: the rest was loaded from the prefill's KV.
            assert mono_final["cached_tokens"] == 0
            assert pd_final["cached_tokens"] >= pd_final["prompt_tokens"] // 2 > 0, pd_final
        run_dir = Path(pd.status()["run_dir"])
        assert list((run_dir / "kv").glob("*/*.safetensors")), "the prefill worker wrote no KV under <run_dir>/kv"

    def test_client_cli_talks_to_the_decode_component(self, pd: Deployment) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "workers.common.client", "--component", "decode", "--chat", "--prompt",
             "what is the capital of france?", "--max-tokens", "24", "--namespace", pd.namespace, "--quiet"],
            env={**os.environ, **pd.env}, capture_output=True, text=True, timeout=180, cwd=ROOT)
        assert out.returncode == 0, out.stderr + out.stdout
        assert "Paris" in out.stdout

    def test_prefill_killed_mid_run_no_request_hangs(self, pd: Deployment) -> None:
        """Runs last in this class: the prefill worker is killed while it has requests, and stays dead."""
        prefill = psutil.Process(pd.process("prefill")["pid"])
        port = next(w["metrics_port"] for w in yaml.safe_load(pd.topology.read_text())["workers"]
                    if w["name"] == "prefill")

        def prefill_took_prompts() -> bool:
            in_flight = sum(sum(metric(port, m).values()) for m in ("vllm:num_requests_running",
                                                                     "vllm:num_requests_waiting"))
            return in_flight > 0 or sum(metric(port, "vllm:prompt_tokens_total").values()) > 0
        tree = [prefill, *prefill.children(recursive=True)]
        reqs = [chat(f"question {k}: what is {k} plus {k}?", max_tokens=16) for k in range(6)]

        async def one(nc: requestplane.NATS, req: GenerateRequest) -> list[Annotated]:
            subject = requestplane.endpoint_subject(pd.namespace, DECODE.component, DECODE.endpoint)
            return [a async for a in requestplane.stream(nc, subject, req.model_dump(exclude_none=True), 10)]

        async def run() -> list[list[Annotated]]:
            nc = await requestplane.connect(pd.services.nats, "test")
            try:
                tasks = [asyncio.create_task(one(nc, r)) for r in reqs]
                await until(lambda: asyncio.to_thread(prefill_took_prompts), 120,
                            "the prefill worker to take the first prompts", every=0.05)
                for proc in tree:
                    proc.send_signal(signal.SIGKILL)
                # A guard against a hang, far above any healthy run; not a timing claim.
                return await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
            finally:
                await nc.close()

        results = asyncio.run(run())
        # Every stream ended (no hang); the decode worker prefilled locally where the prefill died, so
        # none of them even needed to fail (an error would at least have to say why).
        for items in results:
            errors = [e.comment for e in items if e.is_error()]
            assert not errors, errors
            _, final = final_of(items)
            assert final["finish_reason"] and final["prefill_worker"] in ("prefill", LOCAL)
        # With the prefill worker gone, new requests are prefilled on the decode worker.
        _, final = final_of(raw_chunks(pd.services.nats, pd.namespace, DECODE.component, chat("after the kill?")))
        assert final["prefill_worker"] == LOCAL
        log = launcher(["logs", "decode", "--deployment", pd.name, "-n", "400"], pd.env).stdout
        assert "prefilling locally" in log


@pytest.fixture(scope="class")
def pd2(tmp_path_factory: pytest.TempPathFactory, services: Services, tiny_model: Path) -> Iterator[Deployment]:
    """2P1D of the tiny model: prefill-1 and prefill-2 (replicas) feed one decode worker."""
    topo = {
        "name": "pd-2p1d", "model": str(tiny_model), "engine": CPU_ENGINE, "env": CPU_ENV,
        "workers": [
            {"name": "prefill", "kind": PREFILL.name, "replicas": 2, "kv_transfer": kv("kv_producer", 0, 3),
             "ready_timeout": 300},
            {"name": "decode", "kind": DECODE.name, "kv_transfer": kv("kv_consumer", 2, 3), "ready_timeout": 300},
        ],
    }
    dep = up(tmp_path_factory.mktemp("pd2"), topo, services)
    yield dep
    dep.down()


class TestTwoPrefillOneDecode:
    def test_both_prefill_workers_take_requests(self, pd2: Deployment) -> None:
        used = []
        for k in range(4):
            req = GenerateRequest(prompt=f"{k} " + FILLER, sampling={"max_tokens": 8, "temperature": 0})
            _, final = final_of(raw_chunks(pd2.services.nats, pd2.namespace, DECODE.component, req))
            assert final["cached_tokens"] > 0, final
            used.append(final["prefill_worker"])
        assert set(used) == {"prefill-1", "prefill-2"}, used


# The pool's bookkeeping, without vLLM.

def _reg(name: str, lease: int) -> Registration:
    return Registration(namespace="ns", component="prefill", endpoint="generate", subject="ns.prefill.generate",
                        lease_id=lease, process=name)


def test_pool_picks_least_outstanding_then_least_sent() -> None:
    pool = PrefillPool()
    pool.put("a", _reg("a", 1))
    pool.put("b", _reg("b", 2))
    first = pool.pick()
    assert first is not None
    with pool.lease(first):
        second = pool.pick()
        assert second is not None and second.key != first.key  # the busy one is avoided
    third = pool.pick()
    assert third is not None and third.key == second.key  # idle again: fewest sent so far wins
    assert first.subject == "ns.prefill.generate.1" and first.in_flight == 0


def test_pool_sets_a_failed_instance_aside_until_it_registers_again() -> None:
    pool = PrefillPool()
    pool.put("a", _reg("a", 1))
    inst = pool.pick()
    assert inst is not None
    pool.mark_failed(inst, "went silent")
    assert pool.pick() is None
    pool.put("a", _reg("a", 1))
    assert pool.pick() is not None
    pool.delete("a")
    assert pool.pick() is None


def test_prefill_request_asks_for_one_token_and_a_remote_decode() -> None:
    req = GenerateRequest(prompt="hi", sampling={"max_tokens": 50, "min_tokens": 5, "temperature": 0})
    sent = prefill_request(req)
    assert sent["sampling"] == {"max_tokens": 1, "temperature": 0}
    assert sent["kv_transfer_params"] == {"do_remote_decode": True}
    assert sent["prompt"] == "hi" and sent["request_id"] != req.request_id


def test_seed_only_kv_fields_are_not_passed_to_vllm() -> None:
    """vLLM V1's KVTransferConfig has no kv_rank / kv_parallel_size / kv_ip and refuses unknown keys."""
    env: dict[str, str] = {}
    config = {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_rank": 0, "kv_parallel_size": 2,
              "kv_ip": "10.0.0.5", "kv_port": 5700}
    argv = adapt_argv(["--model", "m", "--kv-transfer-config", json.dumps(config)], env)
    assert json.loads(argv[3]) == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_port": 5700}
    assert env == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.5", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5700"}
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_consumer", "kv_rank": 1}
    argv = adapt_argv([f"--kv-transfer-config={json.dumps(example)}"], env)
    assert json.loads(argv[0].split("=", 1)[1]) == {"kv_connector": "ExampleConnector", "kv_role": "kv_consumer"}


def test_a_failed_prefills_partial_kv_folder_is_discarded(tmp_path: Path) -> None:
    """A folder named as ExampleConnector names it is removed; prompts shorter than a block have none."""
    storage = SharedStorage(str(tmp_path), block_size=16)
    ids = list(range(100, 160))
    folder = prompt_folder(str(tmp_path), ids, 16)
    folder.mkdir()
    (folder / "model.layers.0.self_attn.attn.safetensors").write_bytes(b"partial")
    assert storage.discard(ids) and not folder.exists()
    assert not storage.discard(ids)
    assert not storage.discard([1, 2, 3])
