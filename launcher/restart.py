"""`launcher restart`: the request the CLI leaves for the running supervisor, and how it is taken.

The CLI writes `requests/<id>.json` into the run dir (atomically, 0600) and sends SIGUSR1 to the
supervisor. The supervisor looks into that folder on every tick (the signal only ends its pause
early), so a lost signal costs a tick, never the request, and two CLIs never overwrite each other's
request. It answers in state.json (`restart_jobs`, by id), which the CLI follows until the job ends.

`restart --file`: the CLI writes the new plan next to its request (`<id>.plan.json`); the
supervisor moves it over plan.json only if it takes the request, so a refused request leaves the
running plan as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.plan import ProcessSpec
from launcher.state import RunDir, read_json, write_json
from workers.kinds import KINDS

log = logging.getLogger("launcher.restart")


@dataclass(frozen=True)
class RestartRequest:
    id: str
    processes: list[str]
    rolling: bool
    new_plan: bool = False  # `<id>.plan.json` holds the plan to restart with (restart --file)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def requests_dir(rd: RunDir) -> Path:
    return rd.path / "requests"


def _plan_path(rd: RunDir, request_id: str) -> Path:
    return requests_dir(rd) / f"{request_id}.plan.json"


def write_request(rd: RunDir, req: RestartRequest, plan: dict[str, Any] | None = None) -> None:
    """The plan first, then the request: the supervisor never sees a request whose plan is missing."""
    folder = requests_dir(rd)
    folder.mkdir(mode=0o700, exist_ok=True)
    if plan is not None:
        write_json(_plan_path(rd, req.id), plan)
    write_json(folder / f"{req.id}.json", asdict(req))


def _age(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def take_request(rd: RunDir) -> tuple[RestartRequest, list[ProcessSpec] | None] | None:
    """The oldest waiting request, removed from the folder, with its new plan's processes if it has one."""
    folder = requests_dir(rd)
    if not folder.is_dir():
        return None
    for path in sorted((f for f in folder.glob("*.json") if not f.name.endswith(".plan.json")), key=_age):
        obj = read_json(path)
        with contextlib.suppress(OSError):
            path.unlink()
        try:
            req = RestartRequest(id=str(obj["id"]), processes=[str(n) for n in obj["processes"]],
                                 rolling=bool(obj["rolling"]), new_plan=bool(obj.get("new_plan")))
        except (TypeError, KeyError):
            log.warning("ignored a malformed restart request %s", path.name)
            continue
        if not req.new_plan:
            return req, None
        plan = read_json(_plan_path(rd, req.id), {}) or {}
        return req, [ProcessSpec.from_json(p) for p in plan.get("processes", [])]
    return None


def settle_plan(rd: RunDir, req: RestartRequest, taken: bool) -> None:
    """A taken request's new plan becomes plan.json (what later restarts and `status` read); a refused one's goes."""
    if not req.new_plan:
        return
    with contextlib.suppress(OSError):
        if taken:
            os.replace(_plan_path(rd, req.id), rd.plan_file)
        else:
            _plan_path(rd, req.id).unlink()


def withdraw(rd: RunDir, req: RestartRequest) -> bool:
    """Take back a request the supervisor has not taken (it seems stuck): True if it was still waiting."""
    try:
        (requests_dir(rd) / f"{req.id}.json").unlink()
    except OSError:
        return False
    settle_plan(rd, req, taken=False)
    return True


def resolve(specs: list[ProcessSpec], wanted: list[str]) -> list[str]:
    """Process names for `launcher restart`'s arguments, in plan order: a process name, or a topology
    worker's name for all its replicas (`w`: w-1, w-2); no argument: every engine worker (not the
    routers and frontends: they load no weights, and restarting them only breaks streams)."""
    if not wanted:
        return [s.name for s in specs if KINDS[s.kind].engine]
    chosen: set[str] = set()
    for name in wanted:
        matches = {s.name for s in specs if name in (s.name, s.replica_of)}
        if not matches:
            raise ValueError(f"no process or worker '{name}' in this deployment "
                             f"(its processes: {', '.join(s.name for s in specs)})")
        chosen |= matches
    return [s.name for s in specs if s.name in chosen]


def changed(old: list[ProcessSpec], new: list[ProcessSpec]) -> list[str]:
    """Processes whose spec (argv, env, devices, policy...) differs between two plans, in the new plan's order."""
    before = {s.name: s.to_json() for s in old}
    return [s.name for s in new if before.get(s.name) != s.to_json()]
