"""`launcher validate | plan | up | status | ls | restart | down | logs | attach | schema | export`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from launcher import plan as planning
from launcher import proctree, restart, secure, services, state, validation
from launcher.credentials import OPERATOR
from launcher.plan import Endpoints, ProcessSpec, build_plan, select_host
from launcher.redact import redact_argv, redact_env, redact_obj, redact_text
from launcher.resolve import Resolved, resolve
from launcher.state import RunDir
from launcher.status import collect, print_status, render
from launcher.supervisor import DRAINING, KILL_WAIT, leftovers, log_tail
from launcher.topology import Topology, json_schema

# Piped output (tests, `| less`) gets a wide table instead of rich's 80-column default.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

EXIT_INVALID = 2
RESTART_PICKUP_S = 30.0  # a live supervisor takes a request within a tick; a step may hang up to tmux's timeout


def load_checked(path: Path) -> Topology:
    """YAML, schema, engine flags and rules (launcher.validation); on any problem print every one
    (file:line:col, redacted) and the footer, and exit 2."""
    checked = validation.check_file(path, say=lambda note: err.print(escape(note), style="dim", soft_wrap=True))
    for warning in checked.warnings:
        err.print(f"[yellow]warning[/] {escape(redact_text(warning))}", soft_wrap=True)
    if checked.topology is None:
        for problem in checked.problems:
            err.print(f"[red]error[/] {escape(redact_text(problem))}", soft_wrap=True)
        err.print(escape(redact_text(f"{len(checked.problems)} problem(s) in {path}; nothing was started")),
                  soft_wrap=True)
        sys.exit(EXIT_INVALID)
    return checked.topology


def cmd_validate(args: argparse.Namespace) -> int:
    topo = load_checked(args.topology)
    n = len(build_plan(topo))
    console.print(f"[green]ok[/] {args.topology}: {n} process(es), namespace {topo.effective_namespace}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    topo = load_checked(args.topology)
    rd = RunDir.for_deployment(topo.name, args.host)
    endpoints = Endpoints.resolve(topo, credentials=rd.path / "credentials")
    specs = select_host(build_plan(topo, endpoints=endpoints, kv_dir=rd.path / "kv"), args.host)
    if args.json:
        print(json.dumps(redact_obj([s.to_json() for s in specs]), indent=1))
        return 0
    console.print(redact_text(f"[bold]{topo.name}[/] namespace={topo.effective_namespace} backend={topo.backend} "
                              f"etcd={','.join(endpoints.etcd)} nats={endpoints.nats} "
                              f"(managed: {topo.services.managed})"))
    security = endpoints.security
    console.print(("security: TLS and client certificates" if security.tls else "security: none (in clear)")
                  + f": {security.reason}", markup=False, soft_wrap=True)
    for s in specs:
        deps = f" after {', '.join(s.depends_on)}" if s.depends_on else ""
        console.print(f"\n[bold]{s.name}[/] ({s.kind}, {s.devices}{', host ' + s.host if s.host else ''}){deps}")
        for note in s.notes:
            console.print(f"  note: {note}", soft_wrap=True, markup=False)
        console.print("  env: " + " ".join(f"{k}={v}" for k, v in redact_env(s.env).items()), soft_wrap=True,
                      markup=False)
        console.print("  argv: " + subprocess.list2cmdline(redact_argv(s.argv)), soft_wrap=True, markup=False)
    return 0


def _plan_json(topo: Topology, every_spec: list[ProcessSpec], endpoints: Endpoints, backend: str,
               host: str | None, topology_file: Path) -> dict[str, Any]:
    """plan.json: this host's processes, and under `deployment` every process on any host (name, kind,
    host, devices), so that `status` on one host can list the others', which only etcd knows about."""
    return {
        "name": topo.name, "namespace": topo.effective_namespace, "backend": backend, "host": host,
        "etcd": endpoints.etcd, "nats": endpoints.nats, "topology": str(topology_file.resolve()),
        # the launcher's own identity for the servers (status, the supervisor): file paths, no key
        "tls": dataclasses.asdict(tls) if (tls := endpoints.security.files_for(OPERATOR)) else None,
        "processes": [s.to_json() for s in select_host(every_spec, host)],
        "deployment": [{"name": s.name, "kind": s.kind, "host": s.host, "devices": s.devices} for s in every_spec],
    }


