"""Router replicas share their requests in flight (workers/kv_router/peers.py).

Unit tests drive two KvRouters through the feed's own messages (encoded and decoded as on the wire);
the last test runs two RouterServices on a real nats-server with scripted workers that hold their
streams open, and checks what the second router sees of the first's requests and decides from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from tests.helpers import chunks_via, served, until
from tests.test_retries import IdsOnly
from workers.common.protocol import GenerateRequest
from workers.kv_router import peers
from workers.kv_router.cost import CostWeights
from workers.kv_router.router import Decision, KvRouter, RouterService
from workers.runtime import requestplane
from workers.runtime.registry import Registration
from workers.runtime.serve import WorkerContext
from workers.runtime.settings import RuntimeSettings

BS = 4
PREFIX = list(range(100, 100 + 10 * BS))  # 10 full blocks
# As in test_router_cost: a block stands for one of vLLM's 64-token blocks, a request in flight for 128 tokens.
WEIGHTS = CostWeights(request_tokens=2 * BS)


def reg(w: int, ns: str = "t") -> Registration:
    subject = requestplane.endpoint_subject(ns, "backend", "generate")
    return Registration(namespace=ns, component="backend", endpoint="generate", subject=subject,
                        lease_id=w, process=f"w{w}", block_size=BS, extra={"num_gpu_blocks": 64})


def router(seed: int, ns: str = "t") -> KvRouter:
    r = KvRouter("prefix", BS, rng=random.Random(seed), weights=WEIGHTS)
    for w in (1, 2):
        r.add_worker(reg(w, ns))
    return r


def wire(sender: KvRouter, items: list[peers.Item]) -> peers.Routed:
    """What the other side decodes: the feed's message, through msgpack."""
    return peers.decoder.decode(peers.encoder.encode(peers.Routed(sender.peers.own_id, items)))


def started(r: KvRouter, d: Decision) -> peers.Started:
    r.started(d)
    return peers.Started(d.id, d.worker, d.hashes, KvRouter._private_blocks(d))


def test_a_prefix_in_flight_on_one_replica_draws_the_other_replicas_request() -> None:
    """A burst on a new prefix split over two replicas lands on one worker, as it does through one router.
    Without the feed the second replica sees two idle workers and picks either: over 20 seeds it
    splits the prefix at least once (what this test would catch)."""
    split_without = 0
    for seed in range(20):
        a, b = router(seed), router(seed + 1000)
        first = a.choose([*PREFIX, 1], max_tokens=4)
        msg = wire(a, [started(a, first)])
        split_without += b.choose([*PREFIX, 2], max_tokens=4).worker != first.worker
        b.peers.apply(msg, time.monotonic())
        second = b.choose([*PREFIX, 2], max_tokens=4)
        assert second.worker == first.worker, seed
        assert b.overlaps(second.hashes, {}) == {first.worker: 10}  # the peer's blocks: being computed there
    assert split_without > 0


def test_peer_requests_count_as_load_and_end_with_their_finish() -> None:
    a, b = router(0), router(1)
    ds = [a.choose([7000 + i] * BS * 2, max_tokens=4) for i in range(3)]
    b.peers.apply(wire(a, [started(a, d) for d in ds]), time.monotonic())
    on = {w: sum(d.worker == w for d in ds) for w in (1, 2)}
    for w in (1, 2):
        assert b.workers[w].peer_requests == on[w]
        assert b.table.requests[b.table.slot[w]] == on[w]
    assert b.load_of(ds[0].worker)["peer_inflight"] == on[ds[0].worker]
    b.peers.apply(wire(a, [peers.Finished(d.id) for d in ds]), time.monotonic())
    assert all(b.workers[w].peer_requests == 0 for w in (1, 2))
    assert b.inflight.distinct(1) == b.inflight.distinct(2) == 0


