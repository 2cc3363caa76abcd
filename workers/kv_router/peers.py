"""Router replicas tell each other the requests they send, so each weighs the others' load and prefixes.

Two routers in front of the same workers (`routers: [{replicas: 2}]`, or two routers of different
components) each count their own requests in flight exactly, from their own decisions. Without this
feed a router sees another's requests only through the workers' load reports: their number, about a
second late, and never which prefix they are computing. With it, every router publishes on
`{ns}.kv_routed` what it starts and finishes, and applies what the others publish into the same
in-flight bookkeeping its own decisions feed (`KvRouter.peer_started` / `peer_finished`): blocks being
prefilled by a peer's request count as "being computed there" for the next decision, as our own do.

What it is exactly: best effort, a NATS round trip late (well under a millisecond on one host), and
core NATS may drop a message (a slow consumer, a reconnect). So no entry can leak:
* each router publishes, every LIVE_EVERY seconds, the ids of every request it still has in flight
  (`Live`); a peer drops that router's entries missing from it. One publisher's messages arrive in
  order, so a request started before the list was taken is in it or was finished before it;
* a router silent for PEER_SILENT_AFTER seconds (killed, partitioned) is forgotten with its entries.
A lost `Started` is not repaired (the list carries ids, not prompts): that request is then seen only
through the workers' load reports, as without the feed.

Messages are batched: whatever accumulated while the previous message was being written goes in the
next one, so a burst of decisions costs a few messages, not one each.

A router that has heard no peer publishes only its Live list (so that peers find each other), not its
starts and finishes: nobody would read them, and a lone router paid a publish and the echo of it, twice a
request. When it hears a new peer, it publishes a `Started` for each request it has in flight, so the
newcomer counts them as if it had heard them start, and its Live list at once, so that the newcomer hears
it even with nothing in flight.

How peers find each other, at little cost to a router that has none: a router publishes its Live list as
it starts, at once when it hears a new peer, every LIVE_EVERY seconds while it hears any, and only every
LONE_LIVE_EVERY seconds while it hears none (a lone router's list, and the echo of it, were a third of its
idle CPU). A newcomer's first list makes every running router answer at once, so two replicas find each
other within a NATS round trip; LONE_LIVE_EVERY only bounds the wait when that first list was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from workers.runtime.aio import wait_for
from workers.runtime.settings import subject_token

log = logging.getLogger(__name__)

LIVE_EVERY = 1.0
LONE_LIVE_EVERY = 10.0  # while no peer is heard (see the module's docstring)
PEER_SILENT_AFTER = 3.5  # more than 3 Live periods
MAX_MESSAGE_BYTES = 256 * 1024


class Started(msgspec.Struct, tag="b", array_like=True):
    id: int
    worker: int
    hashes: list[int]  # the router's chained hashes of the request's full prompt blocks
    private: int  # blocks only this request pins (its partial last block and its decode)


class Finished(msgspec.Struct, tag="e", array_like=True):
    id: int


class Live(msgspec.Struct, tag="l", array_like=True):
    ids: list[int]


Item = Started | Finished | Live


class Routed(msgspec.Struct, array_like=True):
    router: int  # the sender's peer id (random per process: a restarted router is a new peer)
    items: list[Item]


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Routed)


def routed_subject(namespace: str) -> str:
    return f"{subject_token(namespace)}.kv_routed"


def new_peer_id() -> int:
    return secrets.randbits(63)


class PeerTable:
    """Other routers' requests in flight, by router and request id; `apply` hands each change to the
    router through `on_start(worker, hashes, private)` (False: a worker it does not know, not kept) and
    `on_end(same)`."""

    def __init__(self, own_id: int, on_start: Callable[[int, Sequence[int], int], bool],
                 on_end: Callable[[int, Sequence[int], int], None]) -> None:
        self.own_id = own_id
        self.on_start = on_start
        self.on_end = on_end
        self.requests: dict[int, dict[int, Started]] = {}
        self.heard: dict[int, float] = {}

    def apply(self, msg: Routed, now: float) -> bool:
        """Apply a peer's message; True when that peer was not heard before (or had been forgotten)."""
        if msg.router == self.own_id:
            return False
        new = msg.router not in self.heard
        mine = self.requests.setdefault(msg.router, {})
        for item in msg.items:
            if isinstance(item, Started):
                if item.id not in mine and self.on_start(item.worker, item.hashes, item.private):
                    mine[item.id] = item
            elif isinstance(item, Finished):
                self._end(mine.pop(item.id, None))
            else:
                live = set(item.ids)
                for rid in [r for r in mine if r not in live]:
                    self._end(mine.pop(rid))
        # Heard only once its message is applied: one that failed leaves the next one new, so the router
        # still answers it (its Live list and requests in flight) and switches to the every-second period.
        self.heard[msg.router] = now
        if new:
            log.info("router peer %x heard", msg.router)
        return new

    def expire(self, now: float, after: float = PEER_SILENT_AFTER) -> list[int]:
        """Forget routers not heard from for `after` seconds, with their requests; returns them."""
        gone = [peer for peer, t in self.heard.items() if now - t > after]
        for peer in gone:
            del self.heard[peer]
            for req in self.requests.pop(peer, {}).values():
                self._end(req)
            log.info("router peer %x silent for %.1f s: its requests in flight are forgotten", peer, after)
        return gone

    def drop_worker(self, worker: int) -> None:
        """A worker left: its entries go without `on_end` (the router already dropped its bookkeeping)."""
        for mine in self.requests.values():
            for rid in [r for r, req in mine.items() if req.worker == worker]:
                del mine[rid]

    def count(self, worker: int) -> int:
        return sum(1 for mine in self.requests.values() for req in mine.values() if req.worker == worker)

    def _end(self, req: Started | None) -> None:
        if req is not None:
            self.on_end(req.worker, req.hashes, req.private)


