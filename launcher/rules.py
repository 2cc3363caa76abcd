"""Cross-field rules of a topology: the mistakes that otherwise surface after minutes of loading.

The rules read the resolved configuration (launcher.resolve), so they see each value as the process
will get it, whichever field set it: a tensor-parallel-size from `args:` is checked as one from
`engine:`. Each rule returns problems as (path, message); the path is the pydantic-style location of
the field to fix (the `args:` entry, when that is where the value was written), so the CLI can print
file:line:col in front of it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable

from launcher.addresses import is_loopback, parse_cpu_sets
from launcher.credentials import RESERVED_IDENTITIES
from launcher.engine_flags import TableUnavailable, load_table
from launcher.resolve import EngineConfig, Problem, Resolved, listening_ports, resolve
from launcher.topology import Topology, Worker
from launcher.yamlpos import PathKey
from workers.kinds import entry_component

__all__ = ["Problem", "check"]

REMOVED_CONNECTORS = {
    "PyNcclConnector": "PyNcclConnector was removed from vLLM (V0 only); use NixlConnector on GPUs, "
    "or ExampleConnector (shared storage) on the CPU",
    "SharedStorageConnector": "SharedStorageConnector was renamed ExampleConnector in current vLLM",
}


def parse_cpu_set(spec: str) -> set[int]:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND syntax: '0-3', '0,2', '0-1|2-3' (all ranks' cores together)."""
    return set().union(*parse_cpu_sets(spec))


@functools.cache
def installed_connectors() -> frozenset[str] | None:
    """Connector names the installed vLLM registers (from the cached flag table, so no vLLM import);
    None when vLLM is not installed or its table cannot be read."""
    try:
        table = load_table()
    except TableUnavailable:
        return None
    return frozenset(table.connectors) or None


def _workers(topo: Topology) -> Iterable[tuple[int, Worker]]:
    return enumerate(topo.workers)


def rule_unique_names(resolved: Resolved) -> list[Problem]:
    """Names in the file, and the names replicas get (w-1, w-2): `status`, `logs` and etcd know a process by it."""
    topo = resolved.topology
    seen: dict[str, PathKey] = {}
    problems = []
    entries: list[tuple[PathKey, str]] = [((section, i, "name"), p.name)
                                          for section, procs in topo.sections() for i, p in enumerate(procs)]
    for path, name in entries:
        if name in seen:
            problems.append(Problem(path, f"name '{name}' is used twice; every process needs its own name"))
        seen[name] = path
    for proc in resolved.processes:
        if proc.replica_of is None:
            continue
        other = seen.get(proc.name)
        if other is not None and other != (proc.section, proc.index, "name"):
            problems.append(Problem((proc.section, proc.index, "replicas"), (
                f"replica '{proc.name}' of '{proc.replica_of}' has the name of another process: rename one")))
        seen[proc.name] = (proc.section, proc.index, "name")
    return problems


# Environment the launcher derives from a worker's devices: (variable, field named in the message, attribute).
DERIVED_ENV = (("CUDA_VISIBLE_DEVICES", "gpus", "gpus"), ("VLLM_CPU_OMP_THREADS_BIND", "cpus", "cpus"))


def _sizes_blame(engine: EngineConfig, fallback: PathKey) -> tuple[PathKey, str]:
    """Where a TP x PP mismatch is blamed: the `args:` entry that set a size (the odd one out), else
    `fallback`; and, for the message, where the sizes came from."""
    for name in ("tensor-parallel-size", "pipeline-parallel-size"):
        s = engine.flags.get(name)
        if s is not None and s.origin == "args":
            return s.path, f" ({name} from args:)"
    return fallback, ""


