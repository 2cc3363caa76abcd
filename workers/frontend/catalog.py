"""What a deployment serves, from etcd: models, and for each the instances a request should go to.

Workers register their model path, served name and max_model_len; the frontend groups registrations
by model and sends a request to the best way in that is live (a KV router's choice, else a decode
worker, else a monolith instance: `workers.kinds.ENTRY_COMPONENTS`). A worker that is down simply is
not listed, so `/v1/models` never fails because one worker is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.kinds import ENTRY_COMPONENTS, KINDS
from workers.runtime.registry import Registration, Registry

log = logging.getLogger(__name__)

ENGINE_COMPONENTS = frozenset(k.component for k in KINDS.values() if k.engine)


@dataclass
class ModelRoute:
    name: str  # the served model name clients use
    path: str  # what the workers loaded (and where the tokenizer is)
    max_model_len: int | None
    component: str | None  # the entry component requests go to (None: nothing to call yet)
    instances: list[Registration] = field(default_factory=list)
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

    def routes(self) -> dict[str, ModelRoute]:
        """Served name -> route, for every model some engine worker serves."""
        if self._routes is None:
            self._routes = self._compute()
        return self._routes

    def _compute(self) -> dict[str, ModelRoute]:
        by_path: dict[str, ModelRoute] = {}
        for reg in self.by_key.values():
            if reg.component in ENGINE_COMPONENTS and reg.model:
                route = by_path.get(reg.model)
                if route is None:
                    route = by_path[reg.model] = ModelRoute(served_name(reg), reg.model, None, None)
                mml = reg.extra.get("max_model_len")
                if isinstance(mml, int):
                    route.max_model_len = min(route.max_model_len or mml, mml)
                route.created = max(route.created, int(reg.extra.get("started_at") or 0))
        for route in by_path.values():
            for component in ENTRY_COMPONENTS:
                # A draining instance finishes what it has and takes nothing new.
                found = [r for r in self.by_key.values() if r.component == component and r.endpoint == "generate"
                         and r.model == route.path and not r.draining]
                if found:
                    route.component = component
                    route.instances = sorted(found, key=lambda r: r.instance)
                    break
        return {r.name: r for r in by_path.values()}

    def serving(self) -> dict[str, ModelRoute]:
        """Models with at least one instance to call."""
        return {name: r for name, r in self.routes().items() if r.instances}


async def follow(registry: Registry, namespace: str, catalog: Catalog) -> None:
    """Keep `catalog` equal to the namespace's registrations: watch first, then list (what the watch
    saw meanwhile wins over the list); after an etcd failure, the same again."""
    while True:
        touched: set[str] = set()

        async def watch(touched: set[str]) -> None:
            async for kind, reg, key in registry.watch(namespace):
                touched.add(key)
                if kind == "put" and reg is not None:
                    catalog.put(key, reg)
                else:
                    catalog.delete(key)

        watcher = asyncio.create_task(watch(touched))
        try:
            await asyncio.sleep(0.05)  # let the watch be created before the list is read
            listed = {}
            for reg in await registry.list(namespace):
                listed[reg.key] = reg
            for key in [k for k in catalog.by_key if k not in listed and k not in touched]:
                catalog.delete(key)
            for key, reg in listed.items():
                if key not in touched:
                    catalog.put(key, reg)
            await watcher
            raise ConnectionError("the etcd watch ended")
        except asyncio.CancelledError:
            watcher.cancel()
            raise
        except Exception as exc:
            watcher.cancel()
            log.warning("etcd watch of %s failed (%s: %s); watching again in 1 s", namespace, type(exc).__name__, exc)
            await asyncio.sleep(1)
