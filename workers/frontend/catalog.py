"""What a deployment serves, from etcd: models, and for each the instances a request should go to.

Workers register their model path, served name and max_model_len; the frontend groups registrations
by model and sends a request to the best way in that is live (a KV router's choice, else a decode
worker, else a monolith instance: `workers.kinds.entry_kinds`), at that kind's request endpoint. A
worker that is down simply is not listed, so `/v1/models` never fails because one worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.kinds import engine_components, entry_kinds
from workers.runtime.aio import wait_for
from workers.runtime.registry import Delete, Put, Registration, Registry, Snapshot


@dataclass
class ModelRoute:
    name: str  # the served model name clients use
    path: str  # what the workers loaded (and where the tokenizer is)
    max_model_len: int | None
    component: str | None  # the entry component requests go to (None: nothing to call yet)
    instances: list[Registration] = field(default_factory=list)
    api_routes: tuple[str, ...] = ()  # the OpenAI routes that component answers (its kind's `routes`)
    created: int = 0


def served_name(reg: Registration) -> str:
    return str(reg.extra.get("served_model_name") or reg.model)


class Catalog:
    """Registrations of one namespace by etcd key; `routes()` is recomputed only after a change."""

    def __init__(self) -> None:
        self.by_key: dict[str, Registration] = {}
        self._routes: dict[str, ModelRoute] | None = None
        self.changed = asyncio.Event()
        # Told of every registration that goes away (the dispatcher ends the streams it answered).
        self.on_delete: list[Callable[[Registration], None]] = []

    def put(self, key: str, reg: Registration) -> None:
        self.by_key[key] = reg
        self._routes = None
        self.changed.set()

    def delete(self, key: str) -> None:
        reg = self.by_key.pop(key, None)
        if reg is not None:
            self._routes = None
            self.changed.set()
            for listener in self.on_delete:
                listener(reg)

    def replace(self, regs: dict[str, Registration]) -> None:
        for key in [k for k in self.by_key if k not in regs]:
            self.delete(key)
        self.by_key = dict(regs)
        self._routes = None
        self.changed.set()

    async def next_change(self, cap: float) -> None:
        """Until the catalog changes or `cap` seconds pass (capped: another waiter may clear the event)."""
        self.changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await wait_for(self.changed.wait(), cap)

    def routes(self) -> dict[str, ModelRoute]:
        """Served name -> route, for every model some engine worker serves."""
        if self._routes is None:
            self._routes = self._compute()
        return self._routes

    def _compute(self) -> dict[str, ModelRoute]:
        by_path: dict[str, ModelRoute] = {}
        engines = engine_components()
        for reg in self.by_key.values():
            if reg.component in engines and reg.model:
                route = by_path.get(reg.model)
                if route is None:
                    route = by_path[reg.model] = ModelRoute(served_name(reg), reg.model, None, None)
                mml = reg.extra.get("max_model_len")
                if isinstance(mml, int):
                    route.max_model_len = min(route.max_model_len or mml, mml)
                route.created = max(route.created, int(reg.extra.get("started_at") or 0))
        entries = entry_kinds()
        for route in by_path.values():
            for kind in entries:
                # A draining instance finishes what it has and takes nothing new.
                found = [r for r in self.by_key.values() if r.component == kind.component
                         and r.endpoint == kind.endpoint and r.model == route.path and not r.draining]
                if found:
                    route.component = kind.component
                    route.instances = sorted(found, key=lambda r: r.instance)
                    route.api_routes = kind.routes
                    break
        return {r.name: r for r in by_path.values()}

    def serving(self) -> dict[str, ModelRoute]:
        """Models with at least one instance to call."""
        return {name: r for name, r in self.routes().items() if r.instances}


async def follow(registry: Registry, namespace: str, catalog: Catalog) -> None:
    """Keep `catalog` equal to the namespace's registrations, one key at a time (`Registry.follow`): a
    key deleted during an etcd outage is a `delete` here too, and a re-listed key that did not change is
    not put again."""
    async for update in registry.follow(namespace):
        match update:
            case Snapshot(registrations, gone):
                for key in gone:
                    catalog.delete(key)
                for key, reg in registrations.items():
                    if catalog.by_key.get(key) != reg:
                        catalog.put(key, reg)
            case Put(key, reg):
                catalog.put(key, reg)
            case Delete(key):
                catalog.delete(key)
