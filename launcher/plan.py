"""Resolved configuration -> the exact processes to start: argv, environment, devices, order and readiness.

The values come from launcher.resolve (the one place they are decided and that the rules check);
the plan only renders them: argv is written here, as the last step. `launcher plan` prints this
without starting anything, so what you see is what `up` runs.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.resolve import (
    SHARED_STORAGE_CONNECTORS,
    Endpoints,
    HostCpu,
    Resolved,
    ResolvedProcess,
    Setting,
    cpu_engine_defaults,
    nixl_side_channel_env,
    resolve,
    setting_argv,
)
from launcher.topology import DRAIN_MARGIN, Topology
from workers.runtime.settings import DEFAULT_DRAIN_TIMEOUT

# Re-exported: older callers import these from the plan.
__all__ = ["SHARED_STORAGE_CONNECTORS", "Endpoints", "HostCpu", "ProcessSpec", "build_plan", "cpu_engine_defaults",
           "flags_to_argv", "nixl_side_channel_env", "render", "render_argv", "select_host"]


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
    """vLLM flag dict -> argv (as `engine:` values render)."""
    return [a for key, value in flags.items() for a in setting_argv(Setting(key, value, (), "launcher"))]


def render_argv(proc: ResolvedProcess, python: str = sys.executable) -> list[str]:
    """The process's command line: `python -m module` and every resolved flag, in order."""
    return [python, "-m", proc.module, *(a for s in proc.flags.values() for a in setting_argv(s))]


def devices_text(proc: ResolvedProcess) -> str:
    if proc.cpus:
        return f"cpu {proc.cpus}"
    if proc.gpus is not None:
        return "gpu " + ",".join(str(g) for g in proc.gpus)
    return "-"


def to_spec(proc: ResolvedProcess) -> ProcessSpec:
    r = proc.restart
    return ProcessSpec(
        name=proc.name, kind=proc.kind, argv=render_argv(proc), env=dict(proc.env), devices=devices_text(proc),
        tier=proc.tier, restart_policy=r.policy, max_restarts=r.max_restarts, backoff=r.backoff,
        backoff_max=r.backoff_max, ready_timeout=proc.ready_timeout, drain_timeout=proc.drain_timeout,
        host=proc.host, ports=dict(proc.ports), url=proc.url, notes=list(proc.notes), replica_of=proc.replica_of)


def dependencies(procs: list[ResolvedProcess]) -> dict[str, list[str]]:
    """Each process depends on every gating process of the tiers before it."""
    return {p.name: [q.name for q in procs if q.tier < p.tier and q.gates] for p in procs}


def render(resolved: Resolved) -> list[ProcessSpec]:
    """Processes in start order, argv rendered from the resolved flags."""
    procs = sorted(resolved.processes, key=lambda p: p.tier)
    deps = dependencies(procs)
    specs = [to_spec(p) for p in procs]
    for spec in specs:
        spec.depends_on = deps[spec.name]
    return specs


def build_plan(topo: Topology, endpoints: Endpoints | None = None, kv_dir: Path | None = None,
               cpu_flags: frozenset[str] | None = None) -> list[ProcessSpec]:
    """Processes in start order; each depends on every process of the tiers before it.

    kv_dir: the shared_storage_path given to shared-storage connectors that have none.
    cpu_flags: the CPU flags CPU workers' defaults are chosen from (default: this host's
    /proc/cpuinfo; `plan`/`up` run on the host that starts the workers, `--host` on multi-node).
    A topology whose `args:` cannot be read is refused (ValueError): validate it first.
    """
    resolved = resolve(topo, endpoints=endpoints, kv_dir=kv_dir, cpu_flags=cpu_flags)
    if resolved.problems:
        raise ValueError("; ".join(f"{p.path}: {p.message}" for p in resolved.problems))
    return render(resolved)


def select_host(specs: list[ProcessSpec], host: str | None) -> list[ProcessSpec]:
    """Multi-node: with --host, only that host's share (and processes with no host, if host is None)."""
    if host is None:
        return specs
    mine = [s for s in specs if s.host == host]
    names = {s.name for s in mine}
    for s in mine:
        s.depends_on = [d for d in s.depends_on if d in names]
    return mine