def rule_devices(resolved: Resolved) -> list[Problem]:
    topo = resolved.topology
    problems = []
    gpu_owner: dict[tuple[str | None, int], str] = {}
    cpu_owner: dict[tuple[str | None, int], str] = {}
    for i, w in _workers(topo):
        engine = resolved.engines[i]
        tp, pp = engine.parallel_sizes
        dp = engine.value("data-parallel-size", 1)
        if str(dp).strip() not in ("1", ""):
            problems.append(Problem(engine.blame("data-parallel-size", ("workers", i)), (
                f"data-parallel-size {dp}: the launcher gives each worker process one engine (its GPUs, "
                "metrics port, registration and the KV router's events are one engine's); write "
                f"replicas: {dp} instead, which the frontend and router spread requests over")))
        if w.gpus is not None and w.cpus is not None:
            problems.append(Problem(("workers", i, "cpus"), "give either gpus or cpus, not both"))
        if w.gpus is not None:
            per_replica = w.gpus_per_replica or tp * pp
            if per_replica != tp * pp:
                where, source = _sizes_blame(engine, ("workers", i, "gpus_per_replica"))
                problems.append(Problem(
                    where,
                    f"gpus_per_replica is {per_replica} but tensor-parallel-size x pipeline-parallel-size "
                    f"is {tp} x {pp} = {tp * pp}{source}",
                ))
            elif len(w.gpus) != per_replica * w.replicas:
                where, source = _sizes_blame(engine, ("workers", i, "gpus"))
                problems.append(Problem(
                    where,
                    f"{len(w.gpus)} GPU(s) given but {w.replicas} replica(s) x tensor-parallel-size {tp} x "
                    f"pipeline-parallel-size {pp} need {per_replica * w.replicas}{source}",
                ))
            for gpu in w.gpus:
                owner = gpu_owner.get((w.host, gpu))
                if owner is not None:
                    problems.append(Problem(
                        ("workers", i, "gpus"), f"GPU {gpu} is already given to '{owner}'; give each GPU once"
                    ))
                gpu_owner[(w.host, gpu)] = w.name
        for var, key, given in DERIVED_ENV:
            if getattr(w, given) is None:
                continue
            if var in w.env:
                problems.append(Problem(("workers", i, "env", var), f"the launcher sets {var} from {key}: "
                                        "remove it from env (two sources of the devices disagree sooner or later)"))
            elif var in topo.env and ("env", var) not in {p.path for p in problems}:
                problems.append(Problem(("env", var), f"the launcher sets {var} from each worker's {key} "
                                        f"('{w.name}' has {key}): remove it from env"))
        if w.cpus is not None and w.replicas > 1:
            problems.append(Problem(("workers", i, "cpus"), "cpus binds one process: with replicas > 1, "
                                    "list each replica as its own worker with its own cores"))
        if w.cpus is not None:
            cores = set().union(*w.cpu_sets)
            ranks = len(w.cpu_sets)
            if ranks != tp * pp:
                where, source = _sizes_blame(engine, ("workers", i, "cpus"))
                problems.append(Problem(
                    where,
                    f"{ranks} core set(s) given for tensor-parallel-size x pipeline-parallel-size = {tp * pp}"
                    f"{source}; separate one set per rank with '|', e.g. '0|1'",
                ))
            for core in sorted(cores):
                owner = cpu_owner.get((w.host, core))
                if owner is not None:
                    problems.append(Problem(
                        ("workers", i, "cpus"), f"core {core} is already given to '{owner}'; give each core once"
                    ))
                    break
                cpu_owner[(w.host, core)] = w.name
    return problems


def kv_instances(topo: Topology) -> list[tuple[int, Worker, int | None]]:
    """Every (worker index, worker, kv_rank) of each replica; replica k gets kv_rank + k."""
    out = []
    for i, w in _workers(topo):
        if w.kv_transfer is None:
            continue
        for k in range(w.replicas):
            rank = None if w.kv_transfer.kv_rank is None else w.kv_transfer.kv_rank + k
            out.append((i, w, rank))
    return out


