"""The KV router's Prometheus metrics: what its decisions cost and what they found in the caches.

`vllm_launcher_router_*`, on the process-global registry (one router per process), served when the
router is given `--metrics-port`. The matched/prompt block counters give the router's own estimate
of the hit rate, to compare with the workers' `vllm:prefix_cache_*` counters (the truth);
`vllm_launcher_router_indexed_blocks` is what its index holds per worker, read at each scrape.

It takes plain values, not the router's objects, so it imports nothing of the router.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self._index: _IndexCollector | None = None

    def observe(self, strategy: str, process: str, blocks: int, matched: int, decision_s: float,
                overhead_s: float) -> None:
        """One decision: `blocks` full prompt blocks, `matched` of them held by the chosen worker."""
        self.decision.observe(decision_s)
        self.overhead.observe(overhead_s)
        self.decisions.labels(strategy, process).inc()
        self.prompt_blocks.inc(blocks)
        self.matched_blocks.inc(matched)

    def watch_index(self, indexed_blocks: Callable[[], dict[str, int]]) -> None:
        """Serve `indexed_blocks()` (worker -> blocks the index holds for it) at every scrape; a worker
        the router dropped has no sample. Once per process, like the rest."""
        if self._index is None:
            self._index = _IndexCollector(indexed_blocks)
            REGISTRY.register(self._index)


class _IndexCollector(Collector):
    def __init__(self, indexed_blocks: Callable[[], dict[str, int]]) -> None:
        self.indexed_blocks = indexed_blocks

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(f"{PREFIX}_indexed_blocks", "KV blocks the router's index holds per worker",
                                   labels=["worker"])
        for worker, blocks in sorted(self.indexed_blocks().items()):
            family.add_metric([worker], blocks)
        yield family

