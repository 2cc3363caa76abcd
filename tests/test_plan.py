"""What `launcher plan` says is exactly what `up` runs: argv, env, devices, order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launcher.plan import Endpoints, build_plan, flags_to_argv, select_host
from launcher.topology import load_topology

ENDPOINTS = Endpoints(etcd=["http://10.0.0.1:2379"], nats="nats://10.0.0.1:4222")


def plan_of(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "t.yaml"
    path.write_text(text)
    topo, _ = load_topology(path)
    return build_plan(topo, ENDPOINTS)


def test_flags_to_argv_booleans_and_json() -> None:
    assert flags_to_argv({"enforce-eager": True, "enable_prefix_caching": False, "max-model-len": 100,
                          "compilation-config": {"level": 0}, "x": None}) == [
        "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "100",
        "--compilation-config", '{"level": 0}']


def test_monolith_argv_env_and_devices(tmp_path: Path) -> None:
    (spec,) = plan_of(tmp_path, """\
name: demo
model: org/model
engine: {max-model-len: 100, enforce-eager: true}
env: {HF_HOME: /cache}
workers:
  - name: w
    gpus: [2, 3]
    engine: {tensor-parallel-size: 2, max-model-len: 200}
    env: {EXTRA: "1"}
""")
    assert spec.argv[1:4] == ["-m", "workers.monolith.worker", "--model"]
    assert spec.argv[4:] == ["org/model", "--max-model-len", "200", "--enforce-eager", "--tensor-parallel-size", "2",
                             "--metrics-port", "9400"]
    assert spec.ports == {"metrics": 9400}
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert spec.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert spec.env["LAUNCHER_NAMESPACE"] == "demo" and spec.env["LAUNCHER_PROCESS"] == "w"
    assert spec.env["ETCD_ENDPOINTS"] == "http://10.0.0.1:2379" and spec.env["NATS_SERVER"] == "nats://10.0.0.1:4222"
    assert spec.env["HF_HOME"] == "/cache" and spec.env["EXTRA"] == "1"
    assert spec.devices == "gpu 2,3"


def test_cpu_binding(tmp_path: Path) -> None:
    (spec,) = plan_of(tmp_path, "name: t\nmodel: m\nworkers:\n  - {name: w, cpus: '0|1', "
                                "engine: {tensor-parallel-size: 2}}\n")
    assert spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "CUDA_VISIBLE_DEVICES" not in spec.env
    assert spec.devices == "cpu 0|1"


def test_replicas_get_names_gpus_and_kv_ranks(tmp_path: Path) -> None:
    specs = plan_of(tmp_path, """\
name: t
model: m
workers:
  - name: v
    kind: prefill
    replicas: 2
    gpus: [0, 1]
    kv_transfer: {kv_connector: NixlConnector, kv_role: kv_producer, kv_rank: 0, kv_parallel_size: 3}
""")
    assert [s.name for s in specs] == ["v-1", "v-2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    ranks = [json.loads(s.argv[s.argv.index("--kv-transfer-config") + 1])["kv_rank"] for s in specs]
    assert ranks == [0, 1]


def test_router_replicas_get_names_and_a_metrics_port_each(tmp_path: Path) -> None:
    specs = plan_of(tmp_path, """\
name: t
model: m
workers:
  - {name: k, kind: kv_worker, engine: {block-size: 32}}
routers:
  - {name: r, replicas: 2, args: [--metrics-port, "9500"]}
""")
    by = {s.name: s for s in specs}
    assert [s.name for s in specs if s.kind == "router"] == ["r-1", "r-2"]
    assert [by[n].replica_of for n in ("r-1", "r-2")] == ["r", "r"]
    assert [by[n].ports["metrics"] for n in ("r-1", "r-2")] == [9500, 9501]
    assert [by[n].argv[by[n].argv.index("--metrics-port") + 1] for n in ("r-1", "r-2")] == ["9500", "9501"]
    assert [by[n].env["LAUNCHER_PROCESS"] for n in ("r-1", "r-2")] == ["r-1", "r-2"]
    assert by["k"].depends_on == ["r-1", "r-2"]


def test_a_replica_name_may_not_be_another_process_name(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers:\n  - {name: r-2, kind: kv_worker, engine: {block-size: 32}}\n"
                    "routers:\n  - {name: r, replicas: 2}\n")
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode != 0
    assert f"{path}:6:15: routers[0].replicas" in out.stderr and "replica 'r-2' of 'r'" in out.stderr + out.stdout


def test_order_routers_then_prefill_then_decode(tmp_path: Path) -> None:
    specs = plan_of(tmp_path, """\
name: t
model: m
workers:
  - {name: d, kind: decode, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_consumer}}
  - {name: p, kind: prefill, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: k, kind: kv_worker, engine: {block-size: 32}}