def rule_disaggregation(resolved: Resolved) -> list[Problem]:
    topo = resolved.topology
    problems: list[Problem] = []
    instances = kv_instances(topo)
    for i, w in _workers(topo):
        kt = w.kv_transfer
        if w.kind in ("prefill", "decode") and kt is None:
            problems.append(Problem(("workers", i, "kind"), f"a {w.kind} worker needs kv_transfer "
                                    "(kv_connector, kv_role, ...) to hand the KV cache over"))
        if kt is None:
            continue
        if w.kind == "prefill" and kt.kv_role == "kv_consumer":
            problems.append(Problem(("workers", i, "kv_transfer", "kv_role"),
                                    "a prefill worker produces KV: use kv_role kv_producer (or kv_both)"))
        if w.kind == "decode" and kt.kv_role == "kv_producer":
            problems.append(Problem(("workers", i, "kv_transfer", "kv_role"),
                                    "a decode worker consumes KV: use kv_role kv_consumer (or kv_both)"))
        if kt.kv_connector in REMOVED_CONNECTORS:
            problems.append(Problem(("workers", i, "kv_transfer", "kv_connector"),
                                    REMOVED_CONNECTORS[kt.kv_connector]))
        else:
            known = installed_connectors()
            if known is not None and kt.kv_connector not in known:
                problems.append(Problem(("workers", i, "kv_transfer", "kv_connector"),
                                        f"the installed vLLM has no connector '{kt.kv_connector}'; "
                                        f"known: {', '.join(sorted(known))}"))
        if resolved.engines[i].pipeline_parallel_size != 1:
            problems.append(Problem(resolved.engines[i].blame("pipeline-parallel-size",
                                                              ("workers", i, "engine", "pipeline-parallel-size")),
                                    "pipeline-parallel-size must be 1 in a disaggregated deployment"))
    if not instances:
        return problems

    producers = [(i, w, r) for i, w, r in instances if w.kv_transfer and w.kv_transfer.kv_role == "kv_producer"]
    consumers = [(i, w, r) for i, w, r in instances if w.kv_transfer and w.kv_transfer.kv_role == "kv_consumer"]
    for i, w, rank in producers:
        for _, cw, crank in consumers:
            if rank is not None and crank is not None and rank >= crank:
                problems.append(Problem(("workers", i, "kv_transfer", "kv_rank"),
                                        f"kv_producer '{w.name}' has kv_rank {rank}, not lower than kv_consumer "
                                        f"'{cw.name}' (kv_rank {crank}): give producers the lower ranks"))
    for role in ("kv_producer", "kv_consumer"):
        sizes: dict[int, str] = {}
        for i, w, _ in instances:
            if w.kv_transfer and w.kv_transfer.kv_role == role:
                tp = resolved.engines[i].tensor_parallel_size
                if sizes and tp not in sizes:
                    other_tp, other = next(iter(sizes.items()))
                    problems.append(Problem(resolved.engines[i].blame("tensor-parallel-size",
                                                                      ("workers", i, "engine", "tensor-parallel-size")),
                                            f"{role} '{w.name}' has tensor-parallel-size {tp} but '{other}' has "
                                            f"{other_tp}: instances of one kv_role need the same TP size"))
                sizes.setdefault(tp, w.name)
    ranks_seen: dict[int, str] = {}
    size_reported: set[int] = set()
    for i, w, rank in instances:
        kt = w.kv_transfer
        assert kt is not None
        if rank is not None:
            if rank in ranks_seen:
                problems.append(Problem(("workers", i, "kv_transfer", "kv_rank"),
                                        f"kv_rank {rank} is already '{ranks_seen[rank]}'s: kv_ranks are unique"))
            ranks_seen[rank] = w.name
            if kt.kv_parallel_size is not None and rank >= kt.kv_parallel_size:
                problems.append(Problem(("workers", i, "kv_transfer", "kv_rank"),
                                        f"kv_rank {rank} is not below kv_parallel_size {kt.kv_parallel_size}"))
        if kt.kv_parallel_size is not None and kt.kv_parallel_size != len(instances) and i not in size_reported:
            size_reported.add(i)  # one message per worker, not one per replica
            problems.append(Problem(("workers", i, "kv_transfer", "kv_parallel_size"),
                                    f"kv_parallel_size is {kt.kv_parallel_size} but the topology has "
                                    f"{len(instances)} kv instance(s): make them equal"))
    hosts_p = {w.host for _, w, _ in producers}
    hosts_c = {w.host for _, w, _ in consumers}
    if len(hosts_p | hosts_c) > 1:
        for i, w, _ in instances:
            kt = w.kv_transfer
            if kt is not None and (kt.kv_ip is None or kt.kv_port is None):
                problems.append(Problem(("workers", i, "kv_transfer"),
                                        "prefill and decode run on different hosts: give kv_ip and kv_port "
                                        "(an address the other host can reach)"))
    return problems


