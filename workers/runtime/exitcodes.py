"""Exit codes a worker process uses to say why it stopped, and their meaning for the supervisor.

A worker whose vLLM engine core died (EngineDeadError: a kernel crash, a CUDA error, an OOM, a
killed EngineCore) cannot serve again in this process: it unregisters and exits with
`ENGINE_DEAD`, so the supervisor restarts it under its policy and `launcher status` says why.
The launcher reads this table (it may read `workers.runtime`); workers never import the launcher.
"""

from __future__ import annotations

# sysexits' EX_TEMPFAIL ("a temporary failure: retry"): the process is sound, its engine is not; restart it.
# Not 1 (any uncaught exception) nor a small number a user's own script might use.
ENGINE_DEAD = 75
# sysexits' EX_UNAVAILABLE: etcd or NATS did not answer, or refused this process (TLS, authorization); the
# log says which address and why. Restarted under the policy: a server that comes back is found again.
SERVICE_UNAVAILABLE = 69

REASONS: dict[int, str] = {
    ENGINE_DEAD: "its vLLM engine core died",
    SERVICE_UNAVAILABLE: "etcd or NATS did not answer or refused it: see its log",
}


def describe(code: int) -> str:
    """`exited with code 75 (its vLLM engine core died)`; signals as `killed by SIGKILL`."""
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    reason = REASONS.get(code)
    return f"exited with code {code}" + (f" ({reason})" if reason else "")
