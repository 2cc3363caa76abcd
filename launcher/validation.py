"""The whole check of a topology file, in order: YAML, schema, engine flags, resolution, rules.

Every stage reports problems as `file:line:col: field: message` lines; the CLI prints them,
redacted, with one footer. The rules run only on a schema-valid topology, on its resolved
configuration (launcher.resolve: what each process will get, `args:` included, and the endpoints
ETCD_ENDPOINTS / NATS_SERVER override); the `engine:` flags are checked from the file as written,
so a misspelt flag is reported together with the schema's problems instead of one round later.
`validate`, `plan`, `up`, `restart --file` and `export` all run check_file: the same checks.

Only what needs the live host that starts the processes is left for `up`: host_problems.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher import addresses, engine_flags, gpus, rules
from launcher.resolve import ResolvedProcess, resolve
from launcher.topology import Topology, TopologyError, parse_topology
from launcher.yamlpos import LoadedYaml, PathKey, YamlLoadError, load_yaml

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """A key or value quoted in a message may hold a newline or a control character: show it escaped,
    so every problem stays one `file:line:col: ...` line."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


@dataclass
class Checked:
    topology: Topology | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _engine_problems(loaded: LoadedYaml, table: engine_flags.FlagTable | None) -> list[rules.Problem]:
    data = loaded.data if isinstance(loaded.data, dict) else {}
    raw_workers = data.get("workers")
    workers: list[Any] = raw_workers if isinstance(raw_workers, list) else []
    kinds = [w.get("kind") if isinstance(w, dict) else None for w in workers]
    mappings: list[tuple[PathKey, Any, str | None]] = [
        (("engine",), data.get("engine"), "kv_worker" if "kv_worker" in kinds else "")]
    mappings += [(("workers", i, "engine"), w.get("engine"), kinds[i] if isinstance(kinds[i], str) else "")
                 for i, w in enumerate(workers) if isinstance(w, dict)]
    out = []
    for path, flags, kind in mappings:
        if isinstance(flags, dict):
            for key, message in engine_flags.check_flags(flags, table, kind):
                out.append(rules.Problem((*path, key), message))
    return out


def check_file(path: Path, say: Callable[[str], None] | None = None) -> Checked:
    """say: told before a slow step (reading vLLM's flags the first time for a vLLM version)."""
    try:
        loaded = load_yaml(path)
    except YamlLoadError as exc:
        return Checked(None, [one_line(str(exc))])
    result = Checked(None)
    table = None
    pending = engine_flags.pending_build()
    if pending and say:
        say(f"reading vLLM {pending[0]}'s engine flags, once for this version (about 30 s; cached in {pending[1]})")
    try:
        table = engine_flags.load_table()
    except engine_flags.TableUnavailable as exc:
        result.warnings.append(str(exc))
    try:
        result.topology = parse_topology(loaded)
    except TopologyError as exc:
        result.problems += exc.problems
    flagged = {p.split(": ", 1)[0] for p in result.problems}
    for problem in _engine_problems(loaded, table):
        text = problem.render(loaded)
        if text.split(": ", 1)[0] not in flagged:  # the schema already said what is wrong there
            result.problems.append(text)
    result.problems += env_endpoint_problems(dict(os.environ))
    if result.topology is not None:
        resolved = resolve(result.topology, table=table)
        result.problems += [p.render(loaded) for p in rules.check(resolved)]
        result.warnings += rules.security_warnings(resolved)
    if result.problems:
        result.topology = None
    result.problems = [one_line(p) for p in result.problems]
    result.warnings = [one_line(w) for w in result.warnings]
    return result


def env_endpoint_problems(environ: dict[str, str]) -> list[str]:
    """ETCD_ENDPOINTS / NATS_SERVER override the file at `up`: the same URL checks as the schema's."""
    problems = []
    for var, schemes, what in (("ETCD_ENDPOINTS", addresses.ETCD_SCHEMES, "etcd"),
                               ("NATS_SERVER", addresses.NATS_SCHEMES, "NATS")):
        if environ.get(var):
            try:
                addresses.check_urls(environ[var], schemes, what)
            except ValueError as exc:
                problems.append(one_line(f"{var}: {exc}"))
    return problems


def host_problems(procs: list[ResolvedProcess], *, check_ports: bool = True) -> list[str]:
    """The checks that need the live host that starts `procs`, so not `validate`'s: the file may be
    validated elsewhere (a laptop without GPUs, CI), and a port free at validate time may be taken
    by the time the processes start. Run at `up` and `restart --file`, through one call
    (cli.check_host), and nowhere else:

    - every GPU index given exists on this host (nvidia-smi);
    - no port a process will listen on is held by something else (check_ports; off for
      `restart --file`, whose ports the running deployment itself holds).
    """
    problems: list[str] = []
    try:
        gpus.check_gpus(procs)
    except gpus.GpuError as exc:
        problems.append(one_line(str(exc)))
    if check_ports:
        problems += ports_in_use(procs)
    return problems


def ports_in_use(procs: list[Any]) -> list[str]:
    """Ports these processes (anything with .name and .ports) will listen on that something already holds
    (another deployment, a `vllm serve`): said now, not as a crash loop after the engines loaded."""
    problems = []
    for proc in procs:
        for role, port in proc.ports.items():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    problems.append(f"port {port} ({proc.name}'s {role} port) is already in use on this host: stop "
                                    f"what holds it, or give '{proc.name}' another port in the topology")
    return problems