def rule_roles(topo: Topology) -> list[Problem]:
    """A role is never guessed where it matters: kv_transfer without `kind:` would quietly become a
    monolith; and a disaggregated deployment needs a prefill side and a decode side."""
    problems: list[Problem] = []
    for i, w in _workers(topo):
        if w.kv_transfer is not None and not w.kind_given:
            role = {"kv_producer": "prefill", "kv_consumer": "decode"}.get(w.kv_transfer.kv_role, "prefill or decode")
            problems.append(Problem(("workers", i, "kv_transfer"),
                                    f"'{w.name}' has kv_transfer but no kind: say kind: {role} (without a kind it "
                                    "would run as a monolith and never hand its KV cache over)"))
    if problems:
        return problems  # a role is unknown: which side is missing cannot be said yet
    kinds = {w.kind for w in topo.workers}
    for have, need in (("prefill", "decode"), ("decode", "prefill")):
        if have in kinds and need not in kinds:
            first = next(i for i, w in _workers(topo) if w.kind == have)
            problems.append(Problem(("workers", first, "kind"),
                                    f"a disaggregated deployment needs both sides: there is a {have} worker but no "
                                    f"{need} worker; add one (kind: {need})"))
    return problems


def rule_kv_router(resolved: Resolved) -> list[Problem]:
    topo = resolved.topology
    problems: list[Problem] = []
    kv_workers = [(i, w) for i, w in _workers(topo) if w.kind == "kv_worker"]
    if topo.routers and not kv_workers:
        problems.append(Problem(("routers",), "a router needs workers of kind kv_worker behind it"))
    if kv_workers and not topo.routers:
        problems.append(Problem(("workers", kv_workers[0][0], "kind"),
                                "kv_worker processes are served through a router: add one under routers:"))
    block_sizes_of: dict[str, dict[int, str]] = {}  # per model: each model's kv_workers have their own router
    for i, w in kv_workers:
        block_sizes = block_sizes_of.setdefault(topo.model_of(w), {})
        engine = resolved.engines[i]
        if engine.prefix_caching is False:
            off = engine.flags["enable-prefix-caching"]
            what = "--no-enable-prefix-caching from args:" if off.origin == "args" else "enable-prefix-caching: false"
            problems.append(Problem(engine.blame("enable-prefix-caching", ("workers", i, "engine")),
                                    f"workers behind a KV router need prefix caching on: remove {what}"))
        bs = engine.block_size or 16
        if block_sizes and bs not in block_sizes:
            other_bs, other = next(iter(block_sizes.items()))
            problems.append(Problem(engine.blame("block-size", ("workers", i, "engine")),
                                    f"block-size {bs} differs from '{other}' ({other_bs}): workers behind one "
                                    "router must share one block size"))
        block_sizes.setdefault(bs, w.name)
    return problems


def served_names(resolved: Resolved, index: int) -> list[str]:
    """The names a worker's model is served by: its served-model-name, else the model as written (vLLM's
    default)."""
    given = resolved.engines[index].value("served-model-name")
    names = given if isinstance(given, list) else [given] if given else [resolved.topology.model_of(
        resolved.topology.workers[index])]
    return [str(n) for n in names]


