"""The life of a worker process: connect, register, serve an endpoint, shut down cleanly.

Registration comes last (after the engine loaded and the subscriptions exist) because the
launcher treats a registration as "ready": nothing may be routed to a worker before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from workers.runtime import requestplane
from workers.runtime.registry import Registration, Registry
from workers.runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class WorkerContext:
    """Connections a worker holds for its whole life; endpoints and side tasks hang off it."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.nc: requestplane.NATS | None = None
        self.registry: Registry | None = None
        self.servers: list[requestplane.EndpointServer] = []
        self.stop_event = asyncio.Event()
        self.on_shutdown: list[Callable[[], Any]] = []  # sync or async; run in reverse at close

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

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)

    async def run_until_stopped(self) -> None:
        self.install_signal_handlers()
        await self.stop_event.wait()
        await self.close()

    async def close(self) -> None:
        """Deregister first so no new request is routed here, then end open streams with an error."""
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


def serve_prometheus(port: int, what: str) -> None:
    """This process's Prometheus metrics on `port`, at LAUNCHER_METRICS_ADDR (a pod's address) or 127.0.0.1.

    A port already taken is logged, not fatal: serving matters more than its metrics."""
    import prometheus_client

    addr = os.environ.get("LAUNCHER_METRICS_ADDR", "127.0.0.1")
    try:
        prometheus_client.start_http_server(port, addr=addr)
        logging.getLogger("workers.runtime.serve").info("%s metrics on http://%s:%d/metrics", what, addr, port)
    except OSError as exc:
        logging.getLogger("workers.runtime.serve").warning(
            "cannot serve metrics on %s:%d (%s); serving without them", addr, port, exc)
