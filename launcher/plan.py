"""Topology -> the exact processes to start: argv, environment, devices, order and readiness.

`launcher plan` prints this without starting anything, so what you see is what `up` runs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.cpu import choose_cpu_dtype, read_cpu_flags
from launcher.rules import block_size, engine_flags, parallel_sizes
from launcher.topology import DRAIN_MARGIN, Frontend, ProcessCommon, Router, Topology, Worker
from workers.kinds import KINDS
from workers.runtime.settings import DEFAULT_DRAIN_TIMEOUT

PathKey = tuple[str | int, ...]

# Connectors that hand KV over through a folder both sides see; with no shared_storage_path the
# folder is the deployment's own (<run_dir>/kv), not vLLM's default /tmp shared by every deployment.
SHARED_STORAGE_CONNECTORS = ("ExampleConnector",)


@dataclass
class Endpoints:
    etcd: list[str]
    nats: str

    @classmethod
    def resolve(cls, topo: Topology) -> Endpoints:
        """NATS_SERVER and ETCD_ENDPOINTS override the file, as they do for a worker started by hand."""
        etcd = os.environ.get("ETCD_ENDPOINTS") or topo.services.etcd
        nats = os.environ.get("NATS_SERVER") or topo.services.nats
        return cls(etcd=[e.strip() for e in etcd.split(",") if e.strip()], nats=nats)


@dataclass
class ProcessSpec:
    name: str
    kind: str
    argv: list[str]
    env: dict[str, str]
    devices: str
    tier: int
    depends_on: list[str] = field(default_factory=list)
    restart_policy: str = "on-failure"
    max_restarts: int = 3
    backoff: float = 1.0
    backoff_max: float = 30.0
    ready_timeout: float = 600.0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    host: str | None = None
    ports: dict[str, int] = field(default_factory=dict)  # what it listens on: "http", "metrics"
    url: str | None = None  # where a user reaches it (the frontend)
    notes: list[str] = field(default_factory=list)  # choices the plan made for the user, and why
    replica_of: str | None = None  # the topology worker this process is a replica of (`w` for w-1, w-2)

    @property
    def kill_after(self) -> float:
        """Seconds from SIGTERM to SIGKILL: the drain, then the engine's own shutdown (DRAIN_MARGIN)."""
        return self.drain_timeout + DRAIN_MARGIN

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ProcessSpec:
        return cls(**obj)



def flags_to_argv(flags: dict[str, Any]) -> list[str]:
    """vLLM flag dict -> argv. False becomes --no-x (vLLM's booleans are BooleanOptionalAction)."""
    argv: list[str] = []
    for key, value in flags.items():
        opt = f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(opt)
        elif value is False:
            argv.append(f"--no-{key.replace('_', '-')}")
        elif value is None:
            continue
        elif isinstance(value, (dict, list)):
            argv += [opt, json.dumps(value)]
        else:
            argv += [opt, str(value)]
    return argv


def _base_env(topo: Topology, endpoints: Endpoints, name: str, proc: ProcessCommon) -> dict[str, str]:
    """What every process is told about its deployment: the worker runtime reads these (RuntimeSettings)."""
    env = {
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "PYTHONUNBUFFERED": "1",
        "LAUNCHER_NAMESPACE": topo.effective_namespace,
        "LAUNCHER_PROCESS": name,
        "ETCD_ENDPOINTS": ",".join(endpoints.etcd),
        "NATS_SERVER": endpoints.nats,
        # The supervisor's kill deadline is this plus DRAIN_MARGIN: the worker must know its own budget.
        "LAUNCHER_DRAIN_TIMEOUT": str(proc.drain_timeout),
    }
    if proc.host:
        env["LAUNCHER_HOST"] = proc.host
    env.update(topo.env)
    return env


def nixl_side_channel_env(w: Worker, replica: int = 0) -> dict[str, str]:
    """NIXL ignores kv_ip/kv_port: each instance listens for handshakes on VLLM_NIXL_SIDE_CHANNEL_HOST
    (default localhost), and a prefill hands that address to the decode side as remote_host. Across
    hosts that must be the instance's own routable address, so kv_ip/kv_port become those variables
    (an explicit env: entry wins). Replicas on one host get consecutive ports.
    """
    kt = w.kv_transfer
    if kt is None or not kt.kv_connector.startswith("Nixl") or kt.kv_ip is None:
        return {}
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": kt.kv_ip}
    if kt.kv_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(kt.kv_port + replica)
    return env


