"""The life of a worker process: connect, register, serve an endpoint, shut down cleanly.

Registration comes last (after the engine loaded and the subscriptions exist) because the
launcher treats a registration as "ready": nothing may be routed to a worker before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from workers.runtime import exitcodes, requestplane
from workers.runtime.aio import wait_for
from workers.runtime.registry import Registration, Registry
from workers.runtime.settings import RuntimeSettings, ServiceRefused, ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

ENGINE_CHECK_INTERVAL = 0.5  # seconds; an engine death is acted on within this (the issue asks 2 s)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class WorkerContext:
    """Connections a worker holds for its whole life; endpoints and side tasks hang off it.

    How it ends decides what its callers see:
    * SIGTERM (or SIGINT): drain. The registration says `draining` (routers and frontends stop picking
      it), the request subjects are dropped, requests in flight get `drain_timeout` seconds to finish,
      the rest end with `shutting_down` (a frontend continues them on another instance), then the key
      goes. A second signal cuts the drain short.
    * `fail(code)`, e.g. its engine core died: unregister at once, end every stream, exit with `code`
      (workers.runtime.exitcodes) so the supervisor replaces the process and says why.
    """

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.nc: requestplane.NATS | None = None
        self.registry: Registry | None = None
        self.servers: list[requestplane.EndpointServer] = []
        self.stop_event = asyncio.Event()
        self.hurry = asyncio.Event()  # a second signal: stop draining
        self.exit_code = 0
        self.failure: str | None = None
        self.on_shutdown: list[Callable[[], Any]] = []  # sync or async; run in reverse at close
        self._engine: Any = None
        self._watchdog: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        s = self.settings
        self.nc = await requestplane.connect(s.nats_server, name=s.process_name or "worker")
        self.registry = await Registry.connect(s.etcd_endpoints)

    async def serve(self, component: str, endpoint: str, handler: requestplane.Handler,
                    **registration: object) -> Registration:
        assert self.nc is not None and self.registry is not None, "connect() first"
        s = self.settings
        lease_id = await self.registry.grant()
        subject = requestplane.endpoint_subject(s.namespace, component, endpoint)
        reg = Registration(namespace=s.namespace, component=component, endpoint=endpoint, subject=subject,
                           lease_id=lease_id, instance_id=lease_id, host=s.host, process=s.process_name, **registration)  # type: ignore[arg-type]
        server = requestplane.EndpointServer(self.nc, subject, reg.instance_subject, handler)
        await server.start()
        self.servers.append(server)
        await self.registry.register(reg)
        return reg

    # --- health ------------------------------------------------------------------------------
    def watch_engine(self, engine: Any, every: float = ENGINE_CHECK_INTERVAL) -> None:
        """Fail this worker within `every` seconds of its engine core dying (vLLM marks the engine
        dead when the EngineCore process exits; every later request would fail)."""
        self._engine = engine
        self._watchdog = asyncio.create_task(self._watch_engine(engine, every), name="engine-watchdog")

    async def _watch_engine(self, engine: Any, every: float) -> None:
        while not engine.errored:
            await asyncio.sleep(every)
        self.engine_died()

    def unhealthy(self) -> str | None:
        """Why this worker cannot serve right now (its /health says 503 with it), or None."""
        if self.failure is not None:
            return self.failure
        if self._engine is not None and self._engine.errored:
            return "the vLLM engine core died"
        if self.stop_event.is_set():
            return "draining: taking no new request"
        return None

    def engine_died(self) -> None:
        """A request saw EngineDeadError: act now rather than at the watchdog's next look."""
        self.fail(exitcodes.ENGINE_DEAD, "the vLLM engine core died")

    def fail(self, code: int, why: str) -> None:
        """Stop now, without draining, and exit with `code`."""
        if self.failure is None:
            log.error("%s: unregistering and exiting with code %d", why, code)
            self.failure, self.exit_code = why, code
        self.hurry.set()
        self.stop_event.set()

    # --- the end -----------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop_event.is_set():
            log.info("second stop signal: ending the drain now")
            self.hurry.set()
        self.stop_event.set()

    async def run_until_stopped(self) -> int:
        """Serve until a signal or `fail`; returns the process's exit code."""
        self.install_signal_handlers()
        await self.stop_event.wait()
        await self.close(drain=self.failure is None)
        return self.exit_code

    async def close(self, drain: bool = False) -> None:
        """Deregister (after draining, if asked) so no new request is routed here; end open streams."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if drain and self.registry is not None and self.servers:
            with contextlib.suppress(Exception):
                await wait_for(self.registry.mark_draining(), 5)
            timeout = self.settings.drain_timeout
            log.info("draining %d request(s) in flight (at most %.0f s)",
                     sum(s.in_flight for s in self.servers), timeout)
            cut = await asyncio.gather(*(s.drain(timeout, self.hurry) for s in self.servers))
            if sum(cut):
                log.warning("drain over: %d request(s) handed back to be continued elsewhere", sum(cut))
        if self.registry is not None:
            await self.registry.close()
        for server in self.servers:
            await server.stop()
        for hook in reversed(self.on_shutdown):
            with contextlib.suppress(Exception):
                result = hook()
                if result is not None:
                    await result
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop, as `vllm serve` does (vLLM depends on it), or asyncio's own loop without it.
    uvloop's loop costs less per message and timer: an idle KV router spent 2.0 ms/s of its main thread
    on asyncio's (load reports, Live lists, lease keepalives), bench/results/router-idle-cpu.md."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_worker(main: Coroutine[Any, Any, int | None]) -> NoReturn:
    """Run a worker's main coroutine and exit with its code. A failed worker (engine dead) leaves at
    once, even if a library left a non-daemon thread behind: the supervisor waits on this exit."""
    try:
        code = run_loop(main) or 0
    except (ServiceUnavailable, ServiceRefused) as exc:  # the address and the reason, not a traceback
        logging.getLogger(__name__).error("%s", exc)
        code = exitcodes.SERVICE_UNAVAILABLE
    if code:
        logging.shutdown()
        os._exit(code)
    sys.exit(0)


def serve_prometheus(port: int, what: str, health: Callable[[], str | None] | None = None) -> None:
    """This process's Prometheus metrics on `port`, at LAUNCHER_METRICS_ADDR (a pod's address) or 127.0.0.1,
    and `/health` beside them: 200 while it serves, 503 with the reason when it cannot (its engine died,
    it drains), as `vllm serve`'s /health. (prometheus_client's own server would answer 200 with the
    metrics on any path, /health included, whatever the engine's state.)

    A port already taken is logged, not fatal: serving matters more than its metrics."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import prometheus_client
    from prometheus_client.exposition import ThreadingWSGIServer

    metrics = prometheus_client.make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == "/health":
            why = health() if health is not None else None
            status = "200 OK" if why is None else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps({"status": "ok"} if why is None else {"status": "unavailable", "reason": why}).encode()]
        return metrics(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    addr = os.environ.get("LAUNCHER_METRICS_ADDR", "127.0.0.1")
    logger = logging.getLogger("workers.runtime.serve")
    try:
        server = make_server(addr, port, app, ThreadingWSGIServer, handler_class=Quiet)
    except OSError as exc:
        logger.warning("cannot serve metrics on %s:%d (%s); serving without them", addr, port, exc)
        return
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    logger.info("%s metrics on http://%s:%d/metrics, health on /health", what, addr, port)
