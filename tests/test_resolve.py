"""launcher.resolve: one resolved configuration; `args:` read like `engine:`; plan and export agree.

The regressions of each `args:` hole (a typo, a TP that disagrees with the devices, prefix caching
off behind a router, a flag the launcher sets itself) are files in tests/bad_topologies/ (args_*).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from launcher import engine_flags, plan, rules
from launcher.engine_flags import Flag, FlagTable
from launcher.export import kubernetes as k8s
from launcher.resolve import resolve
from launcher.topology import Topology, load_topology
from tests.test_export_kubernetes import argv_of, cli, docs_of, process_workloads

TABLE = FlagTable("vllm", "9.9", {f.name: f for f in (
    Flag("max-model-len", "value", "human_int", accepts_auto=True), Flag("enforce-eager", "switch"),
    Flag("tensor-parallel-size", "value", "int"), Flag("pipeline-parallel-size", "value", "int"),
    Flag("block-size", "value", "int"), Flag("enable-prefix-caching", "negatable"), Flag("dtype", "value", "str"),
    Flag("served-model-name", "value", "str", nargs="+"), Flag("metrics-port", "value", "int"),
)})


def load(tmp_path: Path, text: str) -> Topology:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    topo, _ = load_topology(path)
    return topo


def test_args_are_flags_with_the_position_they_were_written_at(tmp_path: Path) -> None:
    topo = load(tmp_path, """\
name: t
model: m
engine: {max-model-len: 512, enforce-eager: true}
workers:
  - name: w
    cpus: '0|1'
    args: [--max-model-len=256, --tensor-parallel-size, "2", --served-model-name, a, b, --no-enable-prefix-caching]
""")
    resolved = resolve(topo, table=TABLE, cpu_flags=frozenset())
    assert resolved.problems == []
    engine = resolved.engines[0]
    assert engine.tensor_parallel_size == 2 and engine.prefix_caching is False
    assert engine.flags["max-model-len"].path == ("workers", 0, "args", 0)
    assert engine.flags["enforce-eager"].origin == "engine"
    assert rules.check(resolved) == []  # 2 core sets for TP 2, read from args:
    (spec,) = plan.render(resolved)
    # An args: flag over a top-level one takes its place (given once); new ones come last, as written.
    assert spec.argv[3:] == ["--model", "m", "--max-model-len", "256", "--enforce-eager", "--dtype", "float32",
                             "--metrics-port", "9400", "--tensor-parallel-size", "2", "--served-model-name", "a", "b",
                             "--no-enable-prefix-caching"]


def test_an_args_dtype_is_not_overridden_by_the_cpu_default(tmp_path: Path) -> None:
    topo = load(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: w, args: [--dtype, float16]}\n")
    (spec,) = plan.render(resolve(topo, table=TABLE, cpu_flags=frozenset({"avx512_bf16"})))
    assert spec.argv.count("--dtype") == 1 and spec.argv[-2:] == ["--dtype", "float16"]
    assert spec.notes == []


@pytest.mark.parametrize(("args", "expected"), [
    (["--max-model-len", "10", "--max-model-len", "20"], "given twice in args"),
    (["--max-model-len"], "'max-model-len' takes a value"),
    (["--enforce-eager=true"], "is a switch: write --enforce-eager alone"),
    (["-tp", "2"], "'-tp' is not a --flag"),
    (["--kv-transfer-config", "{}"], "from the worker's `kv_transfer:`"),
    (["--model", "x"], "the launcher passes --model"),
    (["--tensor-parallel-size", "0"], "'tensor-parallel-size' is 1 to 4096, not 0"),
    (["--prefill-retries", "2"], "vLLM 9.9 has no engine flag 'prefill-retries'"),
])
def test_args_refused(tmp_path: Path, args: list[str], expected: str) -> None:
    topo = load(tmp_path, f"name: t\nmodel: m\nworkers:\n  - name: w\n    args: {json.dumps(args)}\n")
    problems = resolve(topo, table=TABLE).problems
    assert [p.path[:3] for p in problems] == [("workers", 0, "args")], problems
    assert expected in problems[0].message, problems


def test_args_given_in_the_workers_engine_too_is_refused(tmp_path: Path) -> None:
    topo = load(tmp_path, "name: t\nmodel: m\nworkers:\n  - name: w\n    engine: {max-model-len: 5}\n"
                          "    args: [--max-model-len, '6']\n")
    (problem,) = resolve(topo, table=TABLE).problems
    assert problem.path == ("workers", 0, "args", 0) and "also in this worker's engine:" in problem.message


def test_a_kinds_own_flags() -> None:
    assert engine_flags.own_flags("decode") == {"component", "prefill-component", "prefill-timeout", "prefill-retries"}
    assert engine_flags.own_flags("monolith") == {"component"}
    flags, problems = engine_flags.parse_arg_list(["--prefill-retries", "3", "--prefill-timeout", "x"], TABLE,
                                                  "decode")
    assert [(f.name, f.value) for f in flags] == [("prefill-retries", "3")]
    assert problems == [(2, "'prefill-timeout' takes a number, not 'x'")]


def test_without_vllms_table_the_launchers_own_flags_are_still_read(tmp_path: Path) -> None:
    topo = load(tmp_path, "name: t\nmodel: m\nworkers:\n  - name: w\n    gpus: [0]\n"
                          "    args: [--tensor-parallel-size, '2', --anything, goes, --flag]\n")
    resolved = resolve(topo, table=None)
    assert resolved.problems == []
    assert resolved.engines[0].tensor_parallel_size == 2
    assert any("tensor-parallel-size 2" in p.message for p in rules.check(resolved))
    (spec,) = plan.render(resolved)
    assert spec.argv[-5:] == ["--tensor-parallel-size", "2", "--anything", "goes", "--flag"]


def test_router_args_are_read_with_the_routers_parser(tmp_path: Path) -> None:
    topo = load(tmp_path, """\