class HostCpu:
    """This host's CPU flags, read once and only if a CPU worker needs them (injectable for tests)."""

    def __init__(self, flags: frozenset[str] | None = None, known: bool = False) -> None:
        self._flags = flags
        self._known = known or flags is not None

    def flags(self) -> frozenset[str] | None:
        if not self._known:
            self._flags, self._known = read_cpu_flags(), True
        return self._flags


def cpu_engine_defaults(w: Worker, flags: dict[str, Any], cpu: HostCpu) -> tuple[dict[str, Any], list[str]]:
    """Flags a CPU worker gets when its topology leaves them unset, and one note per choice.

    Only workers without `gpus` (vLLM's CPU build) and never over an explicit value; GPU workers are
    left exactly as written.
    """
    if w.gpus is not None or "dtype" in flags:
        return {}, []
    choice = choose_cpu_dtype(cpu.flags())
    if choice is None:
        return {}, ["dtype left to vLLM: this host's CPU flags could not be read"]
    return {"dtype": choice.dtype}, [choice.reason]



def _metrics_ports(topo: Topology) -> dict[tuple[int, int], int]:
    """(worker index, replica) -> its Prometheus port: the worker's own, else base + its position among
    the engine processes of its host without one (so two hosts may use the same numbers)."""
    ports: dict[tuple[int, int], int] = {}
    next_free: dict[str | None, int] = {}
    for i, w in enumerate(topo.workers):
        for k in range(w.replicas):
            if w.metrics_port is not None:
                ports[(i, k)] = w.metrics_port + k
            else:
                port = next_free.get(w.host, topo.metrics_port_base)
                ports[(i, k)] = port
                next_free[w.host] = port + 1
    return ports


def listening_ports(topo: Topology) -> list[tuple[PathKey, str | None, str, int]]:
    """(path to blame, host, process, port) of every port the deployment listens on."""
    out: list[tuple[PathKey, str | None, str, int]] = []
    for (i, k), port in _metrics_ports(topo).items():
        w = topo.workers[i]
        where: PathKey = ("workers", i, "metrics_port") if w.metrics_port is not None else ("workers", i, "name")
        out.append((where, w.host, _replica_name(w, k), port))
    for i, f in enumerate(topo.frontends):
        out.append((("frontends", i, "port"), f.host, f.name, f.port))
    return out


def _replica_name(w: Worker, k: int) -> str:
    return w.name if w.replicas == 1 else f"{w.name}-{k + 1}"


def _worker_specs(topo: Topology, index: int, w: Worker, endpoints: Endpoints, kv_dir: Path | None,
                  metrics_ports: dict[tuple[int, int], int], cpu: HostCpu | None = None) -> list[ProcessSpec]:
    flags = engine_flags(topo, w)
    defaults, notes = cpu_engine_defaults(w, flags, cpu or HostCpu())
    flags.update(defaults)
    model = w.model or topo.model
    tp, pp = parallel_sizes(topo, w)
    tp_pp = tp * pp
    per_replica = w.gpus_per_replica or tp_pp
    specs = []
    for k in range(w.replicas):
        name = _replica_name(w, k)
        metrics_port = metrics_ports[(index, k)]
        argv = [sys.executable, "-m", KINDS[w.kind].module, "--model", model, *flags_to_argv(flags),
                "--metrics-port", str(metrics_port)]
        if w.kv_transfer is not None:
            kt = w.kv_transfer.model_copy()
            if kt.kv_rank is not None:
                kt.kv_rank += k
            if (kv_dir is not None and kt.kv_connector in SHARED_STORAGE_CONNECTORS
                    and "shared_storage_path" not in kt.kv_connector_extra_config):
                kt.kv_connector_extra_config = {**kt.kv_connector_extra_config, "shared_storage_path": str(kv_dir)}
            argv += ["--kv-transfer-config", kt.to_vllm_json()]
        argv += w.args
        env = _base_env(topo, endpoints, name, w)
        devices = "-"
        if w.gpus is not None:
            gpus = w.gpus[k * per_replica:(k + 1) * per_replica]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
            devices = "gpu " + ",".join(str(g) for g in gpus)
        if w.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = w.cpus
            devices = f"cpu {w.cpus}"
        env.update(nixl_side_channel_env(w, k))
        env.update(w.env)
        specs.append(ProcessSpec(
            name=name, kind=w.kind, argv=argv, env=env, devices=devices, tier=KINDS[w.kind].tier,
            restart_policy=w.restart.policy, max_restarts=w.restart.max_restarts,
            backoff=w.restart.backoff, backoff_max=w.restart.backoff_max,
            ready_timeout=w.ready_timeout, drain_timeout=w.drain_timeout, host=w.host,
            ports={"metrics": metrics_port}, notes=list(notes), replica_of=w.name if w.replicas > 1 else None,
        ))
    return specs


