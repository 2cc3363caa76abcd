"""Plain child processes, each in its own session (process group), output appended to its log."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from launcher.plan import ProcessSpec


class SubprocessBackend:
    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, spec: ProcessSpec, log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                spec.argv,
                env={**os.environ, **spec.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: the supervisor signals the whole tree
            )
        self._procs[spec.name] = proc
        return proc.pid

    def poll(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return None if proc is None else proc.poll()

    def close(self) -> None:
        self._procs.clear()
