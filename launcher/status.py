"""`launcher status`: the supervisor's state, what etcd says is registered, and psutil's view.

Three sources on purpose: state.json says what the supervisor believes, etcd says what routers
see, psutil says what the machine sees. A disagreement between them is the thing to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from launcher import proctree
from launcher.gpus import gpu_memory_by_pid
from launcher.redact import redact_obj
from launcher.scrape import load_text, metrics_url, scrape_all
from launcher.state import RunDir
from workers.runtime.aio import wait_for

STATE_STYLE = {"ready": "green", "starting": "yellow", "backoff": "yellow", "pending": "dim",
               "failed": "bold red", "exited": "red", "stopped": "dim", "draining": "magenta",
               "unknown": "yellow"}


async def _registrations(etcd: list[str], namespace: str, timeout: float = 2.0,
                         tls: dict[str, str] | None = None) -> tuple[list[Any] | None, str | None]:
    """The namespace's registrations, or None and why not (no answer in time, or refused and the reason)."""
    from workers.runtime.registry import Registry
    from workers.runtime.settings import ServiceRefused
    from workers.runtime.tls import TlsFiles

    def why(exc: BaseException) -> str:
        if isinstance(exc, ServiceRefused):
            return f"refused `launcher status`: {exc.cause}"
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return f"did not answer within {timeout:.0f} s"
        return f"did not answer ({type(exc).__name__}: {exc})"

    try:
        registry = await wait_for(Registry.connect(etcd, tls=TlsFiles(**tls) if tls else None), timeout)
    except Exception as exc:
        return None, why(exc)
    try:
        return await wait_for(registry.list(namespace), timeout), None
    except Exception as exc:
        return None, why(exc)
    finally:
        with contextlib.suppress(Exception):
            await registry.client.close()


def _usage(pids: dict[str, int | None], sample: float) -> dict[str, tuple[float, int]]:
    """CPU % over `sample` seconds and RSS of each whole process tree."""
    trees: dict[str, list[psutil.Process]] = {}
    for name, pid in pids.items():
        trees[name] = proctree.tree(pid) if pid else []
        for p in trees[name]:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)
    if sample > 0:
        time.sleep(sample)
    out = {}
    for name, members in trees.items():
        cpu, rss = 0.0, 0
        for p in members:
            with contextlib.suppress(psutil.Error):
                cpu += p.cpu_percent(None)
                rss += p.memory_info().rss
        out[name] = (cpu, rss)
    return out


def _gpu_memory(plan: dict[str, Any], live_pids: dict[str, int | None]) -> dict[str, int]:
    """GPU MiB per process tree (EngineCore and TP workers hold the memory, not the parent)."""
    if not any(str(s.get("devices", "")).startswith("gpu") for s in plan.get("processes", [])):
        return {}
    by_pid = gpu_memory_by_pid()
    return {name: sum(by_pid.get(p, 0) for p in proctree.tree_pids(pid)) for name, pid in live_pids.items() if pid}