def rule_frontend_models(resolved: Resolved) -> list[Problem]:
    """What a frontend knows a model by: the served names of its workers, which must agree (the frontend has
    one route per model, named by whichever registration it read first), and a frontend's `models:` names
    models the workers serve, each model once (flags under a name no model has would be ignored; two entries
    for one model would leave which one counts to chance)."""
    topo = resolved.topology
    if not topo.frontends:
        return []
    problems: list[Problem] = []
    model_of_name: dict[str, str] = {}
    first: dict[str, tuple[str, list[str]]] = {}  # model -> (its first worker, that worker's served names)
    for i, w in _workers(topo):
        model, names = topo.model_of(w), served_names(resolved, i)
        other = first.setdefault(model, (w.name, names))
        if sorted(other[1]) != sorted(names):
            problems.append(Problem(resolved.engines[i].blame("served-model-name", ("workers", i, "engine")),
                                    f"'{w.name}' serves {model} as {', '.join(names)}, '{other[0]}' as "
                                    f"{', '.join(other[1])}: a frontend knows a model by one set of names (else which "
                                    "worker registered first decides): give every worker of the model the same "
                                    "served-model-name"))
        for name in names:
            model_of_name.setdefault(name, model)
    for index, f in enumerate(topo.frontends):
        seen: dict[str, str] = {}  # model -> the name its entry was given under
        for name in f.models:
            path: PathKey = ("frontends", index, "models", name)
            known = model_of_name.get(name)
            if known is None:
                problems.append(Problem(path, f"no worker serves a model named '{name}', so these flags would apply "
                                        f"to nothing: the served names are {', '.join(sorted(model_of_name))} (a "
                                        "worker's served-model-name, else its model)"))
            elif known in seen:
                problems.append(Problem(path, f"'{name}' and '{seen[known]}' name the same model ({known}): give its "
                                        "flags under one of them"))
            else:
                seen[known] = name
    return problems


def rule_models(resolved: Resolved) -> list[Problem]:
    """Several models (a worker's or router's `model:`): each model's way in is whole on its own. Decode
    workers take KV only from prefill workers of their model, and a router routes only to kv_workers of
    its model (`PrefillPool`, `KvRouter` leave another model's aside), so a side missing for one model
    would leave its requests nowhere to go, or a router with nothing to route to. With one model the
    rules above say it."""
    topo = resolved.topology
    problems: list[Problem] = []
    if topo.frontends and all(topo.model_of(w) != topo.model for w in topo.workers):
        problems.append(Problem(("model",), f"no worker loads the topology's model {topo.model}, which a frontend "
                                "sends every request naming no model to: make it the model of one of the workers "
                                "(give that worker no model:)"))
    models = {topo.model_of(w) for w in topo.workers} | {topo.model_of(r) for r in topo.routers}
    if len(models) < 2:
        return problems
    owner: dict[str, tuple[str, str]] = {}  # served name -> (model, worker)
    for i, w in _workers(topo):
        model = topo.model_of(w)
        for name in served_names(resolved, i):
            other = owner.setdefault(name, (model, w.name))
            if other[0] != model:
                problems.append(Problem(resolved.engines[i].blame("served-model-name", ("workers", i, "engine")),
                                        f"'{w.name}' serves {model} as {name}, the name '{other[1]}' serves "
                                        f"{other[0]} by: a request for {name} would reach either; give each model "
                                        "its own served-model-name"))
    routed = {topo.model_of(r) for r in topo.routers}
    for model in sorted(models):
        kinds = {w.kind for w in topo.workers if topo.model_of(w) == model}
        first = {w.kind: i for i, w in reversed(list(_workers(topo))) if topo.model_of(w) == model}
        for have, need in (("prefill", "decode"), ("decode", "prefill")):
            if have in kinds and need not in kinds:
                problems.append(Problem(("workers", first[have], "kind"),
                                        f"model {model} has a {have} worker but no {need} worker of its own "
                                        f"(a {have} worker pairs only with workers of its model): add one "
                                        f"(kind: {need}, model: {model})"))
        if "kv_worker" in kinds and model not in routed:
            problems.append(Problem(("workers", first["kv_worker"], "kind"),
                                    f"model {model} has kv_worker processes but no router of its own (a router "
                                    f"routes only to workers of its model): add one under routers: with "
                                    f"model: {model}"))
    for i, r in enumerate(topo.routers):
        model = topo.model_of(r)
        if not any(w.kind == "kv_worker" and topo.model_of(w) == model for w in topo.workers):
            problems.append(Problem(("routers", i, "model" if r.model else "name"),
                                    f"router '{r.name}' serves {model}, and no kv_worker loads it: give it the "
                                    "model of the kv_workers it should route to (model:)"))
    return problems


