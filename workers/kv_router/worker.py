"""A vLLM worker behind the KV router: serves token ids, and tells the router what it caches.

    python -m workers.kv_router.worker --model M --enable-prefix-caching --block-size B [any vLLM flag]

Besides the `generate` endpoint (component `backend`, registered with its real block size), the
worker turns on vLLM's KV event publisher (ZMQ on a free local port), relays BlockStored /
BlockRemoved / AllBlocksCleared to NATS tagged with its lease id and a batch sequence number, and
publishes its load (running, waiting, KV usage, prefix-cache counters) within a second of a change. It
keeps a mirror of its live blocks so that a router that starts late or misses a batch can ask for
a snapshot (see workers/kv_router/events.py). Requests come handed off by a router: the worker streams
to the caller directly and reports each request's end to the router that sent it (requestplane).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser, registration_of
from workers.kinds import KINDS
from workers.kv_router import events as ev
from workers.runtime.serve import WorkerContext, run_worker, setup_logging
from workers.runtime.settings import RuntimeSettings

log = logging.getLogger("workers.kv_router.worker")

LOAD_INTERVAL = 1.0  # how often the load is read, and published when it changed
LOAD_HEARTBEAT = 5.0  # an unchanged load is published again this often (a router started since hears it)
COMPONENT = KINDS["kv_worker"].component
ENDPOINT = KINDS["kv_worker"].endpoint


@dataclass
class LoadState:
    """Written by vLLM's stat logger hook (in the engine's output loop), read by the load publisher."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    updated: float = 0.0


def load_logger_factory(state: LoadState) -> Any:
    """A vLLM StatLoggerBase that copies scheduler stats into `state` (vLLM's own API for custom stats)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is None:
                return
            state.running = scheduler_stats.num_running_reqs
            state.waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            state.kv_usage = scheduler_stats.kv_cache_usage
            pcs = scheduler_stats.prefix_cache_stats
            if pcs is not None:
                state.prefix_queries += pcs.queries
                state.prefix_hits += pcs.hits
            state.updated = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index=0: LoadLogger(vllm_config, engine_index)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("KV event relay stopped: %r", task.exception())


class EventRelay:
    """vLLM's ZMQ KV events -> our numbered NATS batches, plus snapshots on request."""

    def __init__(self, nc: Any, namespace: str) -> None:
        import zmq
        import zmq.asyncio

        self.nc = nc
        self.namespace = namespace
        self.mirror = ev.BlockMirror(0)
        self.sender = ev.BatchSender(nc, namespace)
        self.ready = asyncio.Event()  # set once the lease id (our worker id) is known
        self._lock = asyncio.Lock()
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        # We bind and vLLM's publisher connects (it connects to any endpoint without '*'): the socket
        # exists before the engine starts, so no event can be published before we listen. ZMQ picks the
        # port as it binds (no port chosen first and bound later, which another socket may take between).
        self._sub.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self._sub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.tasks: list[asyncio.Task[None]] = []
        self._vllm_seq: int | None = None

    def set_block_size(self, block_size: int) -> None:
        self.sender.block_size = self.mirror.block_size = block_size

    def start(self, worker_id: int) -> None:
        self.sender.worker_id = worker_id
        self.ready.set()
        task = asyncio.create_task(self._relay())
        task.add_done_callback(_log_failure)
        self.tasks.append(task)

    async def listen_for_resync(self) -> None:
        await self.nc.subscribe(ev.resync_subject(self.namespace, self.sender.worker_id), cb=self._on_resync)

    async def _on_resync(self, msg: Any) -> None:
        # Under the lock: no relayed batch may fall between a snapshot's batches (it must follow them).
        async with self._lock:
            first = self.sender.seq
            n = await self.sender.send(self.mirror.snapshot(), snapshot=True)
            log.info("resync requested: sent a snapshot of %d blocks as batches %d..%d", len(self.mirror.blocks),
                     first, first + n - 1)

    @staticmethod
    def translate(vllm_event: Any) -> ev.Event | None:
        kind = type(vllm_event).__name__
        if kind == "BlockStored":
            return ev.Stored(hashes=list(vllm_event.block_hashes), parent=vllm_event.parent_block_hash,
                             tokens=ev.tokens_bytes(vllm_event.token_ids))
        if kind == "BlockRemoved":
            return ev.Removed(hashes=list(vllm_event.block_hashes))
        if kind == "AllBlocksCleared":
            return ev.Cleared()
        return None

    async def _relay(self) -> None:
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        while True:
            parts = await self._sub.recv_multipart()
            if len(parts) >= 2 and len(parts[-2]) == 8:
                vseq = int.from_bytes(parts[-2], "big")
                if self._vllm_seq is not None and vseq != self._vllm_seq + 1:
                    log.warning("vLLM KV event gap (%d -> %d): routers will see stale blocks until a resync",
                                self._vllm_seq, vseq)
                self._vllm_seq = vseq
            try:
                batch = decoder.decode(parts[-1])
            except msgspec.DecodeError as exc:
                log.warning("undecodable KV event batch dropped: %s", exc)
                continue
            out = [e for e in (self.translate(x) for x in batch.events) if e is not None]
            if not out:
                continue
            async with self._lock:
                for e in out:
                    self.mirror.apply(e)
                if self.sender.seq == 0:
                    log.info("first KV event batch relayed (%d events)", len(out))
                await self.sender.send(out)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self._sub.close(linger=0)
        self._ctx.term()