def collect(run_dir: RunDir, sample: float = 0.2) -> dict[str, Any]:
    plan = run_dir.plan()
    state = run_dir.state()
    procs_state = state.get("processes", {})
    supervisor = run_dir.supervisor_pid()
    regs, etcd_problem = asyncio.run(_registrations(plan.get("etcd", []), plan.get("namespace", ""),
                                                    tls=plan.get("tls")))
    by_process: dict[str, list[Any]] = {}
    for reg in regs or []:
        by_process.setdefault(reg.process, []).append(reg)
    live_pids = {}
    for spec in plan.get("processes", []):
        ps = procs_state.get(spec["name"], {})
        pid = ps.get("pid")
        alive = bool(pid) and proctree.is_same_process(pid, ps.get("create_time"))
        live_pids[spec["name"]] = pid if alive else None
    urls = {spec["name"]: url for spec in plan.get("processes", [])
            if live_pids.get(spec["name"]) and (url := metrics_url(spec))}
    t0 = time.monotonic()
    before = scrape_all(urls)
    usage = _usage(live_pids, sample)  # the CPU sample doubles as the window of the request rates
    after = scrape_all(urls)
    window = time.monotonic() - t0
    gpu_mem = _gpu_memory(plan, live_pids)
    now = time.time()
    rows = []
    for spec in plan.get("processes", []):
        name = spec["name"]
        ps = procs_state.get(name, {})
        regs_here = by_process.get(name, [])
        alive_pid = live_pids[name]
        cpu, rss = usage.get(name, (0.0, 0))
        state_name = ps.get("state", "pending")
        if supervisor is None and state_name in ("starting", "ready", "backoff", "draining"):
            state_name = "orphaned" if alive_pid else "stopped"
        elif regs is None and state_name == "ready":
            state_name = "unknown"  # etcd cannot be read: nobody can tell whether routers still see it
        rows.append({
            "name": name, "kind": spec["kind"], "host": spec.get("host"), "devices": spec["devices"],
            "pid": alive_pid, "state": state_name,
            "registered": None if regs is None else bool(regs_here),
            "leases": [f"{r.lease_id:x}" for r in regs_here],
            "restarts": ps.get("restarts", 0), "manual_restarts": ps.get("manual_restarts", 0),
            "uptime_s": round(now - ps["started_at"], 1) if alive_pid and ps.get("started_at") else None,
            "cpu_percent": round(cpu, 1), "rss_bytes": rss, "gpu_mem_mib": gpu_mem.get(name),
            "url": spec.get("url"),
            "load": load_text(spec["kind"], before.get(name), after.get(name), window) if name in urls else "-",
            "exit_code": ps.get("exit_code"), "message": ps.get("message", ""),
            "last_exit": ps.get("last_exit", ""),
            "log": str(run_dir.log_path(name)), "log_tail": ps.get("log_tail", []) if state_name == "failed" else [],
            "local": True,
        })
    rows += _remote_rows(plan, regs, by_process)
    return {"deployment": run_dir.name, "run_dir": str(run_dir.path), "namespace": plan.get("namespace"),
            "backend": plan.get("backend"), "supervisor_pid": supervisor, "etcd": plan.get("etcd"),
            "nats": plan.get("nats"), "etcd_reachable": regs is not None, "etcd_problem": etcd_problem,
            "host": plan.get("host"),
            "processes": rows, "restart": _running_restart(state) if supervisor else None}


def _running_restart(state: dict[str, Any]) -> dict[str, Any] | None:
    """The `launcher restart` job under way, if any (state.json keeps the last few, the running one last)."""
    return next((j for j in state.get("restart_jobs", []) if j.get("state") == "running"), None)


def _remote_rows(plan: dict[str, Any], regs: list[Any] | None, by_process: dict[str, list[Any]]
                 ) -> list[dict[str, Any]]:
    """Multi-node: the processes other hosts' launchers run, as etcd sees them (host, pid, lease).

    Their CPU and memory are only known on their own host (`launcher status` there). Registrations
    of the namespace that no topology process claims (a worker started by hand) are listed too.
    """
    local = {spec["name"] for spec in plan.get("processes", [])}
    known = [p for p in plan.get("deployment", []) if p["name"] not in local]
    names = {p["name"] for p in plan.get("deployment", [])} | local
    strays = sorted({name for name in by_process if name not in names})
    entries = [*known, *({"name": n, "kind": by_process[n][0].component, "host": None, "devices": "-"}
                         for n in strays)]
    rows = []
    for entry in entries:
        regs_here = by_process.get(entry["name"], [])
        first = regs_here[0] if regs_here else None
        rows.append({
            "name": entry["name"] or "(unnamed)", "kind": entry["kind"],
            "host": entry.get("host") or (first.host if first else None), "devices": entry.get("devices", "-"),
            "pid": first.pid if first else None, "state": "remote",
            "registered": None if regs is None else bool(regs_here),
            "leases": [f"{r.lease_id:x}" for r in regs_here], "restarts": None, "manual_restarts": None,
            "uptime_s": None,
            "cpu_percent": None, "rss_bytes": None, "gpu_mem_mib": None, "exit_code": None, "url": None, "load": "-",
            "message": "" if regs_here else "not registered in etcd (not started, or down, on its host)",
            "log": None, "log_tail": [], "local": False,
        })
    return rows