def deployment_hosts(topo: Topology) -> set[str]:
    return {p.host for _, procs in topo.sections() for p in procs if p.host is not None}


def rule_multinode(topo: Topology) -> list[Problem]:
    """Processes on several hosts: every one names its host, and the services are reachable from all.

    A managed etcd/nats-server is started by the launcher of one host; on a loopback address no
    other host can reach it, and each host would quietly start its own and never see the others.
    """
    hosts = deployment_hosts(topo)
    if not hosts:
        return []
    problems: list[Problem] = []
    for section, procs in topo.sections():
        for i, p in enumerate(procs):
            if p.host is None:
                problems.append(Problem((section, i, "name"), f"'{p.name}' names no host while others do "
                                        f"({', '.join(sorted(hosts))}): `launcher up --host NAME` would never "
                                        "start it; give it host:"))
    if len(hosts) < 2:
        return problems
    for i, w in _workers(topo):
        if w.kv_transfer is not None and w.kv_transfer.kv_ip is not None and is_loopback(w.kv_transfer.kv_ip):
            problems.append(Problem(("workers", i, "kv_transfer", "kv_ip"),
                                    f"kv_ip {w.kv_transfer.kv_ip} is a loopback address, which the other "
                                    "hosts cannot reach: give this host's routable address"))
    if topo.services.managed != "never":
        for key in ("etcd", "nats"):
            value = getattr(topo.services, key)
            bad = [e.strip() for e in value.split(",") if e.strip() and is_loopback(e.strip())]
            if bad:
                problems.append(Problem(("services", key),
                                        f"{bad[0]} is a loopback address but processes run on {len(hosts)} hosts "
                                        f"({', '.join(sorted(hosts))}): a managed {key} there serves only its "
                                        "own host. Give a routable address (the launcher of the host that owns "
                                        "it starts the server there), or run shared servers "
                                        "(container/docker-compose.yml) and set services.managed: never"))
    return problems


def rule_ports(resolved: Resolved) -> list[Problem]:
    """A port is listened on by one process per host: a frontend's HTTP port, each worker's metrics port
    (launcher.resolve decides the default ones)."""
    problems: list[Problem] = []
    owner: dict[tuple[str | None, int], str] = {}
    for path, host, name, port in listening_ports(resolved):
        other = owner.get((host, port))
        if other is not None:
            problems.append(Problem(path, f"port {port} is already '{other}''s: give '{name}' another port"))
        owner[(host, port)] = name
    return problems


def rule_frontends(resolved: Resolved) -> list[Problem]:
    topo = resolved.topology
    if topo.frontends and entry_component({w.kind for w in topo.workers} | {r.kind for r in topo.routers}) is None:
        return [Problem(("frontends",), "a frontend needs something to call: a monolith, decode or router process")]
    return []


