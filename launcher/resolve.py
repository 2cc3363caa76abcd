"""Topology -> each process's effective configuration: the one place a value is decided.

Everything after this module reads what it returns: the rules check it (launcher.rules), the plan
renders argv from it as its last step (launcher.plan), the Kubernetes export writes it as manifests.
So a value reaches a process by one road only, and that road passes validation:

- engine flags: the topology's `engine:`, overlaid by the worker's `engine:`, overlaid by its
  `args:`, which are read with the same parser table (launcher.engine_flags) that checks `engine:`.
  Each flag keeps where it was written (a Setting), so a rule blames the line that set it;
- the launcher's own choices: ports, devices per replica, kv ranks, the shared-storage folder,
  a CPU worker's dtype (with a note), the environment each process is told;
- router and frontend flags, `args:` read with their own modules' parsers.

The order of the chain: topology -> resolve -> rules / validation -> plan -> (export, backends).
Nothing here imports what comes after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher import engine_flags
from launcher.addresses import is_loopback
from launcher.cpu import choose_cpu_dtype, read_cpu_flags
from launcher.credentials import Credentials
from launcher.topology import DRAIN_MARGIN, Frontend, KvTransfer, ProcessCommon, Restart, Router, Topology, Worker
from launcher.yamlpos import LoadedYaml, PathKey
from workers.frontend.processes import AUTO_CORES_PER_PROCESS, AUTO_MAX
from workers.kinds import KINDS
from workers.runtime.tls import TlsFiles

# Connectors that hand KV over through a folder both sides see; with no shared_storage_path the
# folder is the deployment's own (<run_dir>/kv), not vLLM's default /tmp shared by every deployment.
SHARED_STORAGE_CONNECTORS = ("ExampleConnector",)


@dataclass(frozen=True)
class Problem:
    """A mistake at `path` (pydantic-style location of the field to fix)."""

    path: PathKey
    message: str

    def render(self, loaded: LoadedYaml | None) -> str:
        where = loaded.where(self.path) if loaded else "<topology>"
        return f"{where}: {path_text(self.path)}: {self.message}"


def path_text(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@dataclass(frozen=True)
class Setting:
    """One flag's effective value and where it was written (what a rule blames)."""

    name: str  # dashed, without --
    value: Any  # as YAML typed it (engine:), or as the parser reads it (args: True/False, text, [texts])
    path: PathKey
    origin: str  # "engine" (top level), "worker engine", "args", "launcher"
    tokens: tuple[str, ...] | None = None  # args: the value entries as written

    @property
    def source(self) -> str:
        """Where it was written, in words for a message."""
        return {"engine": "the top-level engine:", "worker engine": "engine:", "args": "args:"}.get(
            self.origin, "the launcher")


@dataclass
class EngineConfig:
    """A topology worker's effective engine flags; every replica shares them."""

    index: int  # in topology.workers
    flags: dict[str, Setting] = field(default_factory=dict)

    def value(self, name: str, default: Any = None) -> Any:
        s = self.flags.get(name)
        return default if s is None or s.value is None else s.value

    def blame(self, name: str, fallback: PathKey) -> PathKey:
        s = self.flags.get(name)
        return s.path if s is not None and s.origin != "launcher" else fallback

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.value("tensor-parallel-size", 1))

    @property
    def pipeline_parallel_size(self) -> int:
        return int(self.value("pipeline-parallel-size", 1))

    @property
    def parallel_sizes(self) -> tuple[int, int]:
        return self.tensor_parallel_size, self.pipeline_parallel_size

    @property
    def block_size(self) -> int | None:
        value = self.value("block-size")
        return None if value is None else int(value)

    @property
    def prefix_caching(self) -> bool | None:
        value = self.value("enable-prefix-caching")
        return None if value is None else bool(value)


