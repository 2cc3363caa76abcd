"""The frontend's Prometheus metrics (prometheus_client), in the style of vLLM's and Dynamo's frontend.

One registry per app (not the process-global one) so tests can build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "requests being served", ["model"], registry=r)
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
