"""The one table of process kinds: one row per kind says everything the rest of the code needs to know.

`launcher` (topology, plan, rules, restart, status), the client and the frontend read this table; adding
a kind means a row here and its module, nothing else (tests/test_kinds.py adds a fake one to show it).
It lives in `workers/` because workers must not import `launcher/`, while the launcher may read `workers`.

Every lookup below reads `KINDS` when it is called, never a copy taken at import, so a row added at run
time (a test's fake kind) is seen everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# The OpenAI routes a token-generating `generate` endpoint answers (through the frontend).
GENERATIVE_ROUTES = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class Kind:
    name: str  # what a topology's `kind:` says
    module: str  # `python -m <module>` runs it
    tier: int  # start order: a process starts when every gating process of a lower tier is ready
    component: str  # the etcd/NATS component it registers as (default of its --component, where it has one)
    endpoints: tuple[str, ...]  # the endpoints it registers; the first is the one requests are sent to
    engine: bool  # runs a vLLM engine: listed under `workers:`, takes engine flags, devices, a metrics port
    entry_rank: int | None  # a client's way in: the lowest rank present in a deployment is the one to call
    # Flags its module takes beside vLLM's engine flags (dashed name -> value type, as
    # launcher.engine_flags types values: "str", "int", "float", "json_list"); for the router and the frontend, which
    # take no vLLM flags, every flag of their parser.
    flags: Mapping[str, str] = field(default_factory=dict)
    # Those of `flags` the launcher writes itself from the topology (`metrics_port:`, a router's
    # `strategy:`, a frontend's `port:`...): a topology sets them there, not as flags.
    set_by_launcher: frozenset[str] = frozenset()
    # The OpenAI API routes its request endpoint can answer when it is a deployment's way in.
    routes: tuple[str, ...] = ()
    gates: bool = True  # later tiers wait for it; a frontend gates nothing (it waits for workers itself)
    # Why `component` is not `name`, where it is not: existing clients and deployments call it so.
    component_reason: str = ""

    @property
    def endpoint(self) -> str:
        """The endpoint requests are sent to."""
        return self.endpoints[0]


# Every engine worker's module takes --metrics-port (workers.engine.make_parser); the launcher sets it.
_ENGINE_FLAGS = {"metrics-port": "int"}
_COMPONENT = {"component": "str"}

KINDS: dict[str, Kind] = {k.name: k for k in (
    # The frontend starts first, so /health answers (503) while workers load, and gates nothing.
    Kind("frontend", "workers.frontend.server", 0, "frontend", ("http",), engine=False, entry_rank=None,
         flags={"host": "str", "port": "int", "model": "str", "api-key-env": "str", "max-request-bytes": "int",
                "request-timeout": "float", "retries": "int", "migration-limit": "int", "processes": "int_or_auto",
                **dict.fromkeys(("enable-auto-tool-choice", "exclude-tools-when-tool-choice-none",
                                 "trust-request-chat-template", "enable-prompt-tokens-details",
                                 "enable-force-include-usage", "return-tokens-as-token-ids", "enable-log-requests",
                                 "tool-call-parser", "reasoning-parser", "chat-template",
                                 "chat-template-content-format", "response-role", "default-chat-template-kwargs",
                                 "tool-parser-plugin", "max-log-len", "allow-credentials"), "str"),
                **dict.fromkeys(("allowed-origins", "allowed-methods", "allowed-headers"), "json_list"),
                "model-flags": "model_flags"},  # JSON: served name -> that model's flags (a topology's `models:`)
         set_by_launcher=frozenset({"host", "port", "model", "api-key-env", "max-request-bytes", "request-timeout",
                                    "retries", "migration-limit", "processes", "model-flags"}),
         gates=False),
    # Routers before workers, so they see every worker's first KV event.
    Kind("router", "workers.kv_router.router", 0, "preprocess", ("generate",), engine=False, entry_rank=0,
         flags={"model": "str", "routing-strategy": "str", "block-size": "int", "load-weight": "float",
                "evict-weight": "float", "overflow-weight": "float", "request-tokens": "float", "queue-weight": "float",
                "metrics-port": "int",
                **_COMPONENT, "worker-component": "str", "seed": "int", "share-inflight": "bool"},
         set_by_launcher=frozenset({"model", "routing-strategy", "block-size"}),
         routes=GENERATIVE_ROUTES,
         component_reason="the client (`python -m workers.common.client --component preprocess`), its users' "
                          "scripts and running deployments call a router `preprocess`"),
    # Prefill before decode: a decode worker is useless without one.
    Kind("prefill", "workers.disaggregated.prefill_worker", 1, "prefill", ("generate",), engine=True,
         entry_rank=None, flags={**_ENGINE_FLAGS, **_COMPONENT}, set_by_launcher=frozenset(_ENGINE_FLAGS),
         routes=GENERATIVE_ROUTES),
    Kind("decode", "workers.disaggregated.decode_worker", 2, "decode", ("generate",), engine=True, entry_rank=1,
         flags={**_ENGINE_FLAGS, **_COMPONENT, "prefill-component": "str", "prefill-timeout": "float",
                "prefill-retries": "int"},
         set_by_launcher=frozenset(_ENGINE_FLAGS), routes=GENERATIVE_ROUTES),
    Kind("monolith", "workers.monolith.worker", 2, "vllm", ("generate",), engine=True, entry_rank=2,
         flags={**_ENGINE_FLAGS, **_COMPONENT}, set_by_launcher=frozenset(_ENGINE_FLAGS), routes=GENERATIVE_ROUTES,
         component_reason="the client (`--component vllm`), its users' scripts and running deployments call a "
                          "monolith `vllm`"),
    Kind("kv_worker", "workers.kv_router.worker", 2, "backend", ("generate",), engine=True, entry_rank=None,
         flags=dict(_ENGINE_FLAGS), set_by_launcher=frozenset(_ENGINE_FLAGS), routes=GENERATIVE_ROUTES,
         component_reason="a router looks for its workers as `backend` (its --worker-component default), and "
                          "running deployments register them so"),
)}


def worker_kinds() -> tuple[str, ...]:
    """The kinds a topology lists under `workers:` (the engine kinds), in table order."""
    return tuple(k.name for k in KINDS.values() if k.engine)


def engine_components() -> frozenset[str]:
    """Components that run an engine (they register the model they serve)."""
    return frozenset(k.component for k in KINDS.values() if k.engine)


def entry_kinds() -> tuple[Kind, ...]:
    """Kinds a client may call, best first: a router's choice, else decode (which pulls from prefill), else
    any monolith instance."""
    return tuple(sorted((k for k in KINDS.values() if k.entry_rank is not None), key=lambda k: k.entry_rank or 0))


def entry_components() -> tuple[str, ...]:
    return tuple(k.component for k in entry_kinds())


def kind_of_component(component: str) -> Kind | None:
    return next((k for k in KINDS.values() if k.component == component), None)


def entry_component(kinds: set[str]) -> str | None:
    """The component a client of a deployment made of `kinds` should call (None: nothing to call)."""
    ranked = [k for k in entry_kinds() if k.name in kinds]
    return ranked[0].component if ranked else None
