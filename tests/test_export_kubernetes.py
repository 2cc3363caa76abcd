"""`launcher export kubernetes`: every shipped topology exports to manifests that validate offline
against the Kubernetes schemas, whose argv and env are `launcher plan --json`'s (minus the rewrites
listed here), and that say what they changed on the way from one host to a cluster.

No cluster runs here: what a kubelet or controller would do with these manifests is checked on
paper (schemas, references between objects), not by applying them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from kubernetes_validate.utils import validate

from launcher import proctree, services
from launcher.cli import main
from launcher.export import kubernetes as k8s
from launcher.export.secrets import looks_secret
from launcher.topology import load_topology
from tests.helpers import ROOT
from workers.runtime import requestplane
from workers.runtime.registry import Registration, Registry
from workers.runtime.settings import ServiceRefused
from workers.runtime.tls import TlsFiles, inbox_prefix

TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))
# The oldest Kubernetes minor still commonly run, and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29", "1.37")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# The in-cluster rewrites of the plan's environment, listed here on purpose (not imported): the
# export may change nothing else, and a new rewrite must be added here knowingly.
DROPPED_ENV = {"CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND", "LAUNCHER_HOST"}
IN_CLUSTER_ENV = {"ETCD_ENDPOINTS": "http://etcd:2379", "NATS_SERVER": "nats://nats:4222"}
# Secured (every export unless services.security: none): TLS URLs, and this host's certificate paths
# (if the plan has them) become the pod's Secret mount, with the workload as the identity.
SECURED_ENV = {"ETCD_ENDPOINTS": "https://etcd:2379", "NATS_SERVER": "tls://nats:4222"}
TLS_ENV = {"LAUNCHER_TLS_CA": "/etc/vllm-launcher/tls/ca.crt", "LAUNCHER_TLS_CERT": "/etc/vllm-launcher/tls/tls.crt",
           "LAUNCHER_TLS_KEY": "/etc/vllm-launcher/tls/tls.key"}
# etcd as the export wrote it before security (and still does with services.security: none).
CLEAR_ETCD_COMMAND = ["etcd", "--name=etcd-0", "--data-dir=/var/lib/etcd", "--listen-client-urls=http://0.0.0.0:2379",
                      "--advertise-client-urls=http://etcd:2379", "--listen-peer-urls=http://0.0.0.0:2380",
                      "--initial-advertise-peer-urls=http://etcd-0.etcd:2380",
                      "--initial-cluster=etcd-0=http://etcd-0.etcd:2380"]
POD_IP = {"fieldRef": {"fieldPath": "status.podIP"}}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(args: list[str], check: bool = True) -> Result:
    """The real CLI entry point, in this process: `launcher validate` imports vLLM to check the
    connector (seconds each time); once per test session is enough."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code
    result = Result(int(code or 0), out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def load_dir(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(out.glob("*.yaml")) if p.name != "kustomization.yaml"}


def docs_of(out: Path) -> list[dict[str, Any]]:
    return [d for docs in load_dir(out).values() for d in docs]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def process_workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The topology's processes (not etcd / NATS): annotated with the plan processes they run."""
    return [w for w in workloads(docs) if "vllm-launcher/processes" in w["spec"]["template"]["metadata"].get(
        "annotations", {})]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (main,) = workload["spec"]["template"]["spec"]["containers"]
    return main


def env_of(workload: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or name -> valueFrom for variables the pod does not get literally."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload)["env"]}


def kustomization(folder: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((folder / "kustomization.yaml").read_text()))


def generated_files(kust: dict[str, Any]) -> list[str]:
    """The files kustomize's generators read (name=path or path), relative to the folder."""
    return [f.split("=", 1)[-1] for kind in ("configMapGenerator", "secretGenerator")
            for gen in kust.get(kind, []) for f in gen.get("files", [])]


def pod_secret(workload: dict[str, Any]) -> str | None:
    """The Secret of a pod's `tls` volume (its identity), if it has one."""
    for vol in workload["spec"]["template"]["spec"].get("volumes", []):
        if vol["name"] == "tls":
            return str(vol["secret"]["secretName"])
    return None


def argv_of(workload: dict[str, Any]) -> list[str]:
    c = container(workload)
    return [*c["command"], *c["args"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Each shipped topology through the real CLI, as a user runs it: name -> (folder, plan --json)."""
    out: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    base = tmp_path_factory.mktemp("k8s")
    for topo in TOPOLOGIES:
        folder = base / topo.stem
        cli(["export", "kubernetes", str(topo), "-o", str(folder)])
        plan = json.loads(cli(["plan", str(topo), "--json"]).stdout)
        out[topo.stem] = (folder, plan)
    return out


@pytest.mark.parametrize("topo", [t.stem for t in TOPOLOGIES])
def test_every_manifest_validates_against_kubernetes_schemas(exported, topo: str) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported[topo]
    docs = docs_of(folder)
    assert workloads(docs)
    for doc in docs:
        for version in K8S_VERSIONS:
            validate(doc, version, strict=True)  # raises on an unknown or mistyped field


def test_the_schema_check_can_fail(exported) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported["disagg"]
    bad = find(docs_of(folder), "StatefulSet", "decode")
    container(bad)["resource"] = container(bad).pop("resources")  # a typo kubectl would reject
    with pytest.raises(Exception, match="resource"):
        validate(bad, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("topo", [t.stem for t in TOPOLOGIES])
def test_kustomization_lists_every_manifest_and_references_resolve(exported, topo: str) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported[topo]
    kust = kustomization(folder)
    assert kust["kind"] == "Kustomization" and kust["namespace"] == k8s.dns_label(topo)
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(on_disk) and len(set(kust["resources"])) == len(kust["resources"])
    generated = generated_files(kust)
    assert all((folder / f).is_file() for f in generated)
    top_level = {f for f in generated if "/" not in f}  # nats.conf; the credentials are in their folder
    assert {p.name for p in folder.iterdir()} == on_disk | top_level | {
        "kustomization.yaml", "NOTES.txt", "README.md", *(["credentials"] if "secretGenerator" in kust else [])}
    config_maps = {g["name"] for g in kust.get("configMapGenerator", [])}
    secrets = {g["name"] for g in kust.get("secretGenerator", [])}

    docs = docs_of(folder)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects of one kind share a name"
    assert all(DNS_LABEL.match(name) for _, name in names)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    processes = {env_of(w)["LAUNCHER_PROCESS"] for w in process_workloads(docs)}
    for w in workloads(docs):
        template = w["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if w["kind"] == "StatefulSet":
            headless = services[w["spec"]["serviceName"]]
            assert headless["spec"]["clusterIP"] == "None"
        for vol in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets
            if "configMap" in vol:
                assert vol["configMap"]["name"] in config_maps
        for init in template["spec"].get("initContainers", []):
            waits_for = init["command"][init["command"].index("wait") + 1:]
            assert set(waits_for) <= processes, f"{w['metadata']['name']} waits for an unknown process"
    for svc in services.values():
        selected = [w for w in workloads(docs) if svc["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        containers = selected[0]["spec"]["template"]["spec"]["containers"]
        port_names = {p["name"] for c in containers for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


@pytest.mark.parametrize("topo", [t.stem for t in TOPOLOGIES])
def test_kustomize_builds_the_set(exported, topo: str) -> None:  # type: ignore[no-untyped-def]
    """kubectl's own kustomize (offline: `kubectl kustomize` needs no cluster) renders every object
    into the deployment's namespace."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it ships kustomize); the layout is still checked above")
    folder, _ = exported[topo]
    built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    kust = kustomization(folder)
    generated = {(kind, g["name"]) for key, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret"))
                 for g in kust.get(key, [])}
    made = [d for d in objects if d["kind"] in ("ConfigMap", "Secret")]
    # a generated object's name carries the hash of its content (a new certificate rolls its pods)
    assert sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]) for d in made) == sorted(generated)
    rest = [d for d in objects if d not in made]
    assert sorted(_describe(d) for d in rest) == sorted(_describe(d) for d in docs_of(folder))
    namespace = k8s.dns_label(topo)
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
    names = {d["metadata"]["name"] for d in made}
    for w in workloads(rest):  # every reference to a generated object now names the built one
        for vol in w["spec"]["template"]["spec"].get("volumes", []):
            ref = vol.get("secret", {}).get("secretName") or vol.get("configMap", {}).get("name")
            if ref is not None:
                assert ref in names, ref
    for secret in (d for d in made if d["kind"] == "Secret"):
        assert secret["type"] == "kubernetes.io/tls" and sorted(secret["data"]) == ["ca.crt", "tls.crt", "tls.key"]


def _describe(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("topo", [t.stem for t in TOPOLOGIES])
def test_argv_and_env_are_the_plans(exported, topo: str) -> None:  # type: ignore[no-untyped-def]
    """For every process of `launcher plan --json`: the same argv (interpreter aside) and env (the
    rewrites listed at the top of this file aside), so `up` and the cluster cannot drift apart."""
    folder, plan = exported[topo]
    topology, _ = load_topology(ROOT / "topologies" / f"{topo}.yaml")
    managed = topology.services.managed != "never"
    secured = managed and topology.services.security != "none"
    by_process = {}
    for w in process_workloads(docs_of(folder)):
        for name in w["spec"]["template"]["metadata"]["annotations"]["vllm-launcher/processes"].split(","):
            by_process[name] = w
    assert sorted(by_process) == sorted(p["name"] for p in plan)
    for p in plan:
        w = by_process[p["name"]]
        argv = argv_of(w)
        assert argv[0] == "python3" and p["argv"][0].endswith(("python", "python3", "python3.11", "python3.12"))
        expected_argv = list(p["argv"][1:])
        if "--kv-transfer-config" in expected_argv:
            i = expected_argv.index("--kv-transfer-config") + 1
            planned, got = json.loads(expected_argv[i]), json.loads(argv[1:][i])
            extra = planned.get("kv_connector_extra_config", {})
            if "shared_storage_path" in extra:  # the run dir of this host -> the shared volume
                extra["shared_storage_path"] = k8s.KV_MOUNT
            if "kv_ip" in planned:  # a host address -> the StatefulSet pod's DNS name
                planned["kv_ip"] = f"{w['metadata']['name']}-0.{w['metadata']['name']}"
            assert got == planned
            expected_argv[i] = argv[1:][i]
        if w["spec"]["replicas"] > 1 and "--metrics-port" in expected_argv:  # one port for every pod of it
            i = expected_argv.index("--metrics-port") + 1
            expected_argv[i] = argv[1:][i]
        if p["kind"] == "frontend":  # listens on the pod's address, for its Service
            expected_argv[expected_argv.index("--host") + 1] = "0.0.0.0"
        assert argv[1:] == expected_argv

        env = env_of(w)
        expected = {k: v for k, v in p["env"].items() if k not in DROPPED_ENV and k not in TLS_ENV}
        if managed:
            expected.update(SECURED_ENV if secured else IN_CLUSTER_ENV)
        if w["spec"]["replicas"] > 1:  # replicas share a workload and register under its name
            expected["LAUNCHER_PROCESS"] = w["metadata"]["name"]
        if "nixl" in {port["name"] for port in container(w).get("ports", [])}:
            expected["VLLM_NIXL_SIDE_CHANNEL_HOST"] = POD_IP
        if "metrics" in p["ports"]:  # vLLM's metrics on the pod's address, for a scraper
            expected["LAUNCHER_METRICS_ADDR"] = "0.0.0.0"
        if secured:  # one identity per workload, its certificate from the pod's Secret
            expected.update({**TLS_ENV, "LAUNCHER_IDENTITY": expected["LAUNCHER_PROCESS"]})
        assert env == expected


def test_disaggregated_layout(exported) -> None:  # type: ignore[no-untyped-def]
    """topologies/disagg.yaml, field by field: what a reviewer of the manifests would check."""
    folder, _ = exported["disagg"]
    docs = docs_of(folder)
    prefill, decode = find(docs, "StatefulSet", "prefill"), find(docs, "StatefulSet", "decode")

    # GPUs: TP 1 and TP 2, as limits; host indices gone.
    assert container(prefill)["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert container(decode)["resources"] == {"limits": {"nvidia.com/gpu": 2}}
    assert "--tensor-parallel-size" in argv_of(decode)
    assert argv_of(decode)[argv_of(decode).index("--tensor-parallel-size") + 1] == "2"

    # KV roles and ranks, from the same --kv-transfer-config the plan builds.
    def kv(w: dict[str, Any]) -> dict[str, Any]:
        argv = argv_of(w)
        return dict(json.loads(argv[argv.index("--kv-transfer-config") + 1]))

    assert (kv(prefill)["kv_connector"], kv(prefill)["kv_role"], kv(prefill)["kv_rank"]) == (
        "NixlConnector", "kv_producer", 0)
    assert (kv(decode)["kv_connector"], kv(decode)["kv_role"], kv(decode)["kv_rank"]) == (
        "NixlConnector", "kv_consumer", 1)
    assert kv(prefill)["kv_parallel_size"] == kv(decode)["kv_parallel_size"] == 2
    assert argv_of(prefill)[:3] == ["python3", "-m", "workers.disaggregated.prefill_worker"]
    assert argv_of(decode)[:3] == ["python3", "-m", "workers.disaggregated.decode_worker"]

    # NIXL side channel: the topology's ports, listening on the pod IP, behind a headless Service each.
    for w, port in ((prefill, 5600), (decode, 5610)):
        name = w["metadata"]["name"]
        env = env_of(w)
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(port)
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == POD_IP
        assert {"name": "nixl", "containerPort": port, "protocol": "TCP"} in container(w)["ports"]
        assert {"name": "metrics", "containerPort": 9400 + (w is decode), "protocol": "TCP"} in container(w)["ports"]
        svc = find(docs, "Service", name)
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        assert {"name": "nixl", "port": port, "targetPort": "nixl", "protocol": "TCP"} in svc["spec"]["ports"]
        assert w["spec"]["serviceName"] == name and w["spec"]["replicas"] == 1

        # The rest of the environment: the plan's, with etcd / NATS in the cluster.
        assert env["ETCD_ENDPOINTS"] == "https://etcd:2379" and env["NATS_SERVER"] == "tls://nats:4222"
        assert env["LAUNCHER_NAMESPACE"] == "disagg" and env["LAUNCHER_PROCESS"] == name
        assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        assert "CUDA_VISIBLE_DEVICES" not in env

        # Shared memory for NCCL / NIXL, probes that mean "registered in etcd", time to drain.
        pod = w["spec"]["template"]["spec"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "10Gi"}} in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(w)["volumeMounts"]
        probe = ["python3", "-m", "launcher.probe"]
        assert container(w)["readinessProbe"]["exec"]["command"] == [*probe, "ready"]
        assert container(w)["startupProbe"]["exec"]["command"] == [*probe, "ready"]
        assert container(w)["livenessProbe"]["exec"]["command"] == [*probe, "live"]
        # ready_timeout: 1800 in the file = the startup probe's window
        startup = container(w)["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] == 1800
        # drain_timeout (default 30) + DRAIN_MARGIN, the deadline `launcher down` gives; no preStop hook.
        assert pod["terminationGracePeriodSeconds"] == 40
        assert "lifecycle" not in container(w)
        assert pod["enableServiceLinks"] is False

    # Start order: decode after prefill (the plan's depends_on), prefill after nothing.
    assert "initContainers" not in prefill["spec"]["template"]["spec"]
    (init,) = decode["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["python3", "-m", "launcher.probe", "wait", "prefill"]

    # etcd and NATS with JetStream, in the cluster (secured: JetStream is in its configuration).
    assert json.loads((folder / "nats.conf").read_text())["jetstream"] == {"store_dir": "/data"}
    assert find(docs, "Service", "nats")["spec"]["ports"][0]["port"] == 4222
    assert find(docs, "Service", "etcd")["spec"]["ports"][0]["port"] == 2379

    notes = (folder / "NOTES.txt").read_text()
    assert "CUDA_VISIBLE_DEVICES" in notes and "pod IP" in notes and "backend: tmux" in notes


def test_interchangeable_replicas_are_one_workload(exported) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported["kv-router"]
    docs = docs_of(folder)
    worker = find(docs, "Deployment", "worker")
    assert worker["spec"]["replicas"] == 8
    assert container(worker)["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU for a surge pod
    assert env_of(worker)["LAUNCHER_PROCESS"] == "worker"
    router = find(docs, "Deployment", "router")
    assert "initContainers" not in router["spec"]["template"]["spec"]
    assert worker["spec"]["template"]["spec"]["initContainers"][0]["command"][-1] == "router"


def test_replicas_with_their_own_kv_rank_stay_apart(exported) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported["cpu-disagg-2p1d"]
    docs = docs_of(folder)
    ranks = {}
    for name in ("prefill-1", "prefill-2", "decode"):
        w = find(docs, "StatefulSet", name)
        argv = argv_of(w)
        kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
        ranks[name] = kv["kv_rank"]
        assert kv["kv_connector_extra_config"]["shared_storage_path"] == k8s.KV_MOUNT
        assert {"name": k8s.KV_CLAIM, "mountPath": k8s.KV_MOUNT} in container(w)["volumeMounts"]
    assert ranks == {"prefill-1": 0, "prefill-2": 1, "decode": 2}
    claim = find(docs, "PersistentVolumeClaim", k8s.KV_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "ReadWriteMany" in (folder / "NOTES.txt").read_text()


def test_one_host_rules_are_explained(exported) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported["cpu-kv-router"]
    a = find(docs_of(folder), "Deployment", "worker-a")
    assert container(a)["resources"] == {"requests": {"cpu": 1}}
    notes = (folder / "NOTES.txt").read_text()
    assert "cpus '0'" in notes and "VLLM_CPU_OMP_THREADS_BIND" in notes
    assert "no process requests a GPU" in notes and "is a folder on this host" in notes

    folder, _ = exported["multinode"]
    notes = (folder / "NOTES.txt").read_text()
    assert "host a" in notes and "host b" in notes and "nodeSelector" in notes
    assert "kv_ip 10.0.0.1" in notes and "prefill-0.prefill" in notes
    assert "10.0.0.1" not in (folder / "prefill.yaml").read_text()


def test_secrets_become_secret_refs_and_never_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):  # they would override the file's services
        monkeypatch.delenv(var, raising=False)
    topo = tmp_path / "secret.yaml"
    topo.write_text("""\
name: Secret_Demo
services: {etcd: "http://10.1.2.3:2379", nats: "nats://alice:s3cr3t-pw@nats.example:4222", managed: never,
           security: none}
model: org/model
env: {HF_TOKEN: hf_hunter2, PLAIN: visible}
workers:
  - {name: vllm, gpus: [0], env: {MY_API_KEY: k-123456}}
""")
    out = tmp_path / "out"
    cli(["export", "kubernetes", str(topo), "-o", str(out)])
    everything = "".join(p.read_text() for p in out.iterdir())
    for value in ("hf_hunter2", "s3cr3t-pw", "alice", "k-123456"):
        assert value not in everything
    docs = docs_of(out)
    (w,) = workloads(docs)
    env = env_of(w)
    ref = {"secretKeyRef": {"name": "secret-demo-secrets", "key": "HF_TOKEN"}}
    assert env["HF_TOKEN"] == ref
    assert env["NATS_SERVER"] == {"secretKeyRef": {"name": "secret-demo-secrets", "key": "NATS_SERVER"}}
    assert env["MY_API_KEY"]["secretKeyRef"]["key"] == "MY_API_KEY"
    assert env["PLAIN"] == "visible" and env["ETCD_ENDPOINTS"] == "http://10.1.2.3:2379"  # managed: never
    assert not any(d["kind"] == "StatefulSet" for d in docs)  # no etcd / NATS of our own
    readme = (out / "README.md").read_text()
    for key in ("HF_TOKEN", "NATS_SERVER", "MY_API_KEY"):
        assert f"--from-literal={key}=..." in readme
    for doc in docs:
        validate(doc, K8S_VERSIONS[-1], strict=True)


def test_loopback_services_with_managed_never_are_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):
        monkeypatch.delenv(var, raising=False)
    topo = tmp_path / "t.yaml"
    topo.write_text("name: t\nservices: {managed: never}\nmodel: m\n"
                    "workers: [{name: w, args: [--otlp-traces-endpoint, 'http://127.0.0.1:4317'], "
                    "env: {CACHE_URL: 'http://localhost:9000', BIND: 0.0.0.0}}]\n")
    proc = cli(["export", "kubernetes", str(topo), "-o", str(tmp_path / "out")])
    assert "loopback" in proc.stderr
    notes = (tmp_path / "out" / "NOTES.txt").read_text()
    assert "WARNING services.etcd" in notes and "WARNING services.nats" in notes
    assert "WARNING w: argv --otlp-traces-endpoint is http://127.0.0.1:4317" in notes
    assert "WARNING w: env CACHE_URL is http://localhost:9000" in notes
    assert "BIND" not in notes  # 0.0.0.0 listens on the pod's interfaces: fine


@pytest.mark.parametrize("topo", [t.stem for t in TOPOLOGIES])
def test_shipped_topologies_leave_no_loopback_behind(exported, topo: str) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported[topo]
    assert "WARNING" not in (folder / "NOTES.txt").read_text()


def test_named_ports_and_frontend_service(tmp_path: Path) -> None:
    """ProcessSpec.ports (a frontend's http, each worker's metrics): every named port is a containerPort
    and a Service port; the frontend gets a ClusterIP Service and listens on the pod's address."""
    topo, _ = load_topology(ROOT / "topologies" / "cpu-monolith.yaml")
    exp = k8s.export_kubernetes(topo, "cpu-monolith.yaml")
    k8s.write_export(exp, tmp_path)
    docs = docs_of(tmp_path)
    front = find(docs, "Deployment", "frontend")
    assert container(front)["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    args = argv_of(front)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    svc = find(docs, "Service", "frontend")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    # The preStop hook's 5 s come on top of the drain deadline (30 + 10): the hook does not shorten the drain.
    assert container(front)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert front["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 40
    vllm = find(docs, "Deployment", "vllm")
    assert container(vllm)["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert find(docs, "Service", "vllm")["spec"]["ports"][0]["port"] == 9400
    for doc in docs:
        validate(doc, K8S_VERSIONS[-1], strict=True)


def test_grace_period_follows_each_process_drain_timeout(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text("name: t\nmodel: m\n"
                    "workers: [{name: slow, drain_timeout: 120.5}, {name: quick, drain_timeout: 1}]\n"
                    "frontends: [{name: web, drain_timeout: 60}]\n")
    loaded, _ = load_topology(topo)
    docs = [d for docs in k8s.export_kubernetes(loaded, "t.yaml").resources.values() for d in docs]
    grace = {w["metadata"]["name"]: w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
             for w in process_workloads(docs)}
    assert grace == {"slow": 131, "quick": 11, "web": 5 + 70}
    env = {w["metadata"]["name"]: env_of(w)["LAUNCHER_DRAIN_TIMEOUT"] for w in process_workloads(docs)}
    assert env == {"slow": "120.5", "quick": "1.0", "web": "60.0"}


def test_names_that_collide_are_refused(tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text("name: t\nmodel: m\nworkers: [{name: etcd}, {name: a_b}, {name: a.b}]\n")
    proc = cli(["export", "kubernetes", str(topo), "-o", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2
    assert "'etcd'" in proc.stderr and "'a_b' and 'a.b'" in proc.stderr


def test_reexport_replaces_its_own_files_only(tmp_path: Path) -> None:
    topo, _ = load_topology(ROOT / "topologies" / "cpu-kv-router.yaml")
    k8s.write_export(k8s.export_kubernetes(topo, "x"), tmp_path)
    (tmp_path / "worker-a.yaml").rename(tmp_path / "stale.yaml")
    kust = (tmp_path / "kustomization.yaml").read_text().replace("worker-a.yaml", "stale.yaml")
    (tmp_path / "kustomization.yaml").write_text(kust)
    (tmp_path / "mine.txt").write_text("keep")
    k8s.write_export(k8s.export_kubernetes(topo, "x"), tmp_path)
    assert not (tmp_path / "stale.yaml").exists() and (tmp_path / "worker-a.yaml").exists()
    assert (tmp_path / "mine.txt").read_text() == "keep"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "kustomization.yaml").write_text("resources: [app.yaml]\n")
    with pytest.raises(k8s.ExportError, match="did not write"):
        k8s.write_export(k8s.export_kubernetes(topo, "x"), foreign)


def test_service_images_match_docker_compose() -> None:
    compose = yaml.safe_load((ROOT / "container" / "docker-compose.yml").read_text())
    assert compose["services"]["etcd"]["image"] == k8s.ETCD_IMAGE
    assert compose["services"]["nats"]["image"] == k8s.NATS_IMAGE


def test_default_image_has_what_the_manifests_run() -> None:
    """The exec probes and init container run `python3 -m launcher.probe` in the default image."""
    dockerfile = (ROOT / "container" / "Dockerfile").read_text()
    assert "COPY launcher/ launcher/" in dockerfile and "COPY workers/ workers/" in dockerfile
    assert '"aetcd' in dockerfile and '"psutil' in dockerfile and "python3 -m pip" in dockerfile
    assert "vllm-launcher:$FRAMEWORK" in (ROOT / "container" / "build.sh").read_text()
    assert k8s.DEFAULT_IMAGE == "vllm-launcher:vllm"


def test_small_helpers() -> None:
    assert k8s.count_cpus("0-3") == 4 and k8s.count_cpus("0|1") == 2 and k8s.count_cpus("0,2-3") == 3
    assert k8s.count_cpus("auto") is None and k8s.count_cpus("") is None
    assert k8s.dns_label("Prefill_Worker.1") == "prefill-worker-1"
    assert k8s.image_name("vllm-launcher:vllm") == "vllm-launcher"
    assert k8s.image_name("reg.io:5000/team/img:tag") == "reg.io:5000/team/img"
    assert k8s.image_name("reg.io:5000/img@sha256:abc") == "reg.io:5000/img"
    assert k8s.port_name("metrics") == "metrics" and k8s.port_name("9100") == "p-9100"
    assert looks_secret("HF_TOKEN", "x") and looks_secret("DB_PASSWORD", "x") and looks_secret("X", "nats://u:p@h:1")
    assert looks_secret("ETCD", "http://a:1,http://user:pw@b:2")
    assert not looks_secret("NATS_SERVER", "nats://nats:4222") and not looks_secret("VLLM_CPU_KVCACHE_SPACE", "1")


# ---------------------------------------------------------------- a secured deployment (issue 21)


def test_secured_export_mounts_each_workload_its_own_identity(exported) -> None:  # type: ignore[no-untyped-def]
    """kv-router (8 interchangeable workers, a router, a frontend): one identity per workload, one Secret
    each, mounted read-only in that workload's pods only; etcd and NATS with TLS and client certificates."""
    folder, _ = exported["kv-router"]
    docs = docs_of(folder)
    kust = kustomization(folder)
    generators = {g["name"]: g for g in kust["secretGenerator"]}
    assert sorted(generators) == ["tls-frontend", "tls-router", "tls-server", "tls-worker"]
    assert generators["tls-worker"] == {"name": "tls-worker", "type": "kubernetes.io/tls", "files": [
        "ca.crt=credentials/ca.crt", "tls.crt=credentials/worker.crt", "tls.key=credentials/worker.key"]}
    assert not any("ca.key" in f for f in generated_files(kust))  # the CA's key is in no Secret

    mount = {"name": "tls", "mountPath": "/etc/vllm-launcher/tls", "readOnly": True}
    for w in process_workloads(docs):
        name = w["metadata"]["name"]
        assert pod_secret(w) == f"tls-{name}"
        (vol,) = [v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert vol["secret"]["defaultMode"] == 0o400
        assert vol["secret"]["items"] == [{"key": k, "path": k} for k in ("ca.crt", "tls.crt", "tls.key")]
        assert mount in container(w)["volumeMounts"]
        env = env_of(w)
        assert {k: env[k] for k in TLS_ENV} == TLS_ENV and env["LAUNCHER_IDENTITY"] == name
        assert env["ETCD_ENDPOINTS"] == "https://etcd:2379" and env["NATS_SERVER"] == "tls://nats:4222"
        for init in w["spec"]["template"]["spec"].get("initContainers", []):  # it reads etcd too
            init_env = {e["name"]: e["value"] for e in init["env"]}
            assert init_env["ETCD_ENDPOINTS"] == "https://etcd:2379"
            assert {k: init_env[k] for k in TLS_ENV} == TLS_ENV and init_env["LAUNCHER_IDENTITY"] == name
            assert init["volumeMounts"] == [mount]
    worker = find(docs, "Deployment", "worker")
    assert worker["spec"]["replicas"] == 8 and env_of(worker)["LAUNCHER_IDENTITY"] == "worker"

    etcd = find(docs, "StatefulSet", "etcd")
    cmd = container(etcd)["command"]
    assert "--listen-client-urls=https://0.0.0.0:2379" in cmd and "--advertise-client-urls=https://etcd:2379" in cmd
    for flag in ("--cert-file=/etc/vllm-launcher/tls/tls.crt", "--key-file=/etc/vllm-launcher/tls/tls.key",
                 "--trusted-ca-file=/etc/vllm-launcher/tls/ca.crt", "--client-cert-auth",
                 "--listen-metrics-urls=http://0.0.0.0:2381", "--listen-peer-urls=http://127.0.0.1:2380"):
        assert flag in cmd
    assert not any(a.startswith("--peer-") or "0.0.0.0:2380" in a for a in cmd)  # no peer port on the network
    assert container(etcd)["readinessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert container(etcd)["livenessProbe"]["tcpSocket"] == {"port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in container(etcd)["ports"]} == {"client": 2379, "metrics": 2381}
    assert pod_secret(etcd) == "tls-server" and mount in container(etcd)["volumeMounts"]

    nats = find(docs, "StatefulSet", "nats")
    assert container(nats)["args"] == ["-c", "/etc/nats-config/nats.conf", "-m", "8222"]
    assert container(nats)["readinessProbe"]["httpGet"]["port"] == "monitor"
    assert pod_secret(nats) == "tls-server" and mount in container(nats)["volumeMounts"]
    assert {"name": "config", "configMap": {"name": "nats-config"}} in nats["spec"]["template"]["spec"]["volumes"]
    assert kust["configMapGenerator"] == [{"name": "nats-config", "files": ["nats.conf"]}]
    conf = json.loads((folder / "nats.conf").read_text())
    assert conf["tls"] == {"cert_file": "/etc/vllm-launcher/tls/tls.crt", "key_file": "/etc/vllm-launcher/tls/tls.key",
                           "ca_file": "/etc/vllm-launcher/tls/ca.crt", "verify_and_map": True, "timeout": 5}
    assert conf["listen"] == "0.0.0.0:4222"

    notes = (folder / "NOTES.txt").read_text()
    assert "as secret as passwords" in notes and "credentials/" in notes and "WARNING" not in notes
    assert "Credentials" in (folder / "README.md").read_text()


def test_nats_permissions_are_per_workload(exported) -> None:  # type: ignore[no-untyped-def]
    """One NATS user per workload (the subject of its certificate), with its kind's permissions; the
    replicas of `worker` share the user `worker`; and the operator."""
    from cryptography import x509

    folder, _ = exported["kv-router"]
    users = {u["user"]: u["permissions"] for u in
             json.loads((folder / "nats.conf").read_text())["authorization"]["users"]}
    assert sorted(users) == sorted(f"CN={n},O=kv-router" for n in ("frontend", "router", "worker", "operator"))
    worker, router, frontend = (users[f"CN={n},O=kv-router"] for n in ("worker", "router", "frontend"))
    assert "kv-router.backend.generate" in worker["subscribe"]["allow"]
    assert "_INBOX.worker.>" in worker["subscribe"]["allow"]
    assert "kv-router.kv_events" in worker["publish"]["allow"]
    assert "kv-router.backend.generate" not in worker["publish"]["allow"]  # no worker asks another
    assert "kv-router.backend.generate" in router["publish"]["allow"]
    assert "kv-router.kv_events" in router["subscribe"]["allow"]
    # the router's component, and the cancels of the streams its workers answer directly (no requests to them)
    assert frontend["publish"]["allow"] == ["kv-router.preprocess.generate", "kv-router.preprocess.generate.>",
                                            "kv-router.backend.generate.*.cancel"]
    # each certificate's subject is the user it is mapped to
    for ident in ("frontend", "router", "worker", "operator"):
        cert = x509.load_pem_x509_certificate((folder / "credentials" / f"{ident}.crt").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={ident},O=kv-router"
    server = x509.load_pem_x509_certificate((folder / "credentials" / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    for svc in ("etcd", "nats"):
        assert {svc, f"{svc}.kv-router", f"{svc}.kv-router.svc", f"{svc}.kv-router.svc.cluster.local"} <= set(sans)


@pytest.mark.parametrize("topo", [t.stem for t in TOPOLOGIES])
def test_no_private_key_outside_the_credentials_folder(exported, topo: str) -> None:  # type: ignore[no-untyped-def]
    folder, _ = exported[topo]
    creds = folder / "credentials"
    for path in folder.rglob("*"):
        if path.is_file() and creds not in path.parents:
            assert "PRIVATE KEY" not in path.read_text(), path
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    keys = sorted(creds.glob("*.key"))
    assert keys and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    assert all("PRIVATE KEY" in k.read_text() for k in keys)
    ignore = (creds / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!.gitignore" in ignore


def test_the_keys_stay_out_of_git(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    folder, _ = exported["monolith"]
    repo = tmp_path / "repo"
    shutil.copytree(folder, repo / "k8s")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    staged = subprocess.run(["git", "-C", str(repo), "diff", "--cached", "--name-only"], check=True,
                            capture_output=True, text=True).stdout.split()
    assert "k8s/kustomization.yaml" in staged and "k8s/credentials/.gitignore" in staged
    assert not [f for f in staged if f.startswith("k8s/credentials/") and f != "k8s/credentials/.gitignore"]


def test_reexport_keeps_the_credentials(tmp_path: Path) -> None:
    """Running pods keep trusting each other: the CA and every identity stay; a new workload gets a new one."""
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers: [{name: a}]\n")
    out = tmp_path / "out"
    cli(["export", "kubernetes", str(path), "-o", str(out)])
    creds = out / "credentials"
    before = {p.name: p.read_bytes() for p in creds.iterdir()}
    path.write_text("name: t\nmodel: m\nworkers: [{name: a}, {name: b}]\n")
    second = cli(["export", "kubernetes", str(path), "-o", str(out)])
    after = {p.name: p.read_bytes() for p in creds.iterdir()}
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["b.crt", "b.key"]
    assert "certificate of b" in second.stdout and "made CA" not in second.stdout
    assert [g["name"] for g in kustomization(out)["secretGenerator"]] == ["tls-server", "tls-a", "tls-b"]
    users = [u["user"] for u in json.loads((out / "nats.conf").read_text())["authorization"]["users"]]
    assert users == ["CN=a,O=t", "CN=b,O=t", "CN=operator,O=t"]

    # a folder holding another deployment's credentials is not mixed with this one's
    path.write_text("name: other\nmodel: m\nworkers: [{name: a}]\n")
    refused = cli(["export", "kubernetes", str(path), "-o", str(out)], check=False)
    assert refused.returncode == 2 and "deployment 't'" in refused.stderr
    # without ca.key nothing new can be issued: said, not half-written
    (creds / "ca.key").unlink()
    path.write_text("name: t\nmodel: m\nworkers: [{name: a}, {name: c}]\n")
    refused = cli(["export", "kubernetes", str(path), "-o", str(out)], check=False)
    assert refused.returncode == 2 and "no ca.key" in refused.stderr and " c" in refused.stderr
    assert "tls-c" not in (out / "kustomization.yaml").read_text()


def test_security_none_keeps_the_clear_export_and_warns(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers: [{name: a}]\nfrontends: [{name: fe}]\n")
    out = tmp_path / "out"
    cli(["export", "kubernetes", str(path), "-o", str(out)])
    assert (out / "nats.conf").exists()
    path.write_text("name: t\nservices: {security: none}\nmodel: m\nworkers: [{name: a}]\nfrontends: [{name: fe}]\n")
    cli(["export", "kubernetes", str(path), "-o", str(out)])
    assert not (out / "nats.conf").exists()  # the secured export's own file goes with it
    shutil.rmtree(out / "credentials")  # (kept by the re-export: keys are the user's to delete)
    cli(["export", "kubernetes", str(path), "-o", str(out)])
    assert not (out / "credentials").exists() and not (out / "nats.conf").exists()
    kust = kustomization(out)
    assert "secretGenerator" not in kust and "configMapGenerator" not in kust
    docs = docs_of(out)
    etcd, nats = find(docs, "StatefulSet", "etcd"), find(docs, "StatefulSet", "nats")
    assert container(etcd)["command"] == CLEAR_ETCD_COMMAND
    assert container(etcd)["readinessProbe"]["httpGet"] == {"path": "/health", "port": "client"}
    assert container(nats)["args"] == ["-js", "-sd", "/data", "-m", "8222"]
    for w in workloads(docs):
        assert all("secret" not in v for v in w["spec"]["template"]["spec"].get("volumes", []))
    for w in process_workloads(docs):
        env = env_of(w)
        assert {k: env[k] for k in IN_CLUSTER_ENV} == IN_CLUSTER_ENV
        assert not set(TLS_ENV) & set(env) and "LAUNCHER_IDENTITY" not in env
    assert "WARNING services.security: none" in (out / "NOTES.txt").read_text()
    for doc in docs:
        validate(doc, K8S_VERSIONS[-1], strict=True)


def test_managed_never_mounts_the_users_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers the user runs, over TLS: the pods mount Secret <ns>-tls, which the user makes from the
    files services.tls names; nothing of those files, and no credentials folder, is written."""
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER", "LAUNCHER_TLS_CA", "LAUNCHER_TLS_CERT", "LAUNCHER_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    pki = tmp_path / "pki"
    pki.mkdir()
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        (pki / name).write_text("-----BEGIN PRIVATE KEY-----\nnot-a-real-key\n-----END PRIVATE KEY-----\n")
    path = tmp_path / "t.yaml"
    path.write_text(f"""\
name: ext
services:
  etcd: https://etcd.infra:2379
  nats: tls://nats.infra:4222
  managed: never
  tls: {{ca: {pki}/ca.pem, cert: {pki}/client.pem, key: {pki}/client-key.pem}}
model: m
workers: [{{name: a, replicas: 2}}]
""")
    out = tmp_path / "out"
    cli(["export", "kubernetes", str(path), "-o", str(out)])
    assert not (out / "credentials").exists()
    kust = kustomization(out)
    assert "secretGenerator" not in kust
    docs = docs_of(out)
    (w,) = workloads(docs)
    assert pod_secret(w) == "ext-tls"
    env = env_of(w)
    assert {k: env[k] for k in TLS_ENV} == TLS_ENV and "LAUNCHER_IDENTITY" not in env
    assert env["ETCD_ENDPOINTS"] == "https://etcd.infra:2379" and env["NATS_SERVER"] == "tls://nats.infra:4222"
    everything = "".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert "PRIVATE KEY" not in everything and "not-a-real-key" not in everything
    readme = (out / "README.md").read_text()
    assert (f"create secret generic ext-tls --from-file=ca.crt={pki}/ca.pem --from-file=tls.crt={pki}/client.pem "
            f"--from-file=tls.key={pki}/client-key.pem") in readme
    notes = (out / "NOTES.txt").read_text()
    assert "Secret ext-tls" in notes and "managed: never" in notes
    for doc in docs:
        validate(doc, K8S_VERSIONS[-1], strict=True)


def test_identities_that_are_the_exports_own_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers: [{name: server}, {name: CA}, {name: operator}]\n")
    refused = cli(["export", "kubernetes", str(path), "-o", str(tmp_path / "out")], check=False)
    assert refused.returncode == 2
    for name in ("'server'", "'CA'", "'operator'"):
        assert name in refused.stderr
    assert not (tmp_path / "out" / "credentials").exists()
    path.write_text("name: t\nservices: {security: none}\nmodel: m\nworkers: [{name: server}]\n")
    cli(["export", "kubernetes", str(path), "-o", str(tmp_path / "clear")])  # no identities there


def _project(folder: Path, secret: str, into: Path) -> Path:
    """What the kubelet mounts for a pod: the Secret's keys (the generator's files) as files, 0400."""
    (gen,) = [g for g in kustomization(folder)["secretGenerator"] if g["name"] == secret]
    into.mkdir(parents=True)
    for item in gen["files"]:
        key, source = item.split("=", 1)
        (into / key).write_bytes((folder / source).read_bytes())
        (into / key).chmod(0o400)
    return into


def _handshake(port: int, name: str, ctx: ssl.SSLContext) -> Exception | None:
    """A TLS connection to 127.0.0.1:port checked against `name`, then one read (TLS 1.3 servers refuse a
    client certificate after the handshake): None when accepted, else the error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.settimeout(0.5)
            try:
                if tls.recv(1) == b"":
                    return ConnectionError("closed after the handshake")
            except TimeoutError:
                return None  # nothing to read and no alert: accepted
    except (ssl.SSLError, OSError) as exc:
        return exc
    return None


def test_the_exported_etcd_and_nats_run_secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster: the exported etcd command and nats.conf run here on real servers (the venv's etcd and
    nats-server), with each Secret projected as the kubelet would and the in-cluster addresses and ports
    moved to free loopback ones. The init container's `launcher.probe wait` reaches etcd with the pod's
    environment; a client without a certificate is refused; NATS maps each workload's certificate to its
    permissions; the probes' ports answer in clear."""

    try:
        etcd_bin, nats_bin = services.find_binary("etcd"), services.find_binary("nats-server")
    except services.ServiceError as exc:
        pytest.skip(str(exc))
    for var in ("ETCD_ENDPOINTS", "NATS_SERVER"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nfrontends: [{name: fe}]\nrouters: [{name: r}]\n"
                    "workers: [{name: kw, kind: kv_worker, replicas: 2}]\n")
    folder = tmp_path / "out"
    cli(["export", "kubernetes", str(path), "-o", str(folder)])
    docs = docs_of(folder)
    mount = "/etc/vllm-launcher/tls"
    client, peer, metrics, nats_port, monitor = services.free_ports(5)

    etcd_dir = _project(folder, "tls-server", tmp_path / "mounts" / "etcd")
    moves = {mount: str(etcd_dir), "0.0.0.0:2379": f"127.0.0.1:{client}", "etcd:2379": f"127.0.0.1:{client}",
             "127.0.0.1:2380": f"127.0.0.1:{peer}", "0.0.0.0:2381": f"127.0.0.1:{metrics}",
             "/var/lib/etcd": str(tmp_path / "etcd-data")}

    def moved(arg: str) -> str:
        for old, new in moves.items():
            arg = arg.replace(old, new)
        return arg

    etcd_cmd = [etcd_bin, *(moved(a) for a in container(find(docs, "StatefulSet", "etcd"))["command"][1:])]
    conf = json.loads((folder / "nats.conf").read_text())
    conf["listen"] = f"127.0.0.1:{nats_port}"
    conf["jetstream"]["store_dir"] = str(tmp_path / "nats-data")
    conf["tls"] = {k: v.replace(mount, str(etcd_dir)) if isinstance(v, str) else v for k, v in conf["tls"].items()}
    (tmp_path / "nats.conf").write_text(json.dumps(conf))
    nats_args = container(find(docs, "StatefulSet", "nats"))["args"]
    assert nats_args == ["-c", "/etc/nats-config/nats.conf", "-m", "8222"]
    nats_cmd = [nats_bin, "-c", str(tmp_path / "nats.conf"), "-m", str(monitor)]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen(cmd, stdout=(logs / f"{i}.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True) for i, cmd in enumerate((etcd_cmd, nats_cmd))]
    try:
        deadline = time.monotonic() + 30
        health = ""
        while time.monotonic() < deadline:
            try:  # the readiness probe: /health on the metrics port, in clear
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health", timeout=1) as resp:
                    health = resp.read().decode()
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=1) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert all(p.poll() is None for p in procs), [(logs / f"{i}.log").read_text() for i in (0, 1)]
                time.sleep(0.2)
        assert '"health":"true"' in health.replace(" ", ""), health
        etcd_url, nats_url = f"https://127.0.0.1:{client}", f"tls://127.0.0.1:{nats_port}"

        def pod(name: str) -> tuple[dict[str, str], TlsFiles]:
            w = next(w for w in process_workloads(docs) if w["metadata"]["name"] == name)
            files = _project(folder, pod_secret(w) or "", tmp_path / "mounts" / name)
            env = {k: v.replace(mount, str(files)) for k, v in env_of(w).items() if isinstance(v, str)}
            env.update(ETCD_ENDPOINTS=etcd_url, NATS_SERVER=nats_url)
            return env, TlsFiles(env["LAUNCHER_TLS_CA"], env["LAUNCHER_TLS_CERT"], env["LAUNCHER_TLS_KEY"])

        kw_env, kw = pod("kw")
        r_env, r = pod("r")
        fe_env, fe = pod("fe")

        async def etcd_scenario() -> None:
            registry = await Registry.connect([etcd_url], tls=r)
            try:
                await registry.register(Registration(namespace="t", component="router", endpoint="generate",
                                                     subject="s", process="r"))
                # the workers' init container waits for the router as the pod runs it: its env, its mount
                clean = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "NATS_", "LAUNCHER_"))}
                init = next(w for w in process_workloads(docs) if w["metadata"]["name"] == "kw")
                (init_c,) = init["spec"]["template"]["spec"]["initContainers"]
                init_env = {e["name"]: e["value"].replace(mount, str(tmp_path / "mounts" / "kw"))
                            for e in init_c["env"]}
                init_env["ETCD_ENDPOINTS"] = etcd_url
                assert init_c["command"][:4] == ["python3", "-m", "launcher.probe", "wait"]
                waited = subprocess.run([sys.executable, "-m", "launcher.probe", "--timeout", "5", "wait",
                                         *init_c["command"][4:]],
                                        env={**clean, **init_env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                        text=True, timeout=60)
                assert waited.returncode == 0 and "registered: r" in waited.stdout, waited.stdout + waited.stderr
            finally:
                await registry.close()
            with pytest.raises(ServiceRefused):  # https, and no certificate: refused before a request
                await Registry.connect([etcd_url], tls=None)

        asyncio.run(etcd_scenario())
        # The Service's qualified name is in the server certificate; a pod's certificate gets in ...
        assert _handshake(client, "etcd.t.svc.cluster.local", r.client_context()) is None
        # ... and a client that trusts the CA (it is no secret) but has no certificate does not.
        anonymous = ssl.create_default_context(cafile=str(etcd_dir / "ca.crt"))
        refused = _handshake(client, "etcd.t.svc", anonymous)
        assert refused is not None and not isinstance(refused, ssl.SSLCertVerificationError), refused

        async def nats_scenario() -> tuple[list[bytes], list[str]]:
            errors: list[str] = []

            async def on_error(exc: Exception) -> None:
                errors.append(str(exc))

            async def conn(files: TlsFiles, identity: str) -> Any:
                return await nats.connect(nats_url, tls=files.client_context(), error_cb=on_error,
                                          inbox_prefix=inbox_prefix(identity).encode(), allow_reconnect=False,
                                          max_reconnect_attempts=0, connect_timeout=3)

            worker = await conn(kw, kw_env["LAUNCHER_IDENTITY"])
            router = await conn(r, r_env["LAUNCHER_IDENTITY"])
            front = await conn(fe, fe_env["LAUNCHER_IDENTITY"])
            try:
                sub = await worker.subscribe("t.backend.generate")
                events = await router.subscribe("t.kv_events")
                await requestplane.flush_subscriptions(worker)
                await requestplane.flush_subscriptions(router)
                await router.publish("t.backend.generate", b"from the router")
                await front.publish("t.backend.generate", b"past the router")  # refused: not its subject
                await front.publish("t.kv_events", b"fake event")  # refused
                for c in (router, front):
                    await c.flush()
                await asyncio.sleep(0.3)
                got = []
                while sub.pending_msgs:
                    got.append((await sub.next_msg(timeout=1)).data)
                assert events.pending_msgs == 0
                return got, errors
            finally:
                for c in (worker, router, front):
                    await c.close()

        got, errors = asyncio.run(nats_scenario())
        assert got == [b"from the router"]
        assert any("publish" in e.lower() and "backend.generate" in e for e in errors), errors
        assert any("publish" in e.lower() and "kv_events" in e for e in errors), errors
    finally:
        for proc in procs:
            proctree.stop_tree(proc.pid, grace=5)
