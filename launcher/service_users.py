"""Who uses a managed etcd / NATS, so that `down` of one deployment never stops another's services.

A server the launcher starts lives in a shared directory, not in one deployment's run directory:

    $LAUNCHER_HOME/services/<kind>-<host>-<port>/
        service.json   the ManagedService (pid + create time, endpoint, log) and its users
        logs/  services/   its data and log (start_etcd / start_nats layout)
        .lock          flock: two `up`/`down` at once never lose a user

Every deployment that uses it (the one that started it, and each one that found it answering and
adopted it) is a user, by run-directory path. A deployment gives it up at `down`; the server is
stopped when no *live* user is left (a user whose supervisor or any process is still alive).
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from launcher import proctree
from launcher.state import RunDir, read_json, state_root, write_json


@dataclass
class ManagedService:
    """A server the launcher started: launcher.services starts and stops it, this module records its users."""

    name: str
    pid: int
    create_time: float | None
    endpoint: str
    log: str
    # The deployment whose credentials secure it (TLS, client certificates); None: no security.
    secured_by: str | None = None


def service_dir(kind: str, endpoint: str) -> Path:
    url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kind}-{url.hostname or 'localhost'}-{url.port or 0}")
    return state_root() / "services" / name


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield directory / "service.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, Any]:
    return read_json(path, {}) or {}


def _alive(record: dict[str, Any]) -> ManagedService | None:
    svc = record.get("service")
    if not svc:
        return None
    managed = ManagedService(**svc)
    return managed if proctree.is_same_process(managed.pid, managed.create_time) else None


def record_started(kind: str, svc: ManagedService, user: Path) -> None:
    """A server this `up` just started: its only user so far is that deployment."""
    with _locked(service_dir(kind, svc.endpoint)) as path:
        write_json(path, {"service": asdict(svc), "users": [str(user)]})


def adopt(kind: str, endpoint: str, user: Path) -> ManagedService | None:
    """The managed server answering on `endpoint` (None if the launcher did not start it): `user` joins it."""
    with _locked(service_dir(kind, endpoint)) as path:
        record = _read(path)
        svc = _alive(record)
        if svc is None:
            return None
        users = [u for u in record.get("users", []) if u != str(user)] + [str(user)]
        write_json(path, {**record, "users": users})
        return svc


STARTING_GRACE = 120.0  # an `up` between adopting a server and its supervisor's first state.json


def in_use(run_dir: Path) -> bool:
    """Live (supervisor or any process alive), or an `up` still starting (services taken, no state yet)."""
    rd = RunDir(run_dir)
    if rd.is_live():
        return True
    with contextlib.suppress(OSError):
        return not rd.state_file.exists() and time.time() - rd.services_file.stat().st_mtime < STARTING_GRACE
    return False


def release(kind: str, svc: ManagedService, user: Path, is_live: Callable[[Path], bool] = in_use) -> list[str]:
    """`user` gives the server up; returns the live users left (stop the server when empty)."""
    with _locked(service_dir(kind, svc.endpoint)) as path:
        record = _read(path)
        if not record:  # a deployment from before this registry: it alone used what it started
            return []
        others = [u for u in record.get("users", []) if u != str(user) and Path(u).exists() and is_live(Path(u))]
        if others:
            write_json(path, {**record, "users": others})
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        return others