def rule_env_endpoints(resolved: Resolved) -> list[Problem]:
    """rule_multinode checks the file; ETCD_ENDPOINTS / NATS_SERVER (read by resolve, as `up` reads them)
    can still bring a loopback address back, and a managed server there would serve one host alone."""
    topo = resolved.topology
    hosts = deployment_hosts(topo)
    if len(hosts) < 2 or topo.services.managed == "never":
        return []
    for var, key, file_value, values in (("ETCD_ENDPOINTS", "etcd", topo.services.etcd, resolved.endpoints.etcd),
                                         ("NATS_SERVER", "nats", topo.services.nats, [resolved.endpoints.nats])):
        bad = [v for v in values if is_loopback(v)]
        if bad and os.environ.get(var):
            return [Problem(("services", key),
                            f"{var}={os.environ[var]} is a loopback address but {topo.name} runs on {len(hosts)} "
                            f"hosts ({', '.join(sorted(hosts))}) with services.managed: {topo.services.managed}: "
                            f"give a routable address (the file says {file_value}), or set services.managed: never "
                            "with shared servers")]
    return []


def rule_security(resolved: Resolved) -> list[Problem]:
    """What TLS needs that the file does not give, and what the file asks that would not be honoured."""
    topo, security = resolved.topology, resolved.endpoints.security
    problems: list[Problem] = []
    if topo.services.tls is not None and topo.services.managed != "never":
        problems.append(Problem(("services", "tls"), f"services.tls names credentials for servers someone else "
                                f"runs, but services.managed is {topo.services.managed}: the launcher makes and "
                                "uses its own for the servers it starts. Remove services.tls, or set managed: never"))
    if topo.services.tls is not None and not security.tls:
        problems.append(Problem(("services", "tls"), "services.tls is given but services.security is none: "
                                "remove one of them"))
    if security.tls and security.credentials is not None:
        for proc in resolved.processes:
            if proc.name in RESERVED_IDENTITIES:
                problems.append(Problem((*proc.path, "name"),
                                        f"'{proc.name}' cannot name a process of a secured deployment: its "
                                        "certificate would be the " + {"ca": "CA's", "server": "servers'",
                                                                         "operator": "operator's"}[proc.name]
                                        + " own; rename it"))
    if security.problem:
        problems.append(Problem(("services", "security"), f"TLS ({security.reason}): {security.problem}"))
    if topo.services.security == "none":
        secured = [e for e in ([*topo.services.etcd.split(","), topo.services.nats])
                   if e.strip().split("://", 1)[0] in ("https", "tls")]
        if secured:
            key = "etcd" if secured[0] in topo.services.etcd else "nats"
            problems.append(Problem(("services", key), f"{secured[0].strip()} asks for TLS but services.security "
                                    "is none: write http:// / nats://, or remove security: none"))
    return problems


def security_warnings(resolved: Resolved) -> list[str]:
    """A cross-host deployment that opted out of security: allowed, said out loud."""
    topo = resolved.topology
    exposed = [e for e in [*resolved.endpoints.etcd, resolved.endpoints.nats] if not is_loopback(e)]
    if resolved.endpoints.security.tls or not exposed:
        return []
    return [f"{topo.name}: services.security is none and {exposed[0]} is not a loopback address: anyone who "
            "reaches etcd or NATS there can send requests past the frontend's API key, read prompts and answers, "
            "and register fake workers. Remove security: none to get TLS and client certificates"]


RULES: list[Callable[[Resolved], list[Problem]]] = [
    rule_security,
    rule_ports,
    rule_frontends,
    rule_unique_names,
    rule_devices,
    lambda resolved: rule_roles(resolved.topology),
    rule_disaggregation,
    rule_kv_router,
    rule_models,
    rule_frontend_models,
    lambda resolved: rule_multinode(resolved.topology),
    rule_env_endpoints,
]


def check(target: Resolved | Topology) -> list[Problem]:
    """The problems of `args:` entries resolve could not read, then every rule's (a Topology is resolved first)."""
    resolved = target if isinstance(target, Resolved) else resolve(target)
    problems: list[Problem] = list(resolved.problems)
    for rule in RULES:
        problems.extend(rule(resolved))
    return problems


