"""The frontend's Prometheus metrics (prometheus_client), in the style of vLLM's and Dynamo's frontend.

One registry per app (not the process-global one) so tests can build several apps in one process. A
frontend of several processes (`--processes`) uses prometheus_client's multiprocess mode instead: each
process writes its values to files in one folder, and `/metrics` from any of them sums the group.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for the folder


def use_multiprocess(folder: str) -> None:
    """From now on, metrics this process creates write to `folder` (call before creating any)."""
    os.environ[MULTIPROC_ENV] = folder
    values.ValueClass = values.MultiProcessValue()


def multiprocess_folder() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def process_dead(pid: int) -> None:
    """A group member ended: its live gauges (requests in flight) no longer count."""
    if multiprocess_folder():
        multiprocess.mark_process_dead(pid)

PREFIX = "vllm_launcher_frontend"

# Seconds: from 1 ms to 5 min, as vLLM's TTFT/ITL buckets span.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 320.0)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint, model, stream and status",
                                ["endpoint", "model", "request_type", "status"], registry=r)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "requests being served", ["model"], registry=r,
                              multiprocess_mode="livesum")
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "request sent to a worker -> its first token back",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "time between tokens (per token)",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "request received -> last byte",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.input_tokens = Counter(f"{PREFIX}_input_tokens", "prompt tokens", ["model"], registry=r)
        self.output_tokens = Counter(f"{PREFIX}_output_tokens", "generated tokens", ["model"], registry=r)
        self.cancelled = Counter(f"{PREFIX}_cancelled_requests", "requests whose client went away", ["model"],
                                 registry=r)
        self.retries = Counter(f"{PREFIX}_retries", "requests sent again to another instance", registry=r)
        self.migrations = Counter(f"{PREFIX}_migrations", "streams continued on another instance after their "
                                  "instance was lost mid-stream (prompt + tokens so far sent again)", registry=r)

    def exposition(self) -> bytes:
        """The text `/metrics` answers: this process's, or the whole group's in multiprocess mode."""
        folder = multiprocess_folder()
        if folder is None:
            return generate_latest(self.registry)
        group = CollectorRegistry()
        multiprocess.MultiProcessCollector(group, path=folder)
        return generate_latest(group)
