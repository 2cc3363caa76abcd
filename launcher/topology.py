"""Pydantic models of the topology YAML, and loading with errors that name file:line:field.

Unknown keys are errors (extra="forbid"): a misspelt `tensor_parallel_size` silently ignored
would cost a user minutes of model loading before they notice. Types are strict: YAML already
types its scalars, so `kv_port: true` or `replicas: "2"` is a mistake, not something to coerce.
Values the launcher itself reads (parallel sizes, block size, cpus, URLs, addresses) are parsed
and bounded here, so the rules and the plan only ever see validated, typed values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from launcher import addresses
from launcher.redact import redact_text
from launcher.yamlpos import LoadedYaml, YamlLoadError, load_yaml
from workers.kinds import worker_kinds
from workers.runtime.settings import DEFAULT_DRAIN_TIMEOUT, DEFAULT_ETCD, DEFAULT_NATS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _flag(name: str) -> Any:
    """A vLLM flag the launcher reads itself, accepted in either spelling (dashes or underscores)."""
    return AliasChoices(name, name.replace("-", "_"))


class Engine(BaseModel):
    """vLLM engine flags, by vLLM's own names. Any flag is allowed here (launcher.engine_flags checks
    them against the installed vLLM's parser); the few the launcher reads itself are typed."""

    model_config = ConfigDict(extra="allow", strict=True)

    tensor_parallel_size: StrictInt = Field(1, ge=1, le=4096, validation_alias=_flag("tensor-parallel-size"))
    pipeline_parallel_size: StrictInt = Field(1, ge=1, le=4096, validation_alias=_flag("pipeline-parallel-size"))
    block_size: StrictInt | None = Field(None, ge=1, le=1 << 20, validation_alias=_flag("block-size"))
    enable_prefix_caching: StrictBool | None = Field(None, validation_alias=_flag("enable-prefix-caching"))

    def flags(self) -> dict[str, Any]:
        """The flags as written (dashed), typed ones first: what becomes the worker's argv."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.model_fields_set:
                out[name.replace("_", "-")] = getattr(self, name)
        for key, value in (self.model_extra or {}).items():
            out.setdefault(str(key).replace("_", "-"), value)
        return out


class ServiceTls(Strict):
    """Files (never inline keys) to reach servers the launcher does not start (managed: never) over TLS."""

    ca: str = Field(description="the CA certificate the servers' certificates are checked against (PEM file)")
    cert: str = Field(description="the client certificate every process presents (PEM file)")
    key: str = Field(description="its private key (PEM file, readable by the deployment's user only)")


class Services(Strict):
    etcd: str = Field(DEFAULT_ETCD, description="etcd endpoint(s), comma-separated; ETCD_ENDPOINTS overrides")
    nats: str = Field(DEFAULT_NATS, description="NATS server URL; NATS_SERVER overrides")
    managed: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: start local etcd/nats-server when nothing answers"
    )
    security: Literal["auto", "tls", "none"] = Field(
        "auto", description="auto: TLS and client certificates when a service is not on a loopback address "
                            "(the launcher makes the deployment's credentials); tls: always; none: never (a "
                            "cross-host deployment then lets anyone on the network in: validate warns)")
    tls: ServiceTls | None = Field(None, description="managed: never with TLS: the credentials files to use "
                                                     "(or LAUNCHER_TLS_CA / _CERT / _KEY)")

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, value: str) -> str:
        addresses.check_urls(value, addresses.ETCD_SCHEMES, "etcd")
        return value

    @field_validator("nats")
    @classmethod
    def _nats(cls, value: str) -> str:
        addresses.check_urls(value, addresses.NATS_SCHEMES, "NATS")
        return value


class Restart(Strict):
    policy: Literal["never", "on-failure", "always"] = "on-failure"
    max_restarts: int = Field(3, ge=0, le=1_000_000, description="restarts in a row before the process is failed; "
                              "the count starts again once it has stayed ready for 10 minutes")
    backoff: float = Field(1.0, gt=0, le=1e6, description="first delay in seconds; doubles after each restart")
    backoff_max: float = Field(30.0, gt=0, le=1e6)


class KvTransfer(Strict):
    """vLLM's KVTransferConfig, written with vLLM's own field names."""

    kv_connector: str
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"]
    kv_rank: int | None = Field(None, ge=0, le=1 << 16)
    kv_parallel_size: int | None = Field(None, ge=1, le=1 << 16)
    kv_ip: str | None = None
    kv_port: int | None = Field(None, ge=1, le=65535)
    kv_buffer_device: str | None = None
    kv_connector_extra_config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kv_ip")
    @classmethod
    def _kv_ip(cls, value: str | None) -> str | None:
        if value is not None:
            addresses.check_host(value)
        return value

    def to_vllm_json(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True))


# Seconds past a process's drain_timeout before SIGKILL: after the drain, vLLM still shuts its engine
# core (and tensor-parallel workers) down and frees the device.
DRAIN_MARGIN = 10.0


class ProcessCommon(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    host: str | None = Field(None, description="multi-node: only `launcher up --host NAME` starts it")
    env: dict[str, str] = Field(default_factory=dict)
    restart: Restart = Field(default_factory=lambda: Restart())
    ready_timeout: float = Field(600.0, gt=0, le=1e7, description="seconds to register in etcd before failing")
    drain_timeout: float = Field(DEFAULT_DRAIN_TIMEOUT, gt=0, le=1e6, description=(
        "on SIGTERM (`launcher down`, `launcher restart`): seconds to finish the requests in flight after "
        "unregistering; the rest then end with an error the frontend continues elsewhere. SIGKILL follows "
        f"{DRAIN_MARGIN:.0f} s after that (a pod's terminationGracePeriodSeconds is the same sum)"))
    args: list[str] = Field(default_factory=list, description=(
        "extra flags, as --flag [value] entries: read and checked with the process's own parser (vLLM's for "
        "engine workers) like engine:, and refused when the launcher sets the flag itself"))


def _worker_kinds_schema(schema: dict[str, Any]) -> None:
    schema["enum"] = list(worker_kinds())


class Worker(ProcessCommon):
    # One of workers.kinds' engine kinds. Not a Literal: mypy types no Literal built from a table, and the
    # table is read at validation time, so a kind added to it (a test's fake kind) is accepted without
    # re-importing this module. The message and the JSON schema's enum are the ones a Literal would give.
    kind: str = Field("monolith", json_schema_extra=_worker_kinds_schema)
    metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "Prometheus port of this worker's vLLM metrics (default: the topology's metrics_port_base + its "
        "position among the engine processes of its host)"))
    model: str | None = None
    gpus: list[int] | None = Field(None, max_length=addresses.MAX_DEVICES)
    cpus: str | None = Field(None, description="VLLM_CPU_OMP_THREADS_BIND, e.g. '0-3' or '0|1' for TP 2")
    engine: Engine = Field(default_factory=lambda: Engine())
    kv_transfer: KvTransfer | None = None
    replicas: int = Field(1, ge=1, le=addresses.MAX_DEVICES)
    gpus_per_replica: int | None = Field(None, ge=1, le=addresses.MAX_DEVICES)

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, kind: Any) -> Any:
        kinds = worker_kinds()
        if kind not in kinds:  # a non-string fails here too, with the same message
            quoted = [f"'{k}'" for k in kinds]
            expected = " or ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return kind

    @field_validator("gpus")
    @classmethod
    def _non_negative(cls, gpus: list[int] | None) -> list[int] | None:
        if gpus is not None and any(g < 0 or g >= addresses.MAX_DEVICES for g in gpus):
            raise ValueError(f"GPU indices are 0 to {addresses.MAX_DEVICES - 1}")
        return gpus

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, cpus: str | None) -> str | None:
        if cpus is not None:
            addresses.parse_cpu_sets(cpus)
        return cpus

    @property
    def cpu_sets(self) -> list[frozenset[int]]:
        """One core set per TP rank ('0-1|2-3' -> [{0, 1}, {2, 3}]); [] without cpus."""
        return addresses.parse_cpu_sets(self.cpus) if self.cpus is not None else []

    @property
    def kind_given(self) -> bool:
        """Whether the file says `kind:` (the default, monolith, is a guess the rules may refuse)."""
        return "kind" in self.model_fields_set


class Router(ProcessCommon):
    kind: Literal["router"] = "router"
    strategy: Literal["prefix", "round_robin", "random"] = "prefix"
    model: str | None = None
    replicas: int = Field(1, ge=1, le=16, description=(
        "router processes serving the same component (name-1, name-2, ...): the frontend spreads requests "
        "over them and continues a dead one's requests on another; they see the same KV events and tell each "
        "other the requests they send (workers.kv_router.peers)"))


class FrontendModel(Strict):
    args: list[str] = Field(min_length=1, description=(
        "this model's own `vllm serve` flags (tools, reasoning, chat template, answers), as --flag [value] "
        "entries: they go after the frontend's args: for this model's OpenAI layer, so a value given in both is "
        "this model's"))


class Frontend(ProcessCommon):
    """The OpenAI-compatible HTTP front door: `/v1/chat/completions`, `/v1/completions`, `/v1/models`."""

    kind: Literal["frontend"] = "frontend"
    listen: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description=(
        "name of an environment variable holding the API key every /v1 route then requires "
        "(as `vllm serve --api-key`); the key itself is never written in the topology"))
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    request_timeout: float = Field(10.0, gt=0, description=(
        "seconds a worker may stay silent before the request fails with 504"))
    retries: int = Field(2, ge=0, description="tries on another instance when one fails before its first token")
    migration_limit: int = Field(3, ge=0, le=1000, description=(
        "how many times a stream whose worker died or drained mid-stream is continued on another instance "
        "(0: such a stream ends with an error)"))
    processes: int | Literal["auto"] = Field("auto", description=(
        "HTTP server processes sharing the port, as `vllm serve --api-server-count` (1 to 64); auto: one per "
        "8 of the cores the frontend may use on the host it runs on (affinity, container quota), 1 to 8"))
    models: dict[str, FrontendModel] = Field(default_factory=dict, description=(
        "per model, by one of its served names: `vllm serve` flags for that model alone (a frontend serving "
        "models that need different tool parsers or chat templates)"))

    @field_validator("processes")
    @classmethod
    def _processes(cls, n: int | str) -> int | str:
        if isinstance(n, int) and not 1 <= n <= 64:
            raise ValueError(f"processes {n}: give 1 to 64, or auto")
        return n


class Topology(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    namespace: str | None = None
    services: Services = Field(default_factory=lambda: Services())
    backend: Literal["subprocess", "tmux"] = "subprocess"
    model: str
    engine: Engine = Field(default_factory=lambda: Engine(), description="vLLM flags for every worker")
    env: dict[str, str] = Field(default_factory=dict)
    workers: list[Worker] = Field(min_length=1)
    routers: list[Router] = Field(default_factory=list)
    frontends: list[Frontend] = Field(default_factory=list)
    metrics_port_base: int = Field(9400, ge=1024, le=65000, description=(
        "first Prometheus port given to engine workers that name none (one port per worker and replica)"))

    def model_of(self, process: Worker | Router) -> str:
        """The model a worker loads or a router routes for: its own `model:`, else the topology's."""
        return process.model or self.model

    @property
    def effective_namespace(self) -> str:
        return self.namespace or self.name

    def sections(self) -> list[tuple[str, list[Worker] | list[Router] | list[Frontend]]]:
        """Every process list with its YAML key, for rules that look at all processes alike."""
        return [("workers", self.workers), ("routers", self.routers), ("frontends", self.frontends)]