routers:
  - {name: r, strategy: round_robin}
""")
    assert [s.name for s in specs] == ["r", "p", "d", "k"]
    by = {s.name: s for s in specs}
    assert by["r"].depends_on == [] and by["p"].depends_on == ["r"] and by["d"].depends_on == ["r", "p"]
    assert by["r"].argv[-4:] == ["--routing-strategy", "round_robin", "--block-size", "32"]


def test_select_host_drops_foreign_dependencies(tmp_path: Path) -> None:
    specs = plan_of(tmp_path, """\
name: t
model: m
workers:
  - {name: p, kind: prefill, host: a, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: d, kind: decode, host: b, kv_transfer: {kv_connector: NixlConnector, kv_role: kv_consumer}}
""")
    (d,) = select_host(specs, "b")
    assert d.name == "d" and d.depends_on == [] and d.env["LAUNCHER_HOST"] == "b"


def test_env_overrides_endpoints(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers:\n  - {name: w}\n")
    topo, _ = load_topology(path)
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://a:1,http://b:2")
    monkeypatch.setenv("NATS_SERVER", "nats://c:3")
    endpoints = Endpoints.resolve(topo)
    # hosts a, b and c are not loopback: the deployment is secured, the same addresses over TLS
    assert (endpoints.etcd, endpoints.nats) == (["https://a:1", "https://b:2"], "tls://c:3")
    assert endpoints.security.tls and "http://a:1 is not a loopback address" in endpoints.security.reason
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:1")
    monkeypatch.setenv("NATS_SERVER", "nats://localhost:3")
    assert Endpoints.resolve(topo) == Endpoints(etcd=["http://127.0.0.1:1"], nats="nats://localhost:3",
                                                security=Endpoints.resolve(topo).security)
    assert not Endpoints.resolve(topo).security.tls


def test_plan_cli_hides_secrets(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nenv: {HF_TOKEN: hf_abc123}\nworkers:\n  - {name: w}\n")
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "hf_abc123" not in out.stdout and "HF_TOKEN=***" in out.stdout
    assert "workers.monolith.worker" in out.stdout


def test_frontend_spec_gates_nothing_and_ports_are_assigned(tmp_path: Path) -> None:
    specs = plan_of(tmp_path, """\
name: fe
model: org/model
metrics_port_base: 9500
workers:
  - {name: a, kind: monolith, replicas: 2, gpus: [0, 1]}
  - {name: b, kind: monolith, metrics_port: 9600, gpus: [2]}
frontends:
  - {name: web, port: 8080, listen: 0.0.0.0, api_key_env: MY_KEY}
""")
    by_name = {s.name: s for s in specs}
    web = by_name["web"]
    assert web.kind == "frontend" and web.url == "http://127.0.0.1:8080" and web.ports == {"http": 8080}
    assert web.argv[1:3] == ["-m", "workers.frontend.server"]
    assert web.argv[web.argv.index("--api-key-env") + 1] == "MY_KEY"  # the variable's name, never a key
    assert [by_name[n].ports["metrics"] for n in ("a-1", "a-2", "b")] == [9500, 9501, 9600]
    # The frontend starts first (so /health answers while workers load) but no worker waits for it.
    assert specs[0].name == "web" and not web.depends_on
    assert all("web" not in s.depends_on for s in specs)


def test_drain_timeout_reaches_every_process_and_the_supervisor(tmp_path: Path) -> None:
    """LAUNCHER_DRAIN_TIMEOUT tells each process its drain budget (RuntimeSettings reads it); the spec
    carries the same value, from which the supervisor's kill deadline is drain_timeout + DRAIN_MARGIN."""
    from launcher.topology import DRAIN_MARGIN
    from workers.runtime.settings import DEFAULT_DRAIN_TIMEOUT

    specs = {s.name: s for s in plan_of(tmp_path, """\
name: d
model: m
workers:
  - {name: v, replicas: 2, drain_timeout: 45}
  - {name: solo}
routers: [{name: r, drain_timeout: 5.5}]
frontends: [{name: web, port: 8081, migration_limit: 0}]
""")}
    expected = {"v-1": 45.0, "v-2": 45.0, "solo": DEFAULT_DRAIN_TIMEOUT, "r": 5.5, "web": DEFAULT_DRAIN_TIMEOUT}
    assert {n: s.drain_timeout for n, s in specs.items()} == expected
    assert {n: float(s.env["LAUNCHER_DRAIN_TIMEOUT"]) for n, s in specs.items()} == expected
    assert specs["r"].kill_after == 5.5 + DRAIN_MARGIN
    assert {n: s.replica_of for n, s in specs.items()} == {"v-1": "v", "v-2": "v", "solo": None, "r": None,
                                                           "web": None}
    argv = specs["web"].argv
    assert argv[argv.index("--migration-limit") + 1] == "0"
