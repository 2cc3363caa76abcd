"""Disaggregation rules: each wrong topology is refused with the file:line of the field to fix.

Every case is the CPU 1P1D twin with one mistake; the checks run the real `launcher validate`
once (exit code and printed location) and launcher.rules.check for the rest (fast, no subprocess).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher import rules
from launcher.plan import build_plan
from launcher.resolve import resolve
from launcher.topology import load_topology
from tests.helpers import DECODE, PREFILL, ROOT, launcher, write_topology

TOPOLOGIES = ROOT / "topologies"


def base() -> dict[str, Any]:
    return {
        "name": "pd",
        "model": "m",
        "engine": {"enforce-eager": True},
        "workers": [
            {"name": "prefill", "kind": PREFILL.name, "gpus": [0],
             "kv_transfer": {"kv_connector": "NixlConnector", "kv_role": "kv_producer",
                             "kv_rank": 0, "kv_parallel_size": 2}},
            {"name": "decode", "kind": DECODE.name, "gpus": [1, 2], "engine": {"tensor-parallel-size": 2},
             "kv_transfer": {"kv_connector": "NixlConnector", "kv_role": "kv_consumer",
                             "kv_rank": 1, "kv_parallel_size": 2}},
        ],
    }


class _FlowListDumper(yaml.SafeDumper):
    """Lists of scalars inline (`gpus: [0, 1]`), the rest as blocks: each field on its own line."""


_FlowListDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, (dict, list)) for x in v)))


def problems_of(tmp_path: Path, topo: dict[str, Any]) -> list[str]:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.dump(topo, Dumper=_FlowListDumper, sort_keys=False))
    parsed, loaded = load_topology(path)
    return [p.render(loaded) for p in rules.check(parsed)]


def line_of(tmp_path: Path, problem: str) -> int:
    m = re.match(rf"{re.escape(str(tmp_path / 't.yaml'))}:(\d+):\d+: ", problem)
    assert m, f"no file:line in {problem!r}"
    return int(m.group(1))


def yaml_line(tmp_path: Path, needle: str) -> int:
    """1-based line of the first line of the written topology that contains `needle`."""
    lines = (tmp_path / "t.yaml").read_text().splitlines()
    return next(i for i, ln in enumerate(lines, 1) if needle in ln)


def test_seed_layout_and_cpu_twins_are_valid() -> None:
    for name in ("disagg", "cpu-disagg-1p1d", "cpu-disagg-2p1d"):
        topo, _ = load_topology(TOPOLOGIES / f"{name}.yaml")
        assert rules.check(topo) == [], name


def test_seed_layout_is_the_seeds() -> None:
    topo, _ = load_topology(TOPOLOGIES / "disagg.yaml")
    prefill, decode = topo.workers
    engines = resolve(topo).engines
    assert (prefill.gpus, engines[topo.workers.index(prefill)].tensor_parallel_size) == ([0], 1)
    assert (decode.gpus, engines[topo.workers.index(decode)].tensor_parallel_size) == ([1, 2], 2)
    assert prefill.kv_transfer and decode.kv_transfer
    assert (prefill.kv_transfer.kv_connector, prefill.kv_transfer.kv_role, prefill.kv_transfer.kv_rank) == (
        "NixlConnector", "kv_producer", 0)
    assert (decode.kv_transfer.kv_role, decode.kv_transfer.kv_rank, decode.kv_transfer.kv_parallel_size) == (
        "kv_consumer", 1, 2)
    assert topo.model == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert topo.engine.flags() == {"max-model-len": 100, "enforce-eager": True}


def test_base_is_valid(tmp_path: Path) -> None:
    assert problems_of(tmp_path, base()) == []


def test_pynccl_connector_is_refused_naming_its_replacement_via_cli(tmp_path: Path) -> None:
    topo = base()
    for w in topo["workers"]:
        w["kv_transfer"]["kv_connector"] = "PyNcclConnector"
    path = write_topology(tmp_path / "t.yaml", topo)
    proc = launcher(["validate", str(path)], {}, check=False, timeout=120)
    assert proc.returncode == 2
    out = proc.stderr
    assert "PyNcclConnector was removed" in out and "NixlConnector" in out and "ExampleConnector" in out
    line = yaml_line(tmp_path, "kv_connector: PyNcclConnector")
    assert f"{path}:{line}:" in out


def test_unknown_connector_lists_the_installed_ones(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][0]["kv_transfer"]["kv_connector"] = "NoSuchConnector"
    found = problems_of(tmp_path, topo)
    if rules.installed_connectors() is None:
        pytest.skip("vLLM is not importable here: the installed-connector check cannot run")
    assert len(found) == 1 and "no connector 'NoSuchConnector'" in found[0] and "NixlConnector" in found[0]


def _one(tmp_path: Path, topo: dict[str, Any], needle: str, text: str) -> None:
    """Exactly one problem, containing `text`, at the line of the written topology holding `needle`."""
    found = problems_of(tmp_path, topo)
    assert len(found) == 1, found
    assert text in found[0], found[0]
    assert line_of(tmp_path, found[0]) == yaml_line(tmp_path, needle), found[0]


def test_producer_rank_must_be_lower_than_consumer(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][0]["kv_transfer"]["kv_rank"] = 1
    topo["workers"][1]["kv_transfer"]["kv_rank"] = 0
    found = problems_of(tmp_path, topo)
    assert any("give producers the lower ranks" in p for p in found), found


def test_same_role_same_tp(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][1]["kv_transfer"]["kv_parallel_size"] = 3
    topo["workers"][0]["kv_transfer"]["kv_parallel_size"] = 3
    extra = copy.deepcopy(topo["workers"][1])
    extra.update(name="decode2", gpus=[3], engine={"tensor-parallel-size": 1})
    extra["kv_transfer"]["kv_rank"] = 2
    topo["workers"].append(extra)
    found = problems_of(tmp_path, topo)
    assert len(found) == 1, found
    assert "instances of one kv_role need the same TP size" in found[0]
    assert line_of(tmp_path, found[0]) == yaml_line(tmp_path, "tensor-parallel-size: 1")


def test_pipeline_parallel_is_refused(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][0]["engine"] = {"pipeline-parallel-size": 2}
    topo["workers"][0]["gpus"] = [0, 3]
    _one(tmp_path, topo, "pipeline-parallel-size: 2", "pipeline-parallel-size must be 1")


def test_kv_ranks_unique(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][0]["kv_transfer"]["kv_rank"] = 1
    found = problems_of(tmp_path, topo)
    assert any("kv_ranks are unique" in p for p in found), found
    hit = next(p for p in found if "kv_ranks are unique" in p)
    assert "kv_rank 1 is already 'prefill's" in hit
    lines = (tmp_path / "t.yaml").read_text().splitlines()
    decode_rank_line = [i for i, ln in enumerate(lines, 1) if "kv_rank: 1" in ln][1]
    assert line_of(tmp_path, hit) == decode_rank_line


def test_kv_rank_below_parallel_size(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][1]["kv_transfer"]["kv_rank"] = 2
    _one(tmp_path, topo, "kv_rank: 2", "is not below kv_parallel_size 2")


def test_kv_parallel_size_equals_instances(tmp_path: Path) -> None:
    topo = base()
    for w in topo["workers"]:
        w["kv_transfer"]["kv_parallel_size"] = 3
    found = problems_of(tmp_path, topo)
    assert len(found) == 2, found  # one per worker that states it
    assert all("kv_parallel_size is 3 but the topology has 2 kv instance(s)" in p for p in found)


def test_kv_parallel_size_counts_replicas_once_per_worker(tmp_path: Path) -> None:
    """replicas: 2 is two kv instances, and a wrong size is reported once for the worker, not per replica."""
    topo = base()
    topo["workers"][0].update(replicas=2, gpus=[0, 3])
    topo["workers"][1]["kv_transfer"]["kv_rank"] = 2
    found = problems_of(tmp_path, topo)
    sizes = [p for p in found if "kv_parallel_size is 2 but the topology has 3 kv instance(s)" in p]
    assert len(sizes) == 2, found
    assert any("kv_rank 2 is not below kv_parallel_size 2" in p for p in found), found


def test_different_hosts_need_kv_ip_and_port(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][0]["host"] = "node-a"
    topo["workers"][1]["host"] = "node-b"
    topo["services"] = {"etcd": "http://10.0.0.9:2379", "nats": "nats://10.0.0.9:4222"}  # not loopback
    found = problems_of(tmp_path, topo)
    assert len(found) == 2 and all("give kv_ip and kv_port" in p for p in found), found
    for w in topo["workers"]:
        w["kv_transfer"].update(kv_ip="10.0.0.1", kv_port=14579)
    assert problems_of(tmp_path, topo) == []


def test_gpus_per_worker_is_tp_times_pp(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][1]["gpus"] = [1]
    _one(tmp_path, topo, "gpus: [1]", "need 2")


def test_gpu_given_twice(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][1]["gpus"] = [0, 1]
    _one(tmp_path, topo, "gpus: [0, 1]", "GPU 0 is already given to 'prefill'")


def test_prefill_needs_kv_transfer(tmp_path: Path) -> None:
    topo = base()
    del topo["workers"][0]["kv_transfer"]
    topo["workers"][1]["kv_transfer"]["kv_parallel_size"] = 1
    topo["workers"][1]["kv_transfer"]["kv_rank"] = 0
    _one(tmp_path, topo, "kind: prefill", "a prefill worker needs kv_transfer")


def test_roles_match_kinds(tmp_path: Path) -> None:
    topo = base()
    topo["workers"][1]["kv_transfer"]["kv_role"] = "kv_producer"
    found = problems_of(tmp_path, topo)
    assert any("a decode worker consumes KV" in p for p in found), found


def test_plan_fills_in_the_shared_storage_folder(tmp_path: Path) -> None:
    """ExampleConnector with no shared_storage_path gets the deployment's own folder, the same for P and D."""
    topo, _ = load_topology(TOPOLOGIES / "cpu-disagg-2p1d.yaml")
    specs = [s for s in build_plan(topo, kv_dir=tmp_path / "kv") if "--kv-transfer-config" in s.argv]
    configs = [yaml.safe_load(s.argv[s.argv.index("--kv-transfer-config") + 1]) for s in specs]
    assert [c["kv_connector_extra_config"]["shared_storage_path"] for c in configs] == [str(tmp_path / "kv")] * 3
    assert [c["kv_rank"] for c in configs] == [0, 1, 2]
    given = base()
    for w in given["workers"]:
        w["kv_transfer"].update(kv_connector="ExampleConnector",
                                kv_connector_extra_config={"shared_storage_path": "/mnt/kv"})
    path = write_topology(tmp_path / "given.yaml", given)
    specs = build_plan(load_topology(path)[0], kv_dir=tmp_path / "kv")
    for s in specs:
        assert "/mnt/kv" in s.argv[s.argv.index("--kv-transfer-config") + 1]
