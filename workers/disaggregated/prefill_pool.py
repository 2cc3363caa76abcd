"""The prefill instances a decode worker can hand prompts to, and which one gets the next.

Instances come from etcd (`Registry.follow`: a list, then a watch), keyed by registration key; each is
addressed by its per-instance NATS subject. The pick is the instance with the fewest requests this
decode worker has outstanding there (ties: fewest sent so far, so an idle pool still spreads the
load). An instance that failed a request is set aside until it registers again: a dead prefill
worker's key lingers until its lease is revoked or expires, and one timeout per request is enough.
Only instances of the decode worker's own model count: a deployment serving several models may run
prefill workers of another model under the same component, and their KV would be another model's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from workers.kinds import KINDS
from workers.runtime.registry import Delete, Put, Registration, Snapshot, Update
from workers.runtime.requestplane import StreamTracker

log = logging.getLogger(__name__)

ENDPOINT = KINDS["prefill"].endpoint  # a prefill instance is a registration of this endpoint


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

    def __init__(self, model: str | None = None) -> None:
        self.model = model  # the decode worker's: prefill instances of another model are not ours
        self.instances: dict[str, PrefillInstance] = {}
        self.streams = StreamTracker()  # prefills in flight by instance: a deleted one's end at once
        self.foreign: set[str] = set()  # keys of another model's instances (said once each)

    def put(self, key: str, reg: Registration) -> None:
        if self.model is not None and reg.model and reg.model != self.model:
            if key not in self.foreign:
                self.foreign.add(key)
                log.info("prefill instance %s serves %s, not %s: not used", reg.process or key, reg.model, self.model)
            return
        old = self.instances.get(key)
        if old is None or old.failed:
            log.info("prefill instance %s on %s", reg.process or key, reg.instance_subject)
        inst = PrefillInstance(key, reg)
        if old is not None and not old.failed:
            inst.in_flight, inst.sent = old.in_flight, old.sent
        self.instances[key] = inst

    def delete(self, key: str) -> None:
        self.foreign.discard(key)
        inst = self.instances.pop(key, None)
        if inst is not None:
            log.info("prefill instance %s is gone", key)
            self.streams.lost(inst.registration.instance, "its registration was deleted")

    def healthy(self) -> list[PrefillInstance]:
        """Instances to send new prefills to: not failed, not draining."""
        return [i for i in self.instances.values() if not i.failed and not i.registration.draining]

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

    def apply(self, update: Update) -> None:
        """One update of `Registry.follow` on the prefill component (its ENDPOINT registrations are
        the instances). A re-list gives a failed instance that is still listed another chance."""
        match update:
            case Snapshot(registrations, gone):
                for key in gone:
                    self.delete(key)
                for key, reg in registrations.items():
                    if reg.endpoint == ENDPOINT and (key not in self.instances or self.instances[key].failed):
                        self.put(key, reg)
            case Put(key, reg) if reg.endpoint == ENDPOINT:
                self.put(key, reg)
            case Delete(key):
                self.delete(key)

    async def follow(self, updates: AsyncIterator[Update]) -> None:
        """Apply every update, for as long as `updates` (a `Registry.follow`) goes on."""
        async for update in updates:
            self.apply(update)