def _fmt_uptime(sec: float | None) -> str:
    if sec is None:
        return "-"
    m, s = divmod(int(sec), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_restarts(r: dict[str, Any]) -> str:
    """By the restart policy, then those asked with `launcher restart` (which max_restarts does not count)."""
    if r["restarts"] is None:
        return "-"
    return f"{r['restarts']} (+{r['manual_restarts']} asked)" if r.get("manual_restarts") else str(r["restarts"])


def render(info: dict[str, Any]) -> Table:
    sup = info["supervisor_pid"]
    here = f"host {info['host']}, " if info.get("host") else ""
    title = (f"{info['deployment']}  ({here}namespace {info['namespace']}, backend {info['backend']}, "
             f"supervisor {'pid ' + str(sup) if sup else 'not running'})")
    table = Table(title=title, title_justify="left")
    show_gpu = any(r["devices"].startswith("gpu") for r in info["processes"])
    show_host = any(r.get("host") for r in info["processes"])
    columns = ["process", "role", *(["host"] if show_host else []), "devices", "pid", "state", "registered",
               "restarts", "uptime", "cpu %", "mem", "load"]
    for col in [*columns, *(["gpu mem"] if show_gpu else [])]:
        table.add_column(col, justify="right" if col in ("pid", "restarts", "cpu %", "mem", "gpu mem") else "left")
    for r in info["processes"]:
        reg = "?" if r["registered"] is None else ("yes " + ",".join(r["leases"]) if r["registered"] else "no")
        style = STATE_STYLE.get(r["state"], "")
        state = f"[{style}]{r['state']}[/]" if style else r["state"]
        table.add_row(r["name"], r["kind"], *([r.get("host") or "-"] if show_host else []), r["devices"],
                      str(r["pid"] or "-"), state, reg, _fmt_restarts(r),
                      _fmt_uptime(r["uptime_s"]), "-" if r["cpu_percent"] is None else f"{r['cpu_percent']:.0f}",
                      f"{r['rss_bytes'] / 2**20:.0f} MiB" if r["rss_bytes"] else "-", r.get("load", "-"),
                      *([f"{r['gpu_mem_mib']} MiB" if r["gpu_mem_mib"] else "-"] if show_gpu else []))
    return table


def print_status(info: dict[str, Any], console: Console) -> None:
    info = redact_obj(info)  # endpoints with credentials, secrets in messages and log tails
    console.print(render(info))
    job = info.get("restart")
    if job:
        phases = ", ".join(f"{name} {phase}" for name, phase in job["phase"].items())
        console.print(f"[magenta]restart under way[/]{' (rolling)' if job['rolling'] else ''}: {phases}")
    if not info["etcd_reachable"]:
        problem = info.get("etcd_problem") or "did not answer"
        console.print(f"[yellow]etcd at {','.join(info['etcd'] or [])} {problem}: registration unknown[/]",
                      highlight=False)
    for r in info["processes"]:
        if r.get("url"):
            console.print(f"[bold]{r['name']}[/]: OpenAI API at {r['url']}/v1", highlight=False)
        if r["message"] and r["state"] not in ("ready",):
            console.print(f"[bold]{r['name']}[/]: {r['message']}")
        elif r.get("last_exit") and r["state"] == "ready" and r["restarts"]:
            console.print(f"[bold]{r['name']}[/]: restarted after: {r['last_exit']}")
        if r["log_tail"]:
            console.print(f"  last lines of {r['log']}:")
            for line in r["log_tail"][-10:]:
                console.print(f"    {line}", markup=False, highlight=False)