@dataclass
class ResolvedProcess:
    """One process to run: everything `up` needs but its argv, which plan.render_argv writes."""

    name: str
    kind: str
    section: str  # "workers" | "routers" | "frontends": where it is in the topology
    index: int  # its position there
    module: str  # python -m <module>
    model: str
    flags: dict[str, Setting]  # every flag it gets, in argv order (the launcher's, engine:, args:)
    env: dict[str, str]
    tier: int
    gates: bool
    restart: Restart
    ready_timeout: float
    drain_timeout: float
    host: str | None = None
    replica: int = 0
    replica_of: str | None = None  # the topology worker this process is a replica of (`w` for w-1, w-2)
    engine: EngineConfig | None = None  # engine kinds
    kv_transfer: KvTransfer | None = None  # this replica's (kv_rank + replica, shared-storage folder)
    gpus: tuple[int, ...] | None = None  # this replica's share of the worker's gpus
    cpus: str | None = None
    ports: dict[str, int] = field(default_factory=dict)  # what it listens on: "http", "metrics"
    port_paths: dict[str, PathKey] = field(default_factory=dict)  # the field that set each port
    url: str | None = None  # where a user reaches it (the frontend)
    notes: list[str] = field(default_factory=list)  # choices made for the user, and why

    @property
    def path(self) -> PathKey:
        return (self.section, self.index)

    @property
    def kill_after(self) -> float:
        """Seconds from SIGTERM to SIGKILL: the drain, then the engine's own shutdown (DRAIN_MARGIN)."""
        return self.drain_timeout + DRAIN_MARGIN


@dataclass(frozen=True)
class Security:
    """How the deployment's processes reach etcd and NATS: in clear, or over TLS with a client certificate
    (the launcher's own credentials, one identity per process; or the files services.tls names)."""

    tls: bool
    reason: str  # why, in words (plan shows it)
    credentials: Path | None = None  # the launcher's credentials folder (managed auto/always)
    given: TlsFiles | None = None  # managed: never: services.tls, or LAUNCHER_TLS_CA / _CERT / _KEY
    problem: str | None = None  # what is missing to honour it (a rule reports it)

    def files_for(self, identity: str) -> TlsFiles | None:
        """The files `identity` (a process name, or credentials.OPERATOR) connects with; None in clear."""
        if not self.tls:
            return None
        if self.given is not None:
            return self.given
        if self.credentials is None:  # TLS without files: `problem` says so, and a rule reports it
            return None
        return Credentials(self.credentials).client(identity)

    @classmethod
    def resolve(cls, topo: Topology, etcd: list[str], nats: str, credentials: Path | None) -> Security:
        mode = topo.services.security
        exposed = [e for e in [*etcd, nats] if not is_loopback(e)]
        tls_urls = [e for e in [*etcd, nats] if e.split("://", 1)[0] in ("https", "tls")]
        if mode == "none":
            return cls(False, "services.security: none")
        if mode == "tls":
            reason = "services.security: tls"
        elif exposed:
            reason = f"{exposed[0]} is not a loopback address (services.security: auto)"
        elif tls_urls:
            reason = f"{tls_urls[0]} asks for TLS"
        else:
            return cls(False, "every service is on loopback (services.security: auto)")
        if topo.services.managed != "never":
            folder = credentials or Path(os.environ.get("LAUNCHER_HOME", "~/.local/state/vllm-launcher")
                                         ).expanduser() / topo.name / "credentials"
            return cls(True, reason, credentials=folder)
        given: TlsFiles | None = None
        problem = None
        if topo.services.tls is not None:
            given = TlsFiles(topo.services.tls.ca, topo.services.tls.cert, topo.services.tls.key)
        else:
            try:
                given = TlsFiles.from_env()
            except ValueError as exc:
                problem = str(exc)
            if given is None and problem is None:
                problem = ("the launcher does not start these servers (managed: never), so it has no credentials "
                           "for them: name the files (services.tls: {ca, cert, key}) or set LAUNCHER_TLS_CA, "
                           "LAUNCHER_TLS_CERT and LAUNCHER_TLS_KEY; or services.security: none")
        return cls(True, reason, given=given, problem=problem)


def _secured_url(url: str, scheme: str) -> str:
    """http:// -> https:// (nats:// -> tls://): the address the file names, reached over TLS."""
    return url if "://" not in url else f"{scheme}://{url.split('://', 1)[1]}"