def _spawn_supervisor(rd: RunDir, foreground: bool) -> subprocess.Popen[bytes]:
    with (rd.logs / "supervisor.log").open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "launcher.supervisor", str(rd.path)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=not foreground)


def _print_changes(procs: dict[str, dict[str, Any]], seen: dict[str, str]) -> None:
    """A line for each process whose state changed since the last call: `up`'s and `restart`'s progress."""
    for name, p in procs.items():
        if seen.get(name) == p["state"]:
            continue
        seen[name] = p["state"]
        if p["state"] in ("starting", "ready", "failed", "backoff", "exited", "draining"):
            extra = f" (pid {p['pid']})" if p["state"] in ("starting", "draining") else ""
            if p["state"] == "ready" and p.get("started_at") and p.get("ready_at"):
                extra = f" in {p['ready_at'] - p['started_at']:.1f} s"
            msg = f": {p['message']}" if p.get("message") and p["state"] != "starting" else ""
            console.print(f"  {name}: {p['state']}{extra}{redact_text(msg)}", markup=False)


def _wait_ready(rd: RunDir, sup: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Show progress until every process is ready, or one failed, or the supervisor died."""
    start = time.monotonic()
    seen: dict[str, str] = {}
    with console.status("starting...") as spinner:
        while True:
            procs = rd.state().get("processes", {})
            _print_changes(procs, seen)
            states = [p["state"] for p in procs.values()]
            if procs and all(s == "ready" for s in states):
                return True
            if procs and all(s in ("ready", "failed", "exited") for s in states):
                return False
            if sup.poll() is not None:
                err.print(f"[red]the supervisor exited (code {sup.returncode})[/]; see {rd.logs / 'supervisor.log'}")
                for line in log_tail(rd.logs / "supervisor.log"):
                    err.print(f"  {redact_text(line)}", markup=False)
                return False
            waiting = [n for n, p in procs.items() if p["state"] in ("starting", "pending", "backoff", "draining")]
            if waiting:
                name = waiting[0]
                p = procs[name]
                elapsed = time.time() - p["started_at"] if p.get("started_at") else 0.0
                last = next((ln for ln in reversed(log_tail(rd.log_path(name), 5)) if ln.strip()), "")
                spinner.update(escape(redact_text(f"waiting for {name} ({p['state']}, {elapsed:.0f} s) {last[-90:]}")))
            if timeout is not None and time.monotonic() - start > timeout:
                err.print(f"[yellow]not ready after {timeout:.0f} s; still starting in the background[/]")
                return False
            time.sleep(0.2)


def cmd_up(args: argparse.Namespace) -> int:
    topo = load_checked(args.topology)
    backend = args.backend or topo.backend
    rd = RunDir.for_deployment(topo.name, args.host)
    if rd.supervisor_pid() is not None:
        console.print(f"[yellow]{topo.name} is already up[/] (supervisor pid {rd.supervisor_pid()}); nothing started. "
                      f"`launcher restart {rd.name} --file {args.topology}` applies this file to it; "
                      "`launcher down` first to start it anew.")
        print_status(collect(rd), console)
        return 0
    resolved = resolve(topo, kv_dir=rd.path / "kv",
                       endpoints=Endpoints.resolve(topo, credentials=rd.path / "credentials"))
    endpoints = resolved.endpoints
    every_spec = planning.render(resolved)
    specs = select_host(every_spec, args.host)
    if not specs:
        err.print(f"no process of {args.topology} runs on host '{args.host}'")
        return EXIT_INVALID
    taken = check_host(resolved, specs)
    if taken:
        for line in taken:
            err.print(f"[red]error[/] {escape(redact_text(line))}", soft_wrap=True)
        err.print(f"{len(taken)} problem(s) in {args.topology}; nothing was started")
        return EXIT_INVALID
    rd.create()
    bundle = args.credentials or (Path(os.environ["LAUNCHER_CREDENTIALS"]) if os.environ.get("LAUNCHER_CREDENTIALS")
                                  else None)
    try:
        security = secure.prepare(resolved, bundle, say=lambda m: console.print(f"  {m}", markup=False))
    except secure.CredentialsError as exc:
        err.print(f"[red]error[/] {escape(redact_text(str(exc)))}", soft_wrap=True)
        return EXIT_INVALID
    for stale in (rd.state_file, rd.path / "stop.json"):
        with contextlib.suppress(OSError):
            stale.unlink()
    shutil.rmtree(restart.requests_dir(rd), ignore_errors=True)  # a restart asked of an earlier run
    previous = services.from_json(state.read_json(rd.services_file, []) or [])
    if args.foreground:  # from before anything starts: a SIGTERM or a closed terminal as a Ctrl-C
        for sig in FOREGROUND_STOP_SIGNALS:
            signal.signal(sig, _terminate_as_interrupt)
    try:
        used = services.ensure_services(endpoints.etcd, endpoints.nats, topo.services.managed, rd.path,
                                        say=lambda m: console.print(f"  {redact_text(str(m))}"), security=security)
    except services.ServiceError as exc:
        err.print(f"[red]error[/] {escape(redact_text(str(exc)))}")
        return 1
    # An earlier run that was not taken down may have used servers this one no longer does: give them up.
    unused = [p for p in previous if (p.name, p.endpoint) not in {(u.name, u.endpoint) for u in used}]
    if unused:
        services.release_services(unused, rd.path, say=lambda m: console.print(f"  {m}"))
    state.write_json(rd.services_file, services.to_json(used))
    try:
        state.write_json(rd.plan_file, _plan_json(topo, every_spec, endpoints, backend, args.host, args.topology))
        t0 = time.monotonic()
        sup = _spawn_supervisor(rd, args.foreground)
    except BaseException:  # nothing supervises the services this `up` took: give them back
        services.release_services(used, rd.path, say=lambda m: console.print(f"  {m}"))
        state.write_json(rd.services_file, [])
        raise
    try:
        console.print(f"[bold]{topo.name}[/]: {len(specs)} process(es), logs in {rd.logs}")
        return _report_and_supervise(args, rd, sup, topo, specs, backend, endpoints.security.tls, t0)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM in the foreground: at any point from here on
        if args.foreground:
            return _foreground_stop(rd, sup)
        console.print("\nstopped waiting; the deployment keeps starting in the background "
                      "(`launcher status`, `launcher down`)")
        return 130


def _report_and_supervise(args: argparse.Namespace, rd: RunDir, sup: subprocess.Popen[bytes], topo: Topology,
                          specs: list[ProcessSpec], backend: str, secured: bool, t0: float) -> int:
    """`up` after the supervisor started: progress until ready, the status and how to send a request; in
    the foreground, then wait on the supervisor (a KeyboardInterrupt anywhere here is the caller's to stop)."""
    ok = _wait_ready(rd, sup, args.timeout)
    elapsed = time.monotonic() - t0
    print_status(collect(rd), console)
    if ok and backend == "tmux":
        from launcher.backends.tmux import attach_argv

        first = specs[0].name
        console.print(f"live panes: {' '.join(attach_argv(rd, first))}  (or `launcher attach {first}`)")
    if ok:
        console.print(f"[green]ready[/] in {elapsed:.1f} s. Send a request:", highlight=False)
        for line in request_examples(topo, specs, secured=secured, host=args.host):
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[red]not every process is ready[/]: `launcher logs NAME`, or `launcher down`")
    if args.foreground:
        console.print("supervising in the foreground; Ctrl-C or SIGTERM stops everything")
        sup.wait()
        # Nobody asked: `launcher down` from elsewhere (code 0), or the supervisor failed or was killed.
        err.print(f"the supervisor exited by itself (code {sup.returncode}); see {rd.logs / 'supervisor.log'}")
        _foreground_stop(rd, sup)
        return 0 if sup.returncode == 0 else 1
    return 0 if ok else 1


def check_host(resolved: Resolved, specs: list[ProcessSpec], check_ports: bool = True) -> list[str]:
    """validation.host_problems for this host's processes: the one call of the checks that need the
    live host (GPUs present, ports free); everything else was checked by load_checked."""
    mine = {s.name for s in specs}
    return validation.host_problems([p for p in resolved.processes if p.name in mine], check_ports=check_ports)


def request_examples(topo: Topology, specs: list[ProcessSpec], secured: bool = False,
                     host: str | None = None) -> list[str]:
    """A curl line for each frontend this host runs (the API key by its variable, never its value),
    and the NATS client."""
    lines = []
    for spec, front in ((s, f) for s in specs for f in topo.frontends if s.name == f.name and s.url):
        body = json.dumps({"model": served_model_name(topo), "max_tokens": 32,
                           "messages": [{"role": "user", "content": "what is the capital of france?"}]})
        auth = ["-H", f'"Authorization: Bearer ${front.api_key_env}"'] if front.api_key_env else []
        argv = ["curl", "-s", f"{spec.url}/v1/chat/completions", "-H", shlex.quote("Content-Type: application/json"),
                *auth, "-d", shlex.quote(body)]
        lines.append(" ".join(argv))
    client = (f"python -m workers.common.client --namespace {topo.effective_namespace} "
              "--prompt 'what is the capital of france?' --chat")
    if secured:  # the seed client needs the operator's certificate, as every client of a secured deployment
        client = f'eval "$(launcher credentials env {topo.name}{" --host " + host if host else ""})" && {client}'
    lines.append(client)
    return lines


def served_model_name(topo: Topology) -> str:
    """The name clients use for the topology's model: vLLM's --served-model-name, else the model."""
    names = resolve(topo).engines[0].value("served-model-name") if topo.workers else None
    if isinstance(names, list) and names:
        return str(names[0])
    return str(names) if names else topo.model


# What `up --foreground` takes as a Ctrl-C: `docker stop` / Kubernetes / systemd (SIGTERM), a closed terminal.
FOREGROUND_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    """`up --foreground` stops everything on SIGTERM as on Ctrl-C: what `docker stop`, systemd and
    Kubernetes send the command they run, which otherwise died at once and left its processes to be
    SIGKILLed without a drain."""
    raise KeyboardInterrupt


def _foreground_stop(rd: RunDir, sup: subprocess.Popen[bytes]) -> int:
    # Stopping is bounded (each process's drain deadline, then SIGKILL): a second Ctrl-C must not cut it
    # short and leave services or sessions behind. SIGKILL still ends this process at once.
    for sig in (signal.SIGINT, *FOREGROUND_STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    console.print("stopping...")
    with contextlib.suppress(ProcessLookupError):
        sup.send_signal(signal.SIGTERM)
    with contextlib.suppress(KeyboardInterrupt):
        sup.wait()
    _down(rd)
    return 0


def _stop_budget(plan: dict[str, Any], grace: float | None) -> float:
    """How long the supervisor may take to stop: the longest kill deadline (`grace`, else each process's
    drain_timeout + margin), SIGKILL's own wait, and a margin for etcd and the backend."""
    specs = [ProcessSpec.from_json(p) for p in plan.get("processes", [])]
    longest = grace if grace is not None else max((s.kill_after for s in specs), default=0.0)
    return longest + KILL_WAIT + 30


def _down(rd: RunDir, grace: float | None = None,
          progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Stop the supervisor (which drains and stops its processes), then sweep leftovers and managed
    services. `grace`: seconds from SIGTERM to SIGKILL for every process (None: each its own)."""
    pid = rd.supervisor_pid()
    if pid is not None:
        state.write_json(rd.path / "stop.json", {"grace": grace})
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _stop_budget(rd.plan(), grace)
        while rd.supervisor_pid() is not None and time.monotonic() < deadline:
            if progress is not None:
                progress(rd.state())
            time.sleep(0.1)
    swept = 0
    for p in rd.state().get("processes", {}).values():
        for proc in leftovers({int(k): v for k, v in p.get("pids_seen", {}).items()}):
            swept += len(proctree.stop_tree(proc.pid, grace=2))
    svc = services.from_json(state.read_json(rd.services_file, []) or [])
    notes: list[str] = []
    stopped = services.release_services(svc, rd.path, say=notes.append)
    state.write_json(rd.services_file, [])
    if rd.plan().get("backend") == "tmux":
        from launcher.backends.tmux import kill_sessions

        kill_sessions(rd)
    return {"supervisor": pid, "swept": swept, "services": stopped, "service_notes": notes}


def _stopping_text(st: dict[str, Any]) -> str:
    draining = [n for n, p in st.get("processes", {}).items() if p.get("state") == DRAINING]
    return f"draining {', '.join(draining)}" if draining else "stopping..."


def cmd_down(args: argparse.Namespace) -> int:
    rd = _find(args.name, args.host)
    with console.status("stopping...") as spinner:
        result = _down(rd, args.grace, progress=lambda st: spinner.update(_stopping_text(st)))
    sup = f"supervisor {result['supervisor']} stopped" if result["supervisor"] else "no supervisor was running"
    extra = f", {result['swept']} leftover process(es) killed" if result["swept"] else ""
    console.print(f"{rd.name}: {sup}{extra}")
    for note in result["service_notes"]:
        console.print(f"  {note}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """Ask the running supervisor to restart processes (see launcher/restart.py), then follow it."""
    rd = _find(args.name, args.host)
    pid = rd.supervisor_pid()
    if pid is None:
        err.print(f"{rd.name} is not running (no supervisor): `launcher up` it")
        return 1
    plan = rd.plan()
    current = [ProcessSpec.from_json(p) for p in plan.get("processes", [])]
    new_plan = _restart_plan(rd, plan, args.file) if args.file else None
    specs = current if new_plan is None else [ProcessSpec.from_json(p) for p in new_plan["processes"]]
    try:
        names = (restart.changed(current, specs) if new_plan is not None and not args.processes
                 else restart.resolve(specs, args.processes))
    except ValueError as exc:
        err.print(f"[red]error[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_INVALID
    if not names:
        console.print(f"{rd.name}: {args.file} changes no process of this host; nothing restarted")
        return 0
    if new_plan is not None:
        kept = [n for n in restart.changed(current, specs) if n not in names]
        if kept:
            console.print(f"note: {', '.join(kept)} changed too but keep running as they are; they start with "
                          "the new plan at their next (re)start", soft_wrap=True)
    req = restart.RestartRequest(id=restart.new_id(), processes=names, rolling=args.rolling,
                                 new_plan=new_plan is not None)
    seen = {n: p["state"] for n, p in rd.state().get("processes", {}).items()}  # show changes from now on
    restart.write_request(rd, req, new_plan)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)  # wakes it now; it would find the request on its next tick anyway
    console.print(f"{rd.name}: restarting {', '.join(names)}{' one at a time' if args.rolling else ''}")
    try:
        return _follow_restart(rd, req, seen, args.timeout)
    except KeyboardInterrupt:
        console.print("\nstopped following; the restart goes on in the background (`launcher status`)")
        return 130


def _restart_plan(rd: RunDir, plan: dict[str, Any], path: Path) -> dict[str, Any]:
    """The plan of `path` for this deployment: the checks `up` runs, with the servers it runs with; exits 2
    if the file is invalid or names another deployment, namespace or set of processes."""
    topo = load_checked(path)
    endpoints = dataclasses.replace(Endpoints.resolve(topo, credentials=rd.path / "credentials"),
                                    etcd=list(plan.get("etcd", [])), nats=plan.get("nats", ""))
    resolved = resolve(topo, endpoints=endpoints, kv_dir=rd.path / "kv")
    new = _plan_json(topo, planning.render(resolved), endpoints, plan.get("backend", topo.backend),
                     plan.get("host"), path)
    specs = [ProcessSpec.from_json(p) for p in new["processes"]]
    old_names = {p["name"] for p in plan.get("processes", [])}
    new_names = {s.name for s in specs}
    problems = []
    if (topo.name, topo.effective_namespace) != (plan.get("name"), plan.get("namespace")):
        problems.append(f"{path} is deployment {topo.name} (namespace {topo.effective_namespace}), not "
                        f"{plan.get('name')} (namespace {plan.get('namespace')})")
    if old_names != new_names:
        added, removed = sorted(new_names - old_names), sorted(old_names - new_names)
        problems.append(f"{path} changes the set of processes (added: {', '.join(added) or '-'}; removed: "
                        f"{', '.join(removed) or '-'}): `launcher down` and `launcher up` to apply it")
    problems += check_host(resolved, specs, check_ports=False)  # its own processes hold its ports
    for problem in problems:
        err.print(f"[red]error[/] {escape(redact_text(problem))}", soft_wrap=True)
    if problems:
        err.print("nothing was restarted")
        sys.exit(EXIT_INVALID)
    return new


def _follow_restart(rd: RunDir, req: restart.RestartRequest, seen: dict[str, str], timeout: float | None) -> int:
    """Show each process's state changes until the supervisor says the job ended; 0 if every process came back."""
    start = time.monotonic()
    with console.status("restarting...") as spinner:
        while True:
            st = rd.state()
            job = next((j for j in st.get("restart_jobs", []) if j.get("id") == req.id), None)
            if job is not None:
                procs = st.get("processes", {})
                _print_changes({n: procs[n] for n in job["processes"] if n in procs}, seen)
                if job["state"] != "running":
                    return _restart_result(job)
                busy = [n for n, phase in job["phase"].items() if phase == "restarting"]
                spinner.update(f"restarting {', '.join(busy)} ({time.monotonic() - start:.0f} s)")
            elif time.monotonic() - start > RESTART_PICKUP_S and restart.withdraw(rd, req):
                err.print(f"[red]the supervisor did not take the request within {RESTART_PICKUP_S:.0f} s[/]; "
                          f"it is withdrawn, nothing was restarted; see {rd.logs / 'supervisor.log'}")
                return 1
            if rd.supervisor_pid() is None:
                err.print(f"[red]the supervisor exited[/]; see {rd.logs / 'supervisor.log'}")
                return 1
            if timeout is not None and time.monotonic() - start > timeout:
                err.print(f"[yellow]not done after {timeout:.0f} s; the restart goes on in the background[/] "
                          "(`launcher status`)")
                return 1
            time.sleep(0.2)


def _restart_result(job: dict[str, Any]) -> int:
    if job["state"] == "done":
        console.print(f"[green]restarted[/] {', '.join(job['processes'])}: each registered again with a new pid")
        return 0
    verb = "refused" if job["state"] == "rejected" else "failed"
    err.print(f"[red]restart {verb}[/]: {escape(redact_text(job['message']))}", soft_wrap=True)
    return 1


def _find(name: str | None, host: str | None = None) -> RunDir:
    """By name; with --host, that host's share (<name>@<host>), also when only the host is given."""
    try:
        if name and host and not name.endswith(f"@{host}"):
            name = f"{name}@{host}"
        elif host and not name:
            mine = [d for d in state.deployments() if d.name.endswith(f"@{host}")]
            return state.only_one(mine, f"for host '{host}' under {state.state_root()}")
        return state.find(name)
    except state.NoDeployment as exc:
        err.print(str(exc))
        sys.exit(1)


def cmd_status(args: argparse.Namespace) -> int:
    targets = state.deployments() if args.all else [_find(args.name, args.host)]
    if args.watch:
        from rich.live import Live

        rd = targets[0]
        with Live(console=console, refresh_per_second=1) as live, contextlib.suppress(KeyboardInterrupt):
            while True:
                live.update(render(redact_obj(collect(rd, sample=1.0))))
        return 0
    infos = [collect(rd) for rd in targets]
    if args.json:
        print(json.dumps(redact_obj(infos if args.all else infos[0]), indent=1))
    else:
        for info in infos:
            print_status(info, console)
    return 0


def cmd_credentials_export(args: argparse.Namespace) -> int:
    rd = _find(args.name, args.host)
    try:
        members = secure.export_bundle(rd, args.output)
    except secure.CredentialsError as exc:
        err.print(f"[red]error[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    console.print(f"wrote {args.output} (0600): the CA certificate and {(len(members) - 1) // 2} identities' "
                  "certificates and keys, not the CA's key. Copy it to the other hosts and run "
                  f"`launcher up FILE --host H --credentials {args.output.name}` there; keep it as secret as a "
                  "password", markup=False, soft_wrap=True)
    return 0


def cmd_credentials_env(args: argparse.Namespace) -> int:
    rd = _find(args.name, args.host)
    print("\n".join(secure.env_lines(rd)))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """Every deployment under LAUNCHER_HOME with its condition; cheap (no etcd, no sampling)."""
    rows: list[dict[str, Any]] = []
    for rd in state.deployments():
        plan = rd.plan()
        rows.append({"name": rd.name, "state": rd.condition(), "namespace": plan.get("namespace"),
                     "processes": len(plan.get("processes", [])), "alive": len(rd.live_pids()),
                     "supervisor_pid": rd.supervisor_pid(), "run_dir": str(rd.path)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        console.print(f"no deployment under {state.state_root()}")
        return 0
    from rich.table import Table

    table = Table(title=f"deployments under {state.state_root()}", title_justify="left")
    for col in ("name", "state", "namespace", "processes", "alive pids", "supervisor"):
        table.add_column(col)
    style = {state.RUNNING: "green", state.ORPHANED: "bold red", state.STOPPED: "dim"}
    for r in rows:
        table.add_row(r["name"], f"[{style[r['state']]}]{r['state']}[/]", r["namespace"] or "-",
                      str(r["processes"]), str(r["alive"]), str(r["supervisor_pid"] or "-"))
    console.print(table)
    if any(r["state"] == state.ORPHANED for r in rows):
        console.print("orphaned: the supervisor is gone but processes remain; `launcher down NAME` cleans them")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    rd = _find(args.deployment)
    path = rd.logs / f"{args.process}.log"
    if not path.exists():
        names = sorted(p.stem for p in rd.logs.glob("*.log"))
        err.print(f"no log for '{args.process}' in {rd.logs}; there are: {', '.join(names)}")
        return 1
    argv = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(path)]
    with contextlib.suppress(KeyboardInterrupt):
        return subprocess.call(argv)
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    rd = _find(args.deployment)
    if rd.plan().get("backend") != "tmux":
        err.print(f"{rd.name} runs with the subprocess backend: use `launcher logs {args.process} -f`")
        return 1
    from launcher.backends.tmux import attach_argv

    os.execvp("tmux", attach_argv(rd, args.process))
    return 0


def cmd_export_kubernetes(args: argparse.Namespace) -> int:
    from launcher.export.kubernetes import DEFAULT_IMAGE, ExportError, export_kubernetes, write_export

    topo = load_checked(args.topology)
    try:
        exp = export_kubernetes(topo, str(args.topology), args.image or DEFAULT_IMAGE)
        out = args.output or Path(f"{exp.namespace}-kubernetes")
        written = write_export(exp, out, force=args.force)
    except ExportError as exc:
        for problem in exc.problems:
            err.print(f"[red]error[/] {problem}", soft_wrap=True)
        return EXIT_INVALID
    for note in exp.notes:
        err.print(f"[yellow]note[/] {note}", soft_wrap=True)
    if exp.credentials_made:
        console.print(f"[green]credentials[/]: made {', '.join(exp.credentials_made)} in {out / 'credentials'} "
                      "(0600; keep them out of git)")
    console.print(f"[green]wrote[/] {len(written)} files to {out}: `kubectl apply -k {out}` "
                  f"(notes in {out / 'NOTES.txt'})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launcher", description="Declarative launcher for distributed vLLM serving")
    sub = p.add_subparsers(dest="verb", required=True)

    v = sub.add_parser("validate", help="check a topology; errors name file:line")
    v.add_argument("topology", type=Path)
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plan", help="print the processes, argv and env; start nothing")
    pl.add_argument("topology", type=Path)
    pl.add_argument("--host", default=None)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    u = sub.add_parser("up", help="start services and processes; return when all registered")
    u.add_argument("topology", type=Path)
    u.add_argument("--foreground", action="store_true",
                   help="supervise in this terminal; Ctrl-C or SIGTERM (docker stop) stops all")
    u.add_argument("--backend", choices=["subprocess", "tmux"], default=None, help="override the topology's")
    u.add_argument("--host", default=None, help="multi-node: start only this host's processes")
    u.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    u.add_argument("--credentials", type=Path, default=None, metavar="BUNDLE",
                   help="multi-node, secured: the bundle `launcher credentials export` wrote on the host that "
                        "started etcd and NATS (or LAUNCHER_CREDENTIALS)")
    u.set_defaults(func=cmd_up)

    s = sub.add_parser("status", help="processes, registration, CPU and memory")
    s.add_argument("name", nargs="?", default=None, help="deployment (default: the only live one)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true")
    s.add_argument("--all", action="store_true", help="every deployment under LAUNCHER_HOME")
    s.add_argument("--host", default=None, help="multi-node: this host's share (<name>@<host>)")
    s.set_defaults(func=cmd_status)

    ls = sub.add_parser("ls", help="every deployment: running, orphaned or stopped")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    d = sub.add_parser("down", help="stop everything; leave no process behind")
    d.add_argument("name", nargs="?", default=None)
    d.add_argument("--host", default=None, help="multi-node: stop only this host's share")
    d.add_argument("--grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL for every "
                   "process (default: each process's drain_timeout + 10 s)")
    d.set_defaults(func=cmd_down)

    r = sub.add_parser("restart", help="drain and restart processes of a running deployment (new pids, READY again)")
    r.add_argument("name", help="deployment")
    r.add_argument("processes", nargs="*", metavar="PROCESS", help="a process, or a worker (all its replicas); "
                   "default: every engine worker, or with --file every process the file changes")
    r.add_argument("--rolling", action="store_true", help="one at a time: the next once the last is READY again; "
                   "stops at the first that does not come back")
    r.add_argument("--file", type=Path, default=None, help="restart with this topology (same processes): checked "
                   "as `up` checks it, its plan replaces plan.json")
    r.add_argument("--host", default=None, help="multi-node: this host's share (<name>@<host>)")
    r.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    r.set_defaults(func=cmd_restart)

    lg = sub.add_parser("logs", help="a process's log")
    lg.add_argument("process")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("--deployment", default=None)
    lg.set_defaults(func=cmd_logs)

    a = sub.add_parser("attach", help="attach to a process's tmux session")
    a.add_argument("process")
    a.add_argument("--deployment", default=None)
    a.set_defaults(func=cmd_attach)

    cr = sub.add_parser("credentials", help="a secured deployment's credentials").add_subparsers(
        dest="action", required=True)
    ce = cr.add_parser("export", help="write the bundle other hosts need (`up --credentials FILE`), 0600")
    ce.add_argument("name", nargs="?", default=None, help="deployment (default: the only live one)")
    ce.add_argument("-o", "--output", type=Path, required=True)
    ce.add_argument("--host", default=None, help="multi-node: this host's share (<name>@<host>)")
    ce.set_defaults(func=cmd_credentials_export)
    cv = cr.add_parser("env", help="shell lines for a client started by hand: eval \"$(launcher credentials env)\"")
    cv.add_argument("name", nargs="?", default=None, help="deployment (default: the only live one)")
    cv.add_argument("--host", default=None, help="multi-node: this host's share (<name>@<host>)")
    cv.set_defaults(func=cmd_credentials_env)

    sc = sub.add_parser("schema", help="JSON Schema of the topology file, for editors")
    sc.set_defaults(func=cmd_schema)

    ex = sub.add_parser("export", help="write the plan for another orchestrator").add_subparsers(
        dest="target", required=True)
    k8s = ex.add_parser("kubernetes", help="a Kustomize manifest set (kubectl apply -k DIR)")
    k8s.add_argument("topology", type=Path)
    k8s.add_argument("-o", "--output", type=Path, default=None, help="folder (default: ./<name>-kubernetes)")
    k8s.add_argument("--image", default=None, help="image the processes run in "
                     "(default: vllm-launcher:vllm, what container/build.sh builds)")
    k8s.add_argument("--force", action="store_true", help="write into a folder with another kustomization.yaml")
    k8s.set_defaults(func=cmd_export_kubernetes)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
