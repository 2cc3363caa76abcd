"""The one small interface the supervisor needs from a way of running processes."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from launcher.plan import ProcessSpec


class Backend(Protocol):
    def start(self, spec: ProcessSpec, log: Path) -> int:
        """Start the process; return the pid of the command itself (the one that registers)."""
        ...

    def poll(self, name: str) -> int | None:
        """None while running; the exit code once it has ended (negative: killed by that signal)."""
        ...

    def close(self) -> None:
        """Release what the backend holds (tmux sessions); processes are stopped by the supervisor."""
        ...
