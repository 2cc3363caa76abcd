"""The OpenAI-compatible frontend process: HTTP in, NATS out to whatever the deployment serves.

    python -m workers.frontend.server --port 8000 [--host 127.0.0.1] [--model DIR] [--api-key-env NAME]

It finds the deployment's workers in etcd (namespace from LAUNCHER_NAMESPACE), listens at once
(`/health` answers 503 until a worker serves), and registers itself in etcd (component `frontend`,
endpoint `http`, its URL in `extra.url`) once it listens and sees a worker: that is what `launcher up`
waits for. No vLLM import: HTTP, NATS, etcd and a tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys

import uvicorn

from workers.frontend.app import FrontendApp, Settings
from workers.frontend.catalog import Catalog, follow
from workers.frontend.dispatch import Dispatcher
from workers.frontend.tokens import Tokenizers
from workers.kinds import KINDS
from workers.runtime import exitcodes
from workers.runtime.registry import Registration
from workers.runtime.serve import WorkerContext, setup_logging
from workers.runtime.settings import RuntimeSettings, ServiceRefused, ServiceUnavailable

log = logging.getLogger("workers.frontend")

COMPONENT = KINDS["frontend"].component


def build_parser() -> argparse.ArgumentParser:
    """Its flags (workers.kinds lists them; launcher.engine_flags reads them to check `args:`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model whose tokenizer to load before the first request")
    p.add_argument("--api-key-env", default=None,
                   help="name of the environment variable with the API key every /v1 route requires")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds of worker silence before a request fails (504)")
    p.add_argument("--retries", type=int, default=2, help="tries on other instances before the first token")
    p.add_argument("--migration-limit", type=int, default=3,
                   help="times a stream whose instance is lost mid-stream is continued on another (0: never)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def api_key(args: argparse.Namespace) -> str | None:
    if not args.api_key_env:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty); "
                         "export it before `launcher up`")
    return key


async def serve(args: argparse.Namespace) -> None:
    key = api_key(args)  # before connecting: a missing key is a configuration error, said at once
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()
    assert ctx.nc is not None and ctx.registry is not None
    catalog = Catalog()
    tokenizers = Tokenizers()
    if args.model:
        # Loaded while the workers start, so the first request does not wait for it.
        warm = asyncio.create_task(tokenizers.get(args.model))

        def loaded(t: asyncio.Task[object]) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.warning("tokenizer of %s: %s", args.model, t.exception())

        warm.add_done_callback(loaded)
    follower = asyncio.create_task(follow(ctx.registry, settings.namespace, catalog))
    dispatcher = Dispatcher(ctx.nc, catalog, args.request_timeout, args.retries, args.migration_limit)
    app = FrontendApp(dispatcher, catalog, tokenizers, Settings(key, args.max_request_bytes))
    # On SIGTERM uvicorn stops accepting and lets the streams in flight finish. It waits a little longer
    # than the workers drain, so a stream they hand back at their drain's end still gets its error event.
    config = uvicorn.Config(app.app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout) + 5, lifespan="off")
    server = uvicorn.Server(config)
    url = f"http://{args.host}:{args.port}"
    registering = asyncio.create_task(_register_when_serving(ctx, server, catalog, url))
    try:
        await server.serve()  # returns on SIGTERM/SIGINT (uvicorn's handlers), after draining
    finally:
        for task in (registering, follower):
            task.cancel()
        await ctx.close()
    if not server.started:
        sys.exit(1)  # e.g. the port was taken: uvicorn said so in the log


async def _register_when_serving(ctx: WorkerContext, server: uvicorn.Server, catalog: Catalog, url: str) -> None:
    """Ready = listening and some worker serves: only then may `launcher up` call it ready."""
    assert ctx.registry is not None
    while not server.started:
        await asyncio.sleep(0.05)
    log.info("listening on %s; waiting for a worker to serve", url)
    while not catalog.serving():
        catalog.changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(catalog.changed.wait(), 5)
    s = ctx.settings
    lease = await ctx.registry.grant()
    reg = Registration(namespace=s.namespace, component=COMPONENT, endpoint=KINDS["frontend"].endpoint, subject="",
                       lease_id=lease, host=s.host, process=s.process_name, extra={"url": url})
    await ctx.registry.register(reg)
    log.info("frontend ready at %s, serving %s", url, ", ".join(sorted(catalog.serving())))


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(serve(args))
    except (ServiceUnavailable, ServiceRefused) as exc:  # the address and the reason, not a traceback
        log.error("%s", exc)
        sys.exit(exitcodes.SERVICE_UNAVAILABLE)


if __name__ == "__main__":
    main()