class PeerFeed:
    """Our side: queue what we start and finish, publish it in batches, and the Live list (every second
    while peers are heard, at once for a new one, every LONE_LIVE_EVERY seconds while none is)."""

    def __init__(self, publish: Callable[[str, bytes], Any], namespace: str, own_id: int,
                 live_ids: Callable[[], list[int]], peers_heard: Callable[[], bool],
                 tick: Callable[[], object] = lambda: None) -> None:
        self.publish = publish  # an async NATS publish(subject, payload)
        self.tick = tick  # after each Live period (the router forgets silent peers there)
        self.subject = routed_subject(namespace)
        self.own_id = own_id
        self.live_ids = live_ids
        self.peers_heard = peers_heard  # whether any peer is listening (else starts and finishes are not sent)
        self.pending: list[Item] = []
        self.wake = asyncio.Event()
        self.new_peer = asyncio.Event()  # publish the Live list now (a new peer must hear us)
        self.tasks: list[asyncio.Task[None]] = []

    def started(self, rid: int, worker: int, hashes: Sequence[int], private: int) -> None:
        if self.peers_heard():
            self.pending.append(Started(rid, worker, list(hashes), private))
            self.wake.set()

    def finished(self, rid: int) -> None:
        if self.peers_heard():  # a peer that never heard the start ignores it
            self.pending.append(Finished(rid))
            self.wake.set()

    def peer_joined(self) -> None:
        """A peer we had not heard: publish our Live list now, not at the next period."""
        self.new_peer.set()

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._send_loop(), name="peer-feed"),
                      asyncio.create_task(self._live_loop(), name="peer-live")]

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def _live_loop(self) -> None:
        while True:  # the first list goes at once: the routers already running answer it with theirs
            self.new_peer.clear()
            self.pending.append(Live(self.live_ids()))
            self.wake.set()
            period = LIVE_EVERY if self.peers_heard() else LONE_LIVE_EVERY
            with contextlib.suppress(asyncio.TimeoutError):  # not the builtin one before Python 3.11
                await wait_for(self.new_peer.wait(), period)
            try:
                self.tick()
            except Exception:  # the loop also carries our Live lists: it must not end with an expiry's bug
                log.exception("router peers: the tick after a Live list failed")

    async def _send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            items, self.pending = self.pending, []
            for part in _parts(items):
                with contextlib.suppress(Exception):  # a reconnecting client: the next Live repairs peers
                    await self.publish(self.subject, encoder.encode(Routed(self.own_id, part)))


def _parts(items: list[Item], budget: int = MAX_MESSAGE_BYTES) -> list[list[Item]]:
    """Consecutive runs of items whose messages stay under `budget` bytes (NATS's max_payload is 1 MB by
    default; a long prompt's hashes are 9 bytes a block)."""
    parts: list[list[Item]] = []
    size = budget
    for item in items:
        n = 16 + 9 * len(item.hashes if isinstance(item, Started) else item.ids if isinstance(item, Live) else ())
        if size + n > budget:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += n
    return parts