name: t
model: m
workers:
  - {name: a, kind: kv_worker, args: [--block-size, "32"]}
  - {name: b, kind: kv_worker, engine: {block-size: 32}}
routers:
  - {name: r, args: [--metrics-port, "9700", --seed, "1"]}
""")
    resolved = resolve(topo, table=TABLE)
    assert resolved.problems == [] and rules.check(resolved) == []
    router = next(p for p in resolved.processes if p.kind == "router")
    assert router.ports == {"metrics": 9700}  # an args: port is a port the rules and `up` see
    spec = next(s for s in plan.render(resolved) if s.kind == "router")
    # The router hashes the block size the workers really use, even when args: set it.
    assert spec.argv[3:] == ["--model", "m", "--routing-strategy", "prefix", "--block-size", "32",
                             "--metrics-port", "9700", "--seed", "1"]


ARGS_TOPOLOGIES = {
    "disagg": """\
name: args-disagg
model: m
engine: {max-model-len: 512}
workers:
  - name: prefill
    kind: prefill
    cpus: "0"
    kv_transfer: {kv_connector: ExampleConnector, kv_role: kv_producer, kv_rank: 0, kv_parallel_size: 2,
                  kv_ip: 10.0.0.5, kv_port: 14579}
    args: [--max-model-len=256, --enforce-eager, --served-model-name, a, b]
  - name: decode
    kind: decode
    cpus: "1"
    kv_transfer: {kv_connector: ExampleConnector, kv_role: kv_consumer, kv_rank: 1, kv_parallel_size: 2}
    args: [--prefill-retries, "2", --served-model-name, a, b]
frontends:
  - name: web
""",
    "kv-router": """\
name: args-kv
model: m
workers:
  - {name: w, kind: kv_worker, replicas: 2, args: [--block-size, "32", --enforce-eager]}
routers:
  - {name: r, args: [--metrics-port, "9700", --seed, "1"]}
frontends:
  - {name: web, listen: 0.0.0.0}
