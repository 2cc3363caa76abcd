"""Exit codes a worker process uses to say why it stopped, and their meaning for the supervisor.

A worker whose vLLM engine core died (EngineDeadError: a kernel crash, a CUDA error, an OOM, a
killed EngineCore) cannot serve again in this process: it unregisters and exits with
`ENGINE_DEAD`, so the supervisor restarts it under its policy and `launcher status` says why.
The launcher reads this table (it may read `workers.runtime`); workers never import the launcher.
"""

from __future__ import annotations

ENGINE_DEAD = 3

REASONS: dict[int, str] = {
    ENGINE_DEAD: "its vLLM engine core died",
}


def describe(code: int) -> str:
    """`exited with code 3 (its vLLM engine core died)`; signals as `killed by SIGKILL`."""
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    reason = REASONS.get(code)
    return f"exited with code {code}" + (f" ({reason})" if reason else "")