@dataclass
class Endpoints:
    etcd: list[str]
    nats: str
    security: Security = field(default_factory=lambda: Security(False, "not resolved from a topology"))

    @classmethod
    def resolve(cls, topo: Topology, credentials: Path | None = None) -> Endpoints:
        """NATS_SERVER and ETCD_ENDPOINTS override the file, as they do for a worker started by hand.
        credentials: the run directory's credentials folder (where `up` makes them)."""
        etcd_text = os.environ.get("ETCD_ENDPOINTS") or topo.services.etcd
        nats = os.environ.get("NATS_SERVER") or topo.services.nats
        etcd = [e.strip() for e in etcd_text.split(",") if e.strip()]
        security = Security.resolve(topo, etcd, nats, credentials)
        if security.tls:
            etcd, nats = [_secured_url(e, "https") for e in etcd], _secured_url(nats, "tls")
        return cls(etcd=etcd, nats=nats, security=security)


@dataclass
class Resolved:
    topology: Topology
    endpoints: Endpoints
    engines: list[EngineConfig]  # one per topology.workers entry, same order
    processes: list[ResolvedProcess]  # frontends, routers, then each worker's replicas
    problems: list[Problem] = field(default_factory=list)  # `args:` entries that cannot be read


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

    Only workers without `gpus` (vLLM's CPU build) and never over an explicit value (engine: or
    args:); GPU workers are left exactly as written.
    """
    if w.gpus is not None or "dtype" in flags:
        return {}, []
    choice = choose_cpu_dtype(cpu.flags())
    if choice is None:
        return {}, ["dtype left to vLLM: this host's CPU flags could not be read"]
    return {"dtype": choice.dtype}, [choice.reason]


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


def replica_name(w: Worker | Router, k: int) -> str:
    return w.name if w.replicas == 1 else f"{w.name}-{k + 1}"


# --- engine flags ------------------------------------------------------------------------

_UNSET = object()


def _engine_settings(mapping: Any, path: PathKey, origin: str) -> dict[str, Setting]:
    """An `engine:` mapping (pydantic Engine) as Settings, keys dashed, typed ones as the schema read them."""
    return {name: Setting(name, value, (*path, _written_key(mapping, name)), origin)
            for name, value in mapping.flags().items()}


def _written_key(mapping: Any, name: str) -> str:
    """The key as the file spells it (dashes or underscores), for its position."""
    extra = mapping.model_extra or {}
    for key in extra:
        if str(key).replace("_", "-") == name:
            return str(key)
    return name


def _args_settings(proc: ProcessCommon, section: str, index: int, kind: str,
                   table: engine_flags.FlagTable | None) -> tuple[dict[str, Setting], list[Problem]]:
    flags, problems = engine_flags.parse_arg_list(proc.args, table, kind)
    settings = {f.name: Setting(f.name, f.value, (section, index, "args", f.index), "args", f.tokens) for f in flags}
    return settings, [Problem((section, index, "args", i), message) for i, message in problems]


# The flags the launcher itself reads, bounded as the schema bounds them in engine:.
_BOUNDS = {"tensor-parallel-size": (1, 4096), "pipeline-parallel-size": (1, 4096), "block-size": (1, 1 << 20)}


def _bound_problems(settings: dict[str, Setting]) -> list[Problem]:
    problems = []
    for name, (lo, hi) in _BOUNDS.items():
        s = settings.get(name)
        if s is None:
            continue
        try:
            number = int(s.value)
        except (TypeError, ValueError):
            problems.append(Problem(s.path, f"'{name}' takes an integer, not {s.value!r}"))
            continue
        if not lo <= number <= hi:
            problems.append(Problem(s.path, f"'{name}' is {lo} to {hi}, not {number}"))
    return problems


def engine_config(topo: Topology, index: int, table: engine_flags.FlagTable | None
                  ) -> tuple[EngineConfig, dict[str, Setting], list[Problem]]:
    """A worker's effective engine flags, the args: flags no engine: gave (rendered after the
    launcher's own), and the problems of its args: (unknown, bad value, owned, given twice or also in
    its engine:)."""
    w = topo.workers[index]
    config = EngineConfig(index)
    config.flags.update(_engine_settings(topo.engine, ("engine",), "engine"))
    own = _engine_settings(w.engine, ("workers", index, "engine"), "worker engine")
    config.flags.update(own)
    args, problems = _args_settings(w, "workers", index, w.kind, table)
    for name, s in list(args.items()):
        if name in own:
            problems.append(Problem(s.path, f"'--{name}' is also in this worker's engine: "
                                            f"({path_text(own[name].path)}): give each flag once"))
            del args[name]
    bad = _bound_problems(args)
    problems += bad
    for p in bad:
        args = {n: s for n, s in args.items() if s.path != p.path}
    appended = {n: s for n, s in args.items() if n not in config.flags}  # new flags go after the launcher's
    config.flags.update(args)  # an args: flag over a top-level engine: one takes its place
    return config, appended, problems


# --- processes ----------------------------------------------------------------------------

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
    files = endpoints.security.files_for(name)
    if files is not None:
        env.update(files.env())
    if proc.host:
        env["LAUNCHER_HOST"] = proc.host
    env.update(topo.env)
    return env


def metrics_ports(topo: Topology) -> dict[tuple[int, int], int]:
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


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def setting_argv(s: Setting) -> list[str]:
    """One flag as argv. False becomes --no-x (vLLM's booleans are BooleanOptionalAction); an `args:`
    flag keeps its value entries as written."""
    opt = _option(s.name)
    if s.value is True:
        return [opt]
    if s.value is False:
        return [f"--no-{s.name.replace('_', '-')}"]
    if s.value is None:
        return []
    if s.tokens is not None:
        return [opt, *s.tokens]
    if isinstance(s.value, (dict, list)):
        return [opt, json.dumps(s.value)]
    return [opt, str(s.value)]


def _launcher(name: str, value: Any, path: PathKey) -> Setting:
    return Setting(name, value, path, "launcher")


def _common(p: ProcessCommon) -> dict[str, Any]:
    return {"restart": p.restart, "ready_timeout": p.ready_timeout, "drain_timeout": p.drain_timeout, "host": p.host}


def _worker_processes(topo: Topology, index: int, config: EngineConfig, args: dict[str, Setting],
                      endpoints: Endpoints, kv_dir: Path | None, ports: dict[tuple[int, int], int],
                      cpu: HostCpu) -> list[ResolvedProcess]:
    w = topo.workers[index]
    kind = KINDS[w.kind]
    path: PathKey = ("workers", index)
    engine = {n: s for n, s in config.flags.items() if n not in args}  # engine:, with args: overrides in place
    defaults, notes = cpu_engine_defaults(w, config.flags, cpu)
    for n, value in defaults.items():
        engine[n] = _launcher(n, value, (*path, "name"))
    tp, pp = config.parallel_sizes
    per_replica = w.gpus_per_replica or tp * pp
    out = []
    for k in range(w.replicas):
        name = replica_name(w, k)
        port = ports[(index, k)]
        flags = {"model": _launcher("model", topo.model_of(w), (*path, "model") if w.model else ("model",)),
                 **engine,
                 "metrics-port": _launcher("metrics-port", port, (*path, "metrics_port"))}
        kt = None
        if w.kv_transfer is not None:
            kt = w.kv_transfer.model_copy()
            if kt.kv_rank is not None:
                kt.kv_rank += k
            if (kv_dir is not None and kt.kv_connector in SHARED_STORAGE_CONNECTORS
                    and "shared_storage_path" not in kt.kv_connector_extra_config):
                kt.kv_connector_extra_config = {**kt.kv_connector_extra_config, "shared_storage_path": str(kv_dir)}
            flags["kv-transfer-config"] = _launcher("kv-transfer-config", kt.model_dump(exclude_none=True),
                                                    (*path, "kv_transfer"))
        flags.update(args)
        env = _base_env(topo, endpoints, name, w)
        gpus = None
        if w.gpus is not None:
            gpus = tuple(w.gpus[k * per_replica:(k + 1) * per_replica])
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        if w.cpus:
            env["VLLM_CPU_OMP_THREADS_BIND"] = w.cpus
        env.update(nixl_side_channel_env(w, k))
        env.update(w.env)
        port_path = (*path, "metrics_port") if w.metrics_port is not None else (*path, "name")
        out.append(ResolvedProcess(
            name=name, kind=w.kind, section="workers", index=index, module=kind.module,
            model=topo.model_of(w), flags=flags, env=env, tier=kind.tier, gates=kind.gates, **_common(w),
            replica=k, replica_of=w.name if w.replicas > 1 else None, engine=config, kv_transfer=kt,
            gpus=gpus, cpus=w.cpus, ports={"metrics": port}, port_paths={"metrics": port_path}, notes=list(notes)))
    return out


def _router_processes(topo: Topology, index: int, r: Router, engines: list[EngineConfig], endpoints: Endpoints,
                      table: engine_flags.FlagTable | None) -> tuple[list[ResolvedProcess], list[Problem]]:
    """One process per replica; they differ only in name (and a metrics port given in args:, + k)."""
    path: PathKey = ("routers", index)
    model = topo.model_of(r)
    flags = {"model": _launcher("model", model, (*path, "model") if r.model else ("model",)),
             "routing-strategy": _launcher("routing-strategy", r.strategy, (*path, "strategy"))}
    block = next((e.block_size for e, w in zip(engines, topo.workers, strict=True)
                  if w.kind == "kv_worker" and topo.model_of(w) == model), None)  # its own model's workers
    if block is not None:
        flags["block-size"] = _launcher("block-size", block, (*path, "name"))
    args, problems = _args_settings(r, "routers", index, "router", table)
    flags.update(args)
    kind = KINDS["router"]
    metrics = args.get("metrics-port")
    out = []
    for k in range(r.replicas):
        name = replica_name(r, k)
        env = _base_env(topo, endpoints, name, r)
        env.update(r.env)
        own = dict(flags)
        notes = []
        if metrics is not None and k:  # one port per replica on one host
            own["metrics-port"] = replace(metrics, value=int(metrics.value) + k, tokens=(str(int(metrics.value) + k),))
            notes.append(f"metrics port {int(metrics.value) + k}: the one in args: + {k} (replica {k + 1})")
        proc = ResolvedProcess(name=name, kind="router", section="routers", index=index, module=kind.module,
                               model=model, flags=own, env=env, tier=kind.tier, gates=kind.gates, **_common(r),
                               replica=k, replica_of=r.name if r.replicas > 1 else None, notes=notes)
        if metrics is not None:  # the router's own metrics port, given in args:
            proc.ports["metrics"] = int(own["metrics-port"].value)
            proc.port_paths["metrics"] = metrics.path
        out.append(proc)
    return out, problems


def _model_flags(f: Frontend, index: int, table: engine_flags.FlagTable | None
                 ) -> tuple[dict[str, list[str]], list[Problem]]:
    """A frontend's `models:`: each model's args: read as the frontend's own are (unknown flags, values,
    parsers), and then only the flags one model may set (workers.frontend.server.MODEL_FLAGS); as argv per
    served name, for the frontend's --model-flags. (rule_frontend_models checks the names.)"""
    from workers.frontend.server import MODEL_FLAGS

    out: dict[str, list[str]] = {}
    problems: list[Problem] = []
    if any(a.startswith("--tool-parser-plugin") for a in [*f.args, *(a for m in f.models.values() for a in m.args)]):
        table = None  # a plugin registers parsers vLLM's table cannot know (the frontend checks them as it starts)
    for name, model in f.models.items():
        path: PathKey = ("frontends", index, "models", name, "args")
        read, bad = engine_flags.parse_arg_list(model.args, table, "frontend")
        problems += [Problem((*path, i), message) for i, message in bad]
        argv: list[str] = []
        for flag in read:
            if flag.name not in MODEL_FLAGS:
                problems.append(Problem((*path, flag.index), f"'--{flag.name}' is the frontend's, for every model it "
                                        f"serves: give it in the frontend's args:, not under one model (a model's "
                                        f"own flags are {', '.join(MODEL_FLAGS)})"))
                continue
            argv += setting_argv(Setting(flag.name, flag.value, (*path, flag.index), "args", flag.tokens))
        out[name] = argv
    return out, problems