""",
}


def _by_process(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for w in process_workloads(docs_of(folder)):
        for name in w["spec"]["template"]["metadata"]["annotations"]["vllm-launcher/processes"].split(","):
            out[name] = w
    return out


@pytest.mark.parametrize("name", sorted(ARGS_TOPOLOGIES))
def test_export_and_plan_json_agree_argv_for_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  name: str) -> None:
    """`launcher plan --json` and `launcher export kubernetes` both render argv from the same resolved
    processes (plan.render_argv): entry for entry equal, but for the in-cluster rewrites, which are
    values of the resolved flags (interpreter, a frontend's --host, kv_ip, one metrics port per workload)."""
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LAUNCHER_HOME", str(tmp_path / "home"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(ARGS_TOPOLOGIES[name])
    specs = json.loads(cli(["plan", str(path), "--json"]).stdout)
    cli(["export", "kubernetes", str(path), "-o", str(tmp_path / "out")])
    by_process = _by_process(tmp_path / "out")
    assert sorted(by_process) == sorted(s["name"] for s in specs)
    topo, _ = load_topology(path)
    resolved = {p.name: p for p in resolve(topo, kv_dir=Path(k8s.KV_MOUNT)).processes}
    for spec in specs:
        w = by_process[spec["name"]]
        got, planned = argv_of(w), list(spec["argv"])
        assert len(got) == len(planned), (got, planned)
        assert got[0] == "python3"
        proc = resolved[spec["name"]]
        expected = ["python3", *planned[1:]]
        for flag, setting in proc.flags.items():
            i = expected.index(f"--{flag}") + 1 if setting.value not in (True, False) else None
            if i is None:
                continue
            if flag == "kv-transfer-config":
                want = dict(setting.value)
                if want.get("kv_ip") is not None:
                    want["kv_ip"] = f"{w['metadata']['name']}-0.{w['metadata']['name']}"
                assert json.loads(got[i]) == want  # the plan's kv dir is this host's run dir
                expected[i] = got[i]
            elif flag == "host" and proc.kind == "frontend":
                expected[i] = "0.0.0.0"
            elif flag == "metrics-port" and w["spec"]["replicas"] > 1:
                expected[i] = got[i]
        assert got == expected, spec["name"]


def test_validate_and_up_refuse_an_endpoint_override_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ETCD_ENDPOINTS overrides the file for `up`, so `validate` reads it too: one set of checks for both
    (cmd_up has none of its own)."""
    monkeypatch.setenv("LAUNCHER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NATS_SERVER", raising=False)
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:2379")
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nservices: {etcd: 'http://10.0.0.1:2379', nats: 'nats://10.0.0.1:4222'}\n"
                    "workers:\n  - {name: a, host: ha}\n  - {name: b, host: hb}\n")
    for argv in (["validate", str(path)], ["up", str(path), "--host", "ha"]):
        result = cli(argv, check=False)
        assert result.returncode == 2, result
        assert "ETCD_ENDPOINTS=http://127.0.0.1:2379 is a loopback address" in result.stderr
        assert f"{path}:3:" in result.stderr  # blamed on services.etcd, which it overrides
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("services.json"))


def test_frontend_processes_auto_follows_the_cores_of_the_host_it_runs_on(tmp_path: Path) -> None:
    """`auto` reaches the frontend as `auto` (the planning host may not be the one it runs on: multi-node,
    `export kubernetes`), and the frontend counts the cores it may use there: affinity, and a container's
    CPU quota."""
    from workers.frontend import processes
    from workers.frontend.server import parse_args

    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers: [{name: w}]\nfrontends: [{name: web}]\n")
    topo, _ = load_topology(path)
    web = next(p for p in plan.build_plan(topo) if p.name == "web")
    assert web.argv[web.argv.index("--processes") + 1] == "auto"
    assert [processes.auto_processes(cores) for cores in (1, 2, 15, 16, 64, 128, 512)] == [1, 1, 1, 2, 8, 8, 8]
    args = parse_args(["--port", "1", "--processes", "auto"])
    cores = processes.usable_cores()
    assert args.processes == processes.auto_processes(cores) and f"({cores} cores here" in args.processes_why
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    root, mine = tmp_path / "cgroup", tmp_path / "self-cgroup"
    (root / "pods" / "web").mkdir(parents=True)
    mine.write_text("0::/pods/web\n")
    affinity = len(os.sched_getaffinity(0))
    assert processes.usable_cores(root, mine) == affinity  # no cpu.max anywhere
    (root / "pods" / "cpu.max").write_text("150000 100000\n")  # the pod's parent cgroup: 1.5 CPUs
    (root / "pods" / "web" / "cpu.max").write_text("max 100000\n")
    assert processes.usable_cores(root, mine) == min(2, affinity)
    (root / "pods" / "web" / "cpu.max").write_text("100000 100000\n")  # its own: 1 CPU
    assert processes.usable_cores(root, mine) == 1
    (root / "pods" / "cpu.max").write_text("max 0\n")
    (root / "pods" / "web" / "cpu.max").write_text("5 0\n")  # nonsense: ignored
    assert processes.usable_cores(root, mine) == affinity
    assert parse_args(["--port", "1", "--processes", "3"]).processes == 3, "a number given is kept, whatever the host"


def test_a_frontends_processes_reach_its_argv(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers: [{name: w}]\nfrontends: [{name: web, processes: 3}]\n")
    topo, _ = load_topology(path)
    argv = next(p.argv for p in plan.build_plan(topo) if p.name == "web")
    assert argv[argv.index("--processes") + 1] == "3"
