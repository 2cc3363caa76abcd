"""The one table of process kinds: module, start tier, the component it registers, who calls it.

`launcher` (plan, rules, cli, status), the client and the frontend read this table; adding a kind
means a row here and its module, nothing else. It lives in `workers/` because workers must not
import `launcher/`, while the launcher may read `workers`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    module: str  # `python -m <module>` runs it
    tier: int  # start order: a process starts when every gating process of a lower tier is ready
    component: str  # the etcd/NATS component it registers (its `generate` endpoint, or `http`)
    engine: bool  # runs a vLLM engine: takes engine flags, devices, a metrics port
    entry_rank: int | None  # a client's way in: the lowest rank present in a deployment is the one to call
    gates: bool = True  # later tiers wait for it; a frontend gates nothing (it waits for workers itself)


KINDS: dict[str, Kind] = {k.name: k for k in (
    # The frontend starts first, so /health answers (503) while workers load, and gates nothing.
    Kind("frontend", "workers.frontend.server", 0, "frontend", engine=False, entry_rank=None, gates=False),
    # Routers before workers, so they see every worker's first KV event.
    Kind("router", "workers.kv_router.router", 0, "preprocess", engine=False, entry_rank=0),
    # Prefill before decode: a decode worker is useless without one.
    Kind("prefill", "workers.disaggregated.prefill_worker", 1, "prefill", engine=True, entry_rank=None),
    Kind("decode", "workers.disaggregated.decode_worker", 2, "decode", engine=True, entry_rank=1),
    Kind("monolith", "workers.monolith.worker", 2, "vllm", engine=True, entry_rank=2),
    Kind("kv_worker", "workers.kv_router.worker", 2, "backend", engine=True, entry_rank=None),
)}

WORKER_KINDS = tuple(k.name for k in KINDS.values() if k.engine)

# Components a client may call, best first: a router's choice, else decode (which pulls from prefill),
# else any monolith instance.
ENTRY_COMPONENTS: tuple[str, ...] = tuple(
    k.component for k in sorted(KINDS.values(), key=lambda k: k.entry_rank or 0) if k.entry_rank is not None
)


def kind_of_component(component: str) -> Kind | None:
    return next((k for k in KINDS.values() if k.component == component), None)


def entry_component(kinds: set[str]) -> str | None:
    """The component a client of a deployment made of `kinds` should call (None: nothing to call)."""
    ranked = sorted((KINDS[k] for k in kinds if k in KINDS and KINDS[k].entry_rank is not None),
                    key=lambda k: k.entry_rank or 0)
    return ranked[0].component if ranked else None
