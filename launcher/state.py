"""The run directory: the one place `status`, `logs`, `attach` and `down` look, from any shell.

    $LAUNCHER_HOME/<deployment>[@host]/
        topology.yaml  plan.json  services.json  state.json  supervisor.pid
        logs/<process>.log  logs/supervisor.log  services/{etcd,nats}/  kv/ (connector storage)

The supervisor is the only writer of state.json; everyone else reads it. Writes are atomic
(temp file + rename) so a reader never sees half a file.

Secrets: plan.json keeps each process's real environment, credentials included, because the
supervisor reads it back to start and restart processes exactly as `up` resolved them (with the
ETCD_ENDPOINTS / NATS_SERVER of that moment; re-deriving from the topology later could drift).
So the run directory is 0700 and every file written here is 0600; what is *shown* from these files
(plan, status, errors) goes through launcher.redact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import proctree


def state_root() -> Path:
    return Path(os.environ.get("LAUNCHER_HOME", "~/.local/state/vllm-launcher")).expanduser()


def write_private(path: Path, data: bytes) -> None:
    """Atomic, and 0600 from the first byte (an environment, a key: never readable, even for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to a leftover temp file
        f.write(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """write_private, as JSON (the file may hold a process's environment)."""
    write_private(path, json.dumps(obj, indent=1, default=str).encode())


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


RUNNING, ORPHANED, STOPPED = "running", "orphaned", "stopped"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_deployment(cls, name: str, host: str | None = None) -> RunDir:
        return cls(state_root() / (name if host is None else f"{name}@{host}"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def services_file(self) -> Path:
        return self.path / "services.json"

    @property
    def supervisor_pid_file(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def log_path(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    def create(self) -> None:
        """The run directory and its logs, 0700: only the user who runs the deployment reads them."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.chmod(0o700)
        self.logs.mkdir(mode=0o700, exist_ok=True)
        self.logs.chmod(0o700)

    def supervisor_pid(self) -> int | None:
        """The live supervisor's pid, or None (a stale file from a crashed one does not count)."""
        info = read_json(self.supervisor_pid_file)
        if not info:
            return None
        pid, created = int(info["pid"]), info.get("create_time")
        return pid if proctree.is_same_process(pid, created) else None

    def live_pids(self) -> list[int]:
        """Processes the supervisor recorded (every tree member it saw) that are still alive."""
        out = []
        for p in self.state().get("processes", {}).values():
            for pid, created in (p.get("pids_seen") or {}).items():
                if proctree.is_same_process(int(pid), created):
                    out.append(int(pid))
        return out

    def condition(self) -> str:
        """running (supervisor alive), orphaned (supervisor gone, some process alive) or stopped."""
        if self.supervisor_pid() is not None:
            return RUNNING
        return ORPHANED if self.live_pids() else STOPPED

    def is_live(self) -> bool:
        return self.condition() != STOPPED

    def plan(self) -> dict[str, Any]:
        return read_json(self.plan_file, {}) or {}

    def state(self) -> dict[str, Any]:
        return read_json(self.state_file, {}) or {}


class NoDeployment(Exception):
    pass


def deployments() -> list[RunDir]:
    root = state_root()
    if not root.is_dir():
        return []
    return [RunDir(p) for p in sorted(root.iterdir()) if (p / "plan.json").exists()]


def find(name: str | None) -> RunDir:
    """By name, or the only live deployment (running, or orphaned: processes left by a dead supervisor).

    Stopped run directories do not count when another is live: they stay on disk for their logs.
    With none live, the only deployment at all is still found (to read its logs or status).
    """
    if name:
        for candidate in (state_root() / name, Path(name)):
            if (candidate / "plan.json").exists():
                return RunDir(candidate)
        raise NoDeployment(f"no deployment '{name}' under {state_root()} (see `launcher ls`)")
    return only_one(deployments(), f"under {state_root()}")


def only_one(candidates: list[RunDir], where: str) -> RunDir:
    live = [d for d in candidates if d.is_live()]
    if len(live) == 1 or (not live and len(candidates) == 1):
        return (live or candidates)[0]
    if not candidates:
        raise NoDeployment(f"no deployment {where}: start one with `launcher up TOPOLOGY.yaml`")
    if not live:
        raise NoDeployment(f"no live deployment {where} (stopped: {', '.join(d.name for d in candidates)}); "
                           "name one, or see `launcher ls`")
    raise NoDeployment(f"several live deployments {where}: {', '.join(d.name for d in live)}; name one "
                       "(`launcher ls` lists them)")