def _frontend_process(topo: Topology, index: int, f: Frontend, endpoints: Endpoints,
                      table: engine_flags.FlagTable | None) -> tuple[ResolvedProcess, list[Problem]]:
    path: PathKey = ("frontends", index)
    flags = {"host": _launcher("host", f.listen, (*path, "listen")),
             "port": _launcher("port", f.port, (*path, "port")),
             "model": _launcher("model", topo.model, ("model",))}
    for name in ("max_request_bytes", "request_timeout", "retries", "migration_limit"):
        flags[name.replace("_", "-")] = _launcher(name.replace("_", "-"), getattr(f, name), (*path, name))
    flags["processes"] = _launcher("processes", f.processes, (*path, "processes"))
    if f.api_key_env:  # the name of the variable, never the key
        flags["api-key-env"] = _launcher("api-key-env", f.api_key_env, (*path, "api_key_env"))
    args, problems = _args_settings(f, "frontends", index, "frontend", table)
    flags.update(args)
    per_model, bad = _model_flags(f, index, table)
    problems += bad
    if per_model:
        flags["model-flags"] = _launcher("model-flags", per_model, (*path, "models"))
    env = _base_env(topo, endpoints, f.name, f)
    env.update(f.env)
    shown = "127.0.0.1" if f.listen in ("0.0.0.0", "::") else f.listen
    kind = KINDS["frontend"]
    common = _common(f)
    # Ready once a worker serves: it waits as long as the slowest worker may take to load.
    common["ready_timeout"] = max([f.ready_timeout, *(w.ready_timeout for w in topo.workers)])
    proc = ResolvedProcess(name=f.name, kind="frontend", section="frontends", index=index, module=kind.module,
                           model=topo.model, flags=flags, env=env, tier=kind.tier, gates=kind.gates, **common,
                           ports={"http": f.port}, port_paths={"http": (*path, "port")},
                           url=f"http://{f'[{shown}]' if ':' in shown else shown}:{f.port}",
                           notes=[AUTO_NOTE] if f.processes == "auto" else [])
    return proc, problems