async def publish_load(nc: Any, namespace: str, worker_id: int, process: str, state: LoadState,
                       server: Any) -> None:
    """The engine's load, and the routers' requests being served here (so that a router whose end report
    was lost stops counting one: workers.kv_router.router.LOST_END_AFTER): read every LOAD_INTERVAL,
    published when it changed and otherwise every LOAD_HEARTBEAT. An idle worker's unchanged report, twice
    a second for two workers, was a sixth of an idle router's CPU."""
    subject = ev.load_subject(namespace)
    last, sent_at = b"", -math.inf
    while True:
        load = ev.Load(worker=worker_id, running=state.running, waiting=state.waiting, kv_usage=state.kv_usage,
                       prefix_queries=state.prefix_queries, prefix_hits=state.prefix_hits, process=process,
                       routed=server.routed_in_flight())
        data, now = msgspec.msgpack.encode(load), time.monotonic()
        if data != last or now - sent_at >= LOAD_HEARTBEAT:
            with contextlib.suppress(Exception):  # a reconnecting client: tried again at the next read
                await nc.publish(subject, data)
                last, sent_at = data, now
        await asyncio.sleep(LOAD_INTERVAL)


async def serve(args: Any) -> int:
    from vllm.config import KVEventsConfig

    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()  # fail fast on a wrong endpoint, before minutes of model loading
    engine_args = engine_args_from(args)
    if engine_args.enable_prefix_caching is False:
        raise SystemExit("a worker behind the KV router needs prefix caching: drop --no-enable-prefix-caching")
    engine_args.enable_prefix_caching = True
    assert ctx.nc is not None
    relay = EventRelay(ctx.nc, settings.namespace)
    ctx.on_shutdown.append(relay.close)
    engine_args.kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                  endpoint=relay.endpoint, topic="kv")
    load = LoadState()
    engine = build_engine(engine_args, args.metrics_port, stat_loggers=[load_logger_factory(load)],
                          health=ctx.unhealthy)
    ctx.on_shutdown.append(engine.shutdown)
    ctx.watch_engine(engine)
    block_size = int(engine.vllm_config.cache_config.block_size)  # the real one, after platform defaults
    relay.set_block_size(block_size)
    handler = EngineHandler(engine, settings.process_name, ctx.engine_died)
    # Our first lease id is our instance id, the worker id in events for the process's life (a lost lease is
    # replaced, the id stays); the relay starts reading ZMQ before anyone can route to us.
    instance_id = await ctx.registry.grant() if ctx.registry else 0
    relay.start(instance_id)
    await relay.listen_for_resync()
    reg, server = await _serve_with_lease(ctx, instance_id, handler, registration_of(engine, engine_args))
    log.info("kv worker %x serving %s, block size %d, KV events from %s",
             reg.instance, reg.instance_subject, block_size, relay.endpoint)
    loader = asyncio.create_task(publish_load(ctx.nc, settings.namespace, instance_id, settings.process_name, load,
                                              server))
    relay.tasks.append(loader)  # cancelled with the relay at shutdown
    return await ctx.run_until_stopped()


async def _serve_with_lease(ctx: WorkerContext, lease_id: int, handler: EngineHandler,
                            registration: dict[str, Any]) -> tuple[Any, Any]:
    """WorkerContext.serve, but under a lease granted earlier (the relay needed the id first)."""
    from workers.runtime import requestplane
    from workers.runtime.registry import Registration

    assert ctx.nc is not None and ctx.registry is not None
    s = ctx.settings
    subject = requestplane.endpoint_subject(s.namespace, COMPONENT, ENDPOINT)
    reg = Registration(namespace=s.namespace, component=COMPONENT, endpoint=ENDPOINT, subject=subject,
                       lease_id=lease_id, instance_id=lease_id, host=s.host, process=s.process_name,
                       **registration)
    server = requestplane.EndpointServer(ctx.nc, subject, reg.instance_subject, handler.generate)
    await server.start()
    ctx.servers.append(server)
    await ctx.registry.register(reg)
    return reg, server


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This kind's flags beside vLLM's: none (workers.kinds lists them)."""


def main() -> None:
    setup_logging()
    parser = make_parser(__doc__ or "")
    add_flags(parser)
    run_worker(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