def test_a_lost_finish_is_repaired_by_the_next_live_list() -> None:
    a, b = router(0), router(1)
    d1, d2 = a.choose([*PREFIX, 1], max_tokens=4), a.choose([9] * 12, max_tokens=4)
    b.peers.apply(wire(a, [started(a, d1), started(a, d2)]), time.monotonic())
    b.peers.apply(wire(a, [peers.Live([d2.id])]), time.monotonic())  # d1's Finished never arrived
    assert b.peers.count(d1.worker) == (d2.worker == d1.worker)
    assert sum(v.peer_requests for v in b.workers.values()) == 1


def test_a_silent_peer_is_forgotten_with_its_requests() -> None:
    a, b = router(0), router(1)
    d = a.choose([*PREFIX, 1], max_tokens=4)
    t = time.monotonic()
    b.peers.apply(wire(a, [started(a, d)]), t)
    assert b.peers.expire(t + 1) == []
    assert b.peers.expire(t + peers.PEER_SILENT_AFTER + 1) == [a.peers.own_id]
    assert b.workers[d.worker].peer_requests == 0 and b.inflight.distinct(d.worker) == 0


def test_a_peer_whose_first_message_failed_to_apply_is_still_new_at_its_next() -> None:
    """New means "answer it with our list and requests": a first message that raised must not use that up."""
    def broken(worker: int, hashes: object, private: int) -> bool:
        raise RuntimeError("a bug in on_start")

    table = peers.PeerTable(1, broken, lambda *_: None)
    first = peers.Routed(2, [peers.Started(5, 1, [1], 0)])
    with contextlib.suppress(RuntimeError):
        table.apply(first, time.monotonic())
    assert table.apply(peers.Routed(2, [peers.Live([])]), time.monotonic()) is True
    assert table.apply(peers.Routed(2, [peers.Live([])]), time.monotonic()) is False