class TopologyError(Exception):
    """Every problem found in a topology, each line already `file:line:col: field: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error")


def _loc_text(loc: tuple[str | int, ...]) -> str:
    """`workers[0].engine`; a blank key, or one with control characters, is quoted (`workers[0].' '`), so
    the location never reads as empty."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = repr(str(part)) if not str(part).strip() or re.search(r"[\x00-\x1f\x7f]", str(part)) else str(part)
        out += f".{text}" if out else text
    return out or "(top level)"


def _resolve_model_path(model: str, base: Path) -> str:
    """A model given as ./x or ../x is a folder next to the topology file; anything else is a hub id."""
    if model.startswith(("./", "../")):
        return str((base / model).resolve())
    return model


def parse_topology(loaded: LoadedYaml) -> Topology:
    if not isinstance(loaded.data, dict):
        raise TopologyError([f"{loaded.where(())}: the topology must be a mapping (name:, model:, workers:)"])
    try:
        topo = Topology.model_validate(loaded.data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            bad_value = err["type"].endswith(("_type", "_parsing")) or err["type"] in _BOUND_ERRORS
            if bad_value and (isinstance(value, (bool, int, float, str)) or value is None):
                msg += f", not {redact_text(repr(value))[:80]}"
            if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
                msg = "should be a mapping (key: value lines)" + (f", not {value!r}"[:80] if value is None or
                                                                   isinstance(value, (bool, int, float)) else "")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key '{loc[-1]}' (check its spelling and indentation)"
            elif err["type"] == "missing":
                msg = f"required key '{loc[-1]}' is missing"
            problems.append(f"{loaded.where(loc)}: {_loc_text(loc)}: {msg}")
        raise TopologyError(problems) from None
    base = loaded.file.parent
    topo.model = _resolve_model_path(topo.model, base)
    for w in topo.workers:
        if w.model:
            w.model = _resolve_model_path(w.model, base)
    for r in topo.routers:
        if r.model:
            r.model = _resolve_model_path(r.model, base)
    return topo


def load_topology(file: Path) -> tuple[Topology, LoadedYaml]:
    """Parse and validate the schema; cross-field rules live in launcher.rules."""
    try:
        loaded = load_yaml(file)
    except YamlLoadError as exc:
        raise TopologyError([str(exc)]) from None
    return parse_topology(loaded), loaded


def json_schema() -> dict[str, Any]:
    """For editors: `launcher schema > topology.schema.json`."""
    return Topology.model_json_schema()
