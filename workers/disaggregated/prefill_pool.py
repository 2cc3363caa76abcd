"""The prefill instances a decode worker can hand prompts to, and which one gets the next.

Instances come from etcd (a list at start, then a watch), keyed by registration key; each is
addressed by its per-instance NATS subject. The pick is the instance with the fewest requests this
decode worker has outstanding there (ties: fewest sent so far, so an idle pool still spreads the
load). An instance that failed a request is set aside until it registers again: a dead prefill
worker's key lingers until its lease is revoked or expires, and one timeout per request is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from workers.runtime.registry import Registration, Registry

log = logging.getLogger(__name__)


@dataclass
class PrefillInstance:
    key: str
    registration: Registration
    in_flight: int = 0
    sent: int = 0
    failed: bool = False

    @property
    def subject(self) -> str:
        return self.registration.instance_subject

    @property
    def name(self) -> str:
        return self.registration.process or f"{self.registration.instance:x}"


class PrefillPool:
    """Pure bookkeeping (unit-testable); `follow` keeps it in step with etcd."""

    def __init__(self) -> None:
        self.instances: dict[str, PrefillInstance] = {}

    def put(self, key: str, reg: Registration) -> None:
        old = self.instances.get(key)
        if old is None or old.failed:
            log.info("prefill instance %s on %s", reg.process or key, reg.instance_subject)
        inst = PrefillInstance(key, reg)
        if old is not None and not old.failed:
            inst.in_flight, inst.sent = old.in_flight, old.sent
        self.instances[key] = inst

    def delete(self, key: str) -> None:
        if self.instances.pop(key, None) is not None:
            log.info("prefill instance %s is gone", key)

    def healthy(self) -> list[PrefillInstance]:
        return [i for i in self.instances.values() if not i.failed]

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> PrefillInstance | None:
        """Least outstanding work among healthy instances not in `exclude` (keys already tried)."""
        candidates = [i for i in self.healthy() if i.key not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda i: (i.in_flight, i.sent, i.key))

    @contextlib.contextmanager
    def lease(self, inst: PrefillInstance) -> Iterator[PrefillInstance]:
        """Count the request as outstanding on `inst` while the caller waits for it."""
        inst.in_flight += 1
        inst.sent += 1
        try:
            yield inst
        finally:
            inst.in_flight -= 1

    def mark_failed(self, inst: PrefillInstance, reason: str) -> None:
        if self.instances.get(inst.key) is inst and not inst.failed:
            inst.failed = True
            log.warning("prefill instance %s set aside until it registers again: %s", inst.name, reason)

    async def sync(self, registry: Registry, namespace: str, component: str) -> None:
        """Make the pool what etcd lists now (a failed instance that is still listed gets another chance)."""
        current = {r.key: r for r in await registry.list(namespace, component) if r.endpoint == "generate"}
        for key in list(self.instances):
            if key not in current:
                self.delete(key)
        for key, reg in current.items():
            if key not in self.instances or self.instances[key].failed:
                self.put(key, reg)

    async def follow(self, registry: Registry, namespace: str, component: str) -> None:
        """List, then watch, forever; a broken watch is re-listed after a pause."""
        while True:
            try:
                await self.sync(registry, namespace, component)
                async for kind, event_reg, key in registry.watch(namespace, component):
                    if kind == "put" and event_reg is not None and event_reg.endpoint == "generate":
                        self.put(key, event_reg)
                    elif kind == "delete":
                        self.delete(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching %s/%s failed (%s); listing again in 1 s", namespace, component, exc)
            await asyncio.sleep(1.0)
