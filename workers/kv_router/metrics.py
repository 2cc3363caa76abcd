"""The KV router's Prometheus metrics: what its decisions cost and what they found in the caches.

`vllm_launcher_router_*`, on the process-global registry (one router per process), served when the
router is given `--metrics-port`. The matched/prompt block counters give the router's own estimate
of the hit rate, to compare with the workers' `vllm:prefix_cache_*` counters (the truth).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from workers.kv_router.router import Decision

PREFIX = "vllm_launcher_router"
# Seconds, 5 us to 1 s: a decision takes tens of microseconds, tokenizing a long prompt milliseconds.
DECISION_BUCKETS = (5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 7.5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                    0.1, 1.0)


class RouterMetrics:
    _default: RouterMetrics | None = None

    @classmethod
    def default(cls) -> RouterMetrics:
        """The process's one set (the global registry refuses a name twice; tests build several routers)."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    def __init__(self) -> None:
        self.decision = Histogram(f"{PREFIX}_decision_seconds", "choosing a worker: hashing, matching, costing",
                                  buckets=DECISION_BUCKETS)
        self.overhead = Histogram(f"{PREFIX}_overhead_seconds",
                                  "request received -> sent to a worker (tokenizing included)",
                                  buckets=DECISION_BUCKETS)
        self.decisions = Counter(f"{PREFIX}_decisions", "routing decisions by strategy and worker",
                                 ["strategy", "worker"])
        self.prompt_blocks = Counter(f"{PREFIX}_prompt_blocks", "full prompt blocks of routed requests")
        self.matched_blocks = Counter(f"{PREFIX}_matched_blocks",
                                      "of those, blocks the chosen worker held per the KV events")

    def observe(self, d: Decision, decision_s: float, overhead_s: float) -> None:
        self.decision.observe(decision_s)
        self.overhead.observe(overhead_s)
        self.decisions.labels(d.strategy, d.process).inc()
        self.prompt_blocks.inc(d.blocks)
        self.matched_blocks.inc(d.matches.get(d.worker, 0))