def _router_spec(topo: Topology, r: Router, endpoints: Endpoints) -> ProcessSpec:
    argv = [sys.executable, "-m", KINDS["router"].module, "--model", r.model or topo.model,
            "--routing-strategy", r.strategy]
    block = next((block_size(topo, w) for w in topo.workers if w.kind == "kv_worker"), None)
    if block is not None:
        argv += ["--block-size", str(block)]
    argv += r.args
    env = _base_env(topo, endpoints, r.name, r)
    env.update(r.env)
    return ProcessSpec(
        name=r.name, kind="router", argv=argv, env=env, devices="-", tier=KINDS["router"].tier,
        restart_policy=r.restart.policy, max_restarts=r.restart.max_restarts,
        backoff=r.restart.backoff, backoff_max=r.restart.backoff_max,
        ready_timeout=r.ready_timeout, drain_timeout=r.drain_timeout, host=r.host,
    )


def _frontend_spec(topo: Topology, f: Frontend, endpoints: Endpoints) -> ProcessSpec:
    argv = [sys.executable, "-m", KINDS["frontend"].module, "--host", f.listen, "--port", str(f.port),
            "--model", topo.model, "--max-request-bytes", str(f.max_request_bytes),
            "--request-timeout", str(f.request_timeout), "--retries", str(f.retries),
            "--migration-limit", str(f.migration_limit)]
    if f.api_key_env:
        argv += ["--api-key-env", f.api_key_env]  # the name of the variable, never the key
    argv += f.args
    env = _base_env(topo, endpoints, f.name, f)
    env.update(f.env)
    shown = "127.0.0.1" if f.listen in ("0.0.0.0", "::") else f.listen
    return ProcessSpec(
        name=f.name, kind="frontend", argv=argv, env=env, devices="-", tier=KINDS["frontend"].tier,
        restart_policy=f.restart.policy, max_restarts=f.restart.max_restarts,
        backoff=f.restart.backoff, backoff_max=f.restart.backoff_max,
        # Ready once a worker serves: it waits as long as the slowest worker may take to load.
        ready_timeout=max([f.ready_timeout, *(w.ready_timeout for w in topo.workers)]),
        drain_timeout=f.drain_timeout, host=f.host,
        ports={"http": f.port},
        url=f"http://{f'[{shown}]' if ':' in shown else shown}:{f.port}",
    )


def build_plan(topo: Topology, endpoints: Endpoints | None = None, kv_dir: Path | None = None,
               cpu_flags: frozenset[str] | None = None) -> list[ProcessSpec]:
    """Processes in start order; each depends on every process of the tiers before it.

    kv_dir: the shared_storage_path given to shared-storage connectors that have none.
    cpu_flags: the CPU flags CPU workers' defaults are chosen from (default: this host's
    /proc/cpuinfo; `plan`/`up` run on the host that starts the workers, `--host` on multi-node).
    """
    endpoints = endpoints or Endpoints.resolve(topo)
    cpu = HostCpu(cpu_flags)
    specs = [_frontend_spec(topo, f, endpoints) for f in topo.frontends]
    specs += [_router_spec(topo, r, endpoints) for r in topo.routers]
    metrics_ports = _metrics_ports(topo)
    for i, w in enumerate(topo.workers):
        specs += _worker_specs(topo, i, w, endpoints, kv_dir, metrics_ports, cpu)
    specs.sort(key=lambda s: s.tier)
    for spec in specs:
        spec.depends_on = [s.name for s in specs if s.tier < spec.tier and KINDS[s.kind].gates]
    return specs


def select_host(specs: list[ProcessSpec], host: str | None) -> list[ProcessSpec]:
    """Multi-node: with --host, only that host's share (and processes with no host, if host is None)."""
    if host is None:
        return specs
    mine = [s for s in specs if s.host == host]
    names = {s.name for s in mine}
    for s in mine:
        s.depends_on = [d for d in s.depends_on if d in names]
    return mine