# `processes: auto` is resolved by the frontend itself, on the host (or in the container) it runs on: the host
# that plans may be another one (multi-node, `export kubernetes`), with other cores.
AUTO_NOTE = (f"processes auto: one per {AUTO_CORES_PER_PROCESS} of the cores the frontend's own host gives it, "
             f"1 to {AUTO_MAX} (its log says how many)")


def resolve(topo: Topology, *, endpoints: Endpoints | None = None, kv_dir: Path | None = None,
            cpu_flags: frozenset[str] | None = None, cpu: HostCpu | None = None,
            table: engine_flags.FlagTable | object | None = _UNSET) -> Resolved:
    """Every process of a schema-valid topology, with its effective configuration.

    endpoints: default Endpoints.resolve (the file, overridden by ETCD_ENDPOINTS / NATS_SERVER).
    kv_dir: the shared_storage_path given to shared-storage connectors that have none.
    cpu_flags / cpu: the CPU flags CPU workers' dtype is chosen from (default: this host's).
    table: vLLM's flag table `args:` are read with (default: the cached one, None without vLLM).
    """
    flag_table = engine_flags.table_or_none() if table is _UNSET else table
    assert flag_table is None or isinstance(flag_table, engine_flags.FlagTable)
    endpoints = endpoints or Endpoints.resolve(topo)
    cpu = cpu or HostCpu(cpu_flags)
    problems: list[Problem] = []
    engines: list[EngineConfig] = []
    worker_args: list[dict[str, Setting]] = []
    for i in range(len(topo.workers)):
        config, args, bad = engine_config(topo, i, flag_table)
        engines.append(config)
        worker_args.append(args)
        problems += bad
    processes: list[ResolvedProcess] = []
    for i, f in enumerate(topo.frontends):
        proc, bad = _frontend_process(topo, i, f, endpoints, flag_table)
        processes.append(proc)
        problems += bad
    for i, r in enumerate(topo.routers):
        procs, bad = _router_processes(topo, i, r, engines, endpoints, flag_table)
        processes += procs
        problems += bad
    ports = metrics_ports(topo)
    for i in range(len(topo.workers)):
        processes += _worker_processes(topo, i, engines[i], worker_args[i], endpoints, kv_dir, ports, cpu)
    return Resolved(topo, endpoints, engines, processes, problems)


def listening_ports(resolved: Resolved) -> list[tuple[PathKey, str | None, str, int]]:
    """(path to blame, host, process, port) of every port the deployment listens on."""
    order = {"workers": 0, "routers": 1, "frontends": 2}  # a clash blames the later: a frontend's port
    procs = sorted(resolved.processes, key=lambda p: order[p.section])
    return [(p.port_paths.get(role, p.path), p.host, p.name, port) for p in procs for role, port in p.ports.items()]