def test_a_failing_tick_does_not_stop_the_live_lists(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(peers, "LIVE_EVERY", 0.02)

    async def run() -> int:
        lists = 0

        async def publish(subject: str, data: bytes) -> None:
            nonlocal lists
            lists += sum(isinstance(i, peers.Live) for i in peers.decoder.decode(data).items)

        def tick() -> None:
            raise RuntimeError("a bug in the expiry")

        feed = peers.PeerFeed(publish, "ns", 1, lambda: [], peers_heard=lambda: True, tick=tick)
        feed.start()
        try:
            await until(lambda: lists >= 4, 3, "Live lists after failed ticks")
        finally:
            feed.stop()
        return lists

    assert asyncio.run(run()) >= 4


def test_own_messages_and_unknown_workers_change_nothing() -> None:
    a, b = router(0), router(1)
    d = a.choose([*PREFIX, 1], max_tokens=4)
    a.peers.apply(wire(a, [started(a, d)]), time.monotonic())  # NATS echoes our own publications
    assert a.workers[d.worker].peer_requests == 0
    # b holds the prefix for a request of its own; a peer's request to a worker b does not know yet
    # must not be counted, so its finish cannot take b's own reference away.
    mine = b.choose([*PREFIX, 3], max_tokens=4)
    b.started(mine)
    before = b.inflight.distinct(mine.worker)
    ghost = peers.Started(99, 12345, mine.hashes, 2)
    b.peers.apply(wire(a, [ghost]), time.monotonic())
    b.add_worker(reg(12345))
    b.peers.apply(wire(a, [peers.Finished(99)]), time.monotonic())
    assert b.inflight.distinct(mine.worker) == before
    assert b.overlaps(mine.hashes, {})[mine.worker] == len(mine.hashes)


def test_a_worker_that_leaves_takes_the_peer_requests_on_it() -> None:
    a, b = router(0), router(1)
    d = a.choose([*PREFIX, 1], max_tokens=4)
    b.peers.apply(wire(a, [started(a, d)]), time.monotonic())
    b.remove_worker(d.worker)
    assert b.peers.count(d.worker) == 0
    b.peers.apply(wire(a, [peers.Finished(d.id)]), time.monotonic())  # harmless after the drop


def test_long_prompts_are_split_under_the_message_budget() -> None:
    items: list[peers.Item] = [peers.Started(i, 1, list(range(20_000)), 2) for i in range(40)]
    parts = peers._parts(items)
    assert [i for p in parts for i in p] == items and len(parts) > 1
    assert all(len(peers.encoder.encode(peers.Routed(1, p))) < 1_000_000 for p in parts)


# ---- two RouterServices on a real nats-server -------------------------------------------------------
async def replica(nats: str, ns: str, k: int, conns: list[Any]) -> RouterService:
    """Router replica k+1 over its own NATS connection (appended to `conns`, for the caller to close)."""
    ctx = WorkerContext(RuntimeSettings(ns, (), nats, f"router-{k + 1}", "localhost"))
    ctx.nc = await requestplane.connect(nats, f"router-{k + 1}")
    conns.append(ctx.nc)
    return RouterService(ctx, router(k, ns), IdsOnly(), "backend")  # type: ignore[arg-type]


async def _two_replicas(nats: str) -> None:
    ns = f"peers{random.randrange(1 << 30)}"
    release = asyncio.Event()
    conns: list[Any] = []
    servers = []

    async def held(req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"text": " x"}
        await release.wait()
        yield {"text": "", "finish_reason": "stop"}

    for w in (1, 2):
        nc = await requestplane.connect(nats, f"w{w}")
        server = requestplane.EndpointServer(nc, reg(w, ns).subject, reg(w, ns).instance_subject, held)
        await server.start()
        conns.append(nc)
        servers.append(server)
    services = [await replica(nats, ns, k, conns) for k in range(2)]
    a, b = services
    await a.share()  # b shares only once a's request is in flight: a, alone until then, published no start
    caller = await requestplane.connect(nats, "frontend")
    conns.append(caller)

    async def ask(service: RouterService, tokens: list[int]) -> list[dict[str, Any]]:
        req = GenerateRequest(token_ids=tokens, sampling={"max_tokens": 4}).model_dump(exclude_none=True)
        assert service.ctx.nc is not None
        subject = f"{ns}.preprocess.generate.{service.router.peers.own_id:x}"
        async with served(service.ctx.nc, subject, service.generate):
            chunks, error = await chunks_via(caller, subject, req)
        assert error is None, error
        return chunks

    try:
        first = asyncio.create_task(ask(a, [*PREFIX, 1]))
        await until(lambda: a.router.decisions, 5, "router-1's decision")
        await b.share()  # a hears b's first Live list and tells it at once of the request in flight
        await until(lambda: sum(v.peer_requests for v in b.router.workers.values()) == 1, 5,
                    "router-2 to hear router-1's request")
        home = next(w for w, v in b.router.workers.items() if v.peer_requests == 1)
        second = asyncio.create_task(ask(b, [*PREFIX, 2]))
        await until(lambda: b.router.decisions, 5, "router-2's own decision")
        assert next(iter(b.router.decisions.values())).worker == home
        release.set()
        done = await asyncio.gather(first, second)
        assert all(chunks[-1].get("finish_reason") == "stop" for chunks in done)
        assert {c["routing"]["process"] for chunks in done for c in chunks if "routing" in c} == {f"w{home}"}
        await until(lambda: all(v.peer_requests == 0 for s in services for v in s.router.workers.values()),
                    5, "both routers to hear the finishes")
    finally:
        for s in services:
            s.stop()
        for server in servers:
            await server.stop()
        for nc in conns:
            await nc.close()


def test_two_router_services_share_requests_over_nats(services) -> None:  # type: ignore[no-untyped-def]
    """Two routers on a real nats-server: one routes alone, then hears a second one start and tells it of its
    request in flight; the second sends its own request on the same prefix where the first one's runs."""
    asyncio.run(_two_replicas(services.nats))


def test_a_lone_router_publishes_only_its_live_list() -> None:
    """With no peer heard, starts and finishes are not published (nobody reads them); the Live list still is,
    so that peers find each other. Once a peer is heard they are."""
    async def run() -> list[peers.Routed]:
        sent: list[peers.Routed] = []
        heard = False

        async def publish(subject: str, data: bytes) -> None:
            sent.append(peers.decoder.decode(data))

        feed = peers.PeerFeed(publish, "ns", 1, lambda: [7], peers_heard=lambda: heard)
        feed.start()
        feed.started(7, 1, [1, 2], 1)
        feed.finished(7)
        await until(lambda: sent, 3, "the Live list")
        heard = True
        feed.started(8, 1, [1, 2], 1)
        await until(lambda: any(isinstance(i, peers.Started) for m in sent for i in m.items), 3, "the start")
        feed.stop()
        return sent

    items = [i for m in asyncio.run(run()) for i in m.items]
    assert isinstance(items[0], peers.Live)
    assert [i.id for i in items if isinstance(i, (peers.Started, peers.Finished))] == [8]


def test_a_lone_router_lists_rarely_and_answers_a_newcomer_at_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Alone, a router publishes its Live list as it starts and then only every LONE_LIVE_EVERY; a new peer
    gets ours at once; with peers heard it goes out every LIVE_EVERY."""
    monkeypatch.setattr(peers, "LIVE_EVERY", 0.02)
    monkeypatch.setattr(peers, "LONE_LIVE_EVERY", 0.3)

    async def run() -> None:
        lists: list[float] = []
        heard = False

        async def publish(subject: str, data: bytes) -> None:
            lists.extend(time.monotonic() for i in peers.decoder.decode(data).items if isinstance(i, peers.Live))

        feed = peers.PeerFeed(publish, "ns", 1, lambda: [], peers_heard=lambda: heard)
        feed.start()
        try:
            await until(lambda: len(lists) >= 3, 3, "three lone Live lists")
            # alone, a list every LONE_LIVE_EVERY (15 LIVE_EVERY periods), not faster
            assert all(b - a >= 0.3 - 0.02 for a, b in itertools.pairwise(lists[:3]))
            heard = True
            feed.peer_joined()
            t0, seen = time.monotonic(), len(lists)
            await until(lambda: len(lists) > seen, 2, "the answer to a new peer")
            assert lists[seen] - t0 < 0.25
            await until(lambda: len(lists) >= seen + 6, 2, "a list every LIVE_EVERY while peers are heard")
        finally:
            feed.stop()

    asyncio.run(run())


async def _two_idle_replicas(nats: str) -> None:
    ns = f"idle{random.randrange(1 << 30)}"
    services: list[RouterService] = []
    conns: list[Any] = []
    try:
        for k in range(2):
            services.append(await replica(nats, ns, k, conns))
            await services[-1].share()
        a, b = services
        # b's first list reaches a; a answers at once, not at its next lone period (LONE_LIVE_EVERY, 10 s)
        await until(lambda: b.router.peers.own_id in a.router.peers.heard
                    and a.router.peers.own_id in b.router.peers.heard, 3, "the two replicas to hear each other")
        b.stop()  # silent from now on, as if killed: a forgets it after PEER_SILENT_AFTER
        await until(lambda: not a.router.peers.heard, peers.PEER_SILENT_AFTER + 3, "router-1 to forget router-2")
    finally:
        for s in services:
            s.stop()
        for nc in conns:
            await nc.close()


def test_two_idle_router_services_find_each_other_at_once(services) -> None:  # type: ignore[no-untyped-def]
    """Two routers with nothing in flight, started one after the other on a real nats-server, hear each other
    within seconds though a lone router lists itself only every 10 s; one that goes silent is forgotten."""
    assert peers.LONE_LIVE_EVERY >= 10
    asyncio.run(_two_idle_replicas(services.nats))
