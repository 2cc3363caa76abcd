"""Device and naming rules (disaggregation rules: test_rules_disagg.py; KV router: test_indexer/e2e)."""

from __future__ import annotations

from pathlib import Path

from launcher import plan, rules
from launcher.topology import load_topology


def check(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    topo, loaded = load_topology(path)
    return [p.render(loaded) for p in rules.check(topo)]


def test_clean_topology_has_no_problem(tmp_path: Path) -> None:
    assert check(tmp_path, """\
name: t
model: m
workers:
  - {name: a, gpus: [0, 1], engine: {tensor-parallel-size: 2}}
  - {name: b, gpus: [2]}
""") == []


def test_gpu_given_twice(tmp_path: Path) -> None:
    out = check(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: a, gpus: [0]}\n  - {name: b, gpus: [0]}\n")
    assert len(out) == 1 and "GPU 0 is already given to 'a'" in out[0] and ":5:" in out[0]


def test_gpu_count_must_match_tp_times_pp(tmp_path: Path) -> None:
    out = check(tmp_path, """\
name: t
model: m
engine: {pipeline-parallel-size: 2}
workers:
  - name: a
    gpus: [0, 1]
    engine: {tensor_parallel_size: 2}
""")
    assert len(out) == 1
    assert "2 GPU(s) given but 1 replica(s) x tensor-parallel-size 2 x pipeline-parallel-size 2 need 4" in out[0]
    assert ":6:" in out[0]


def test_same_gpu_on_different_hosts_is_fine(tmp_path: Path) -> None:
    assert check(tmp_path, "name: t\nmodel: m\nservices: {managed: never}\n"
                           "workers:\n  - {name: a, gpus: [0], host: h1}\n"
                           "  - {name: b, gpus: [0], host: h2}\n") == []


def test_replicas_need_gpus_for_each(tmp_path: Path) -> None:
    out = check(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: v, replicas: 3, gpus: [0, 1]}\n")
    assert "3 replica(s)" in out[0] and "need 3" in out[0]


def test_duplicate_names(tmp_path: Path) -> None:
    out = check(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: a}\n  - {name: a}\n")
    assert "name 'a' is used twice" in out[0]


def test_cpu_core_given_twice_and_rank_sets(tmp_path: Path) -> None:
    out = check(tmp_path, """\
name: t
model: m
workers:
  - {name: a, cpus: "0-1"}
  - {name: b, cpus: "1", engine: {tensor-parallel-size: 2}}
""")
    assert any("core 1 is already given to 'a'" in p for p in out)
    assert any("1 core set(s) given for tensor-parallel-size x pipeline-parallel-size = 2" in p for p in out)


def test_parse_cpu_set() -> None:
    assert rules.parse_cpu_set("0-3") == {0, 1, 2, 3}
    assert rules.parse_cpu_set("0|1") == {0, 1}
    assert rules.parse_cpu_set("0,2-3") == {0, 2, 3}


def test_port_clash_names_the_port(tmp_path: Path) -> None:
    problems = check(tmp_path, """\
name: clash
model: m
workers:
  - {name: w, metrics_port: 8000}
frontends:
  - {name: web, port: 8000}
""")
    assert any("port 8000" in p and "frontends[0].port" in p for p in problems), problems


def test_frontend_needs_something_to_call(tmp_path: Path) -> None:
    problems = check(tmp_path, """\
name: lonely
model: m
workers:
  - {name: p, kind: prefill, kv_transfer: {kv_connector: ExampleConnector, kv_role: kv_producer}}
frontends:
  - {name: web}
""")
    assert any("frontend needs something to call" in p for p in problems), problems


def test_each_model_of_several_needs_its_own_way_in(tmp_path: Path) -> None:
    """A worker's `model:` makes a second model: its decode needs a prefill of its model, its kv_workers a
    router of its model, and a router needs kv_workers of its model (each pairs only within its model)."""
    out = check(tmp_path, """\
name: t
model: a
workers:
  - {name: p, kind: prefill, gpus: [0], kv_transfer: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: d, kind: decode, gpus: [1], kv_transfer: {kv_connector: NixlConnector, kv_role: kv_consumer}}
  - {name: d2, kind: decode, gpus: [2], model: b, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_consumer}}
  - {name: k, kind: kv_worker, gpus: [3], model: c}
routers:
  - {name: r, model: a}
""")
    assert any(":6:" in o and "model b has a decode worker but no prefill worker" in o for o in out), out
    assert any(":7:" in o and "model c has kv_worker processes but no router of its own" in o for o in out), out
    assert any(":9:" in o and "router 'r' serves a, and no kv_worker loads it" in o for o in out), out
    fixed = check(tmp_path, """\
name: t
model: a
workers:
  - {name: p, kind: prefill, gpus: [0], kv_transfer: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: d, kind: decode, gpus: [1], kv_transfer: {kv_connector: NixlConnector, kv_role: kv_consumer}}
  - {name: p2, kind: prefill, gpus: [2], model: b, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: d2, kind: decode, gpus: [3], model: b, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_consumer}}
  - {name: k, kind: kv_worker, gpus: [4], model: c}
routers:
  - {name: r, model: c}
""")
    assert fixed == [], fixed


def test_two_models_may_not_share_a_served_name_and_the_topologys_model_must_be_loaded(tmp_path: Path) -> None:
    out = check(tmp_path, """\
name: t
model: a
workers:
  - {name: one, gpus: [0], engine: {served-model-name: chat}}
  - {name: two, gpus: [1], model: b, engine: {served-model-name: chat}}
frontends: [{name: f}]
""")
    assert len(out) == 1 and ":5:" in out[0] and "the name 'one' serves a by" in out[0], out
    out = check(tmp_path, """\
name: t
model: a
workers:
  - {name: one, gpus: [0], model: b}
frontends: [{name: f}]
""")
    assert len(out) == 1 and ":2:" in out[0] and "no worker loads the topology's model a" in out[0], out


def test_each_models_kv_workers_and_router_have_their_own_block_size(tmp_path: Path) -> None:
    text = """\
name: t
model: a
workers:
  - {name: ka, kind: kv_worker, gpus: [0], engine: {block-size: 16}}
  - {name: kb, kind: kv_worker, gpus: [1], model: b, engine: {block-size: 32}}
routers:
  - {name: ra}
  - {name: rb, model: b}
"""
    assert check(tmp_path, text) == []
    path = tmp_path / "t.yaml"
    topo, _ = load_topology(path)
    argv = {p.name: p.argv for p in plan.build_plan(topo)}
    assert [argv[r][argv[r].index("--block-size") + 1] for r in ("ra", "rb")] == ["16", "32"]


def test_data_parallel_is_refused_for_replicas(tmp_path: Path) -> None:
    """vLLM's in-process data parallelism would start engines the GPU count, the metrics port and the KV
    router's events do not know about: refused at its line, with what to write instead."""
    out = check(tmp_path, """\
name: t
model: m
workers:
  - name: a
    gpus: [0]
    engine: {data-parallel-size: 2}
""")
    assert len(out) == 1 and "data-parallel-size 2" in out[0] and "replicas: 2" in out[0] and ":6:" in out[0]
    assert check(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: a, engine: {data-parallel-size: 1}}\n") == []
