"""The OpenAI-compatible frontend process: HTTP in, NATS out to whatever the deployment serves.

    python -m workers.frontend.server --port 8000 [--host 127.0.0.1] [--model DIR] [--api-key-env NAME]
        [--processes N: N HTTP server processes on the port, `vllm serve --api-server-count` (processes.py)]
        [`vllm serve` server flags: --enable-auto-tool-choice --tool-call-parser hermes --chat-template T ...]

It finds the deployment's workers in etcd (namespace from LAUNCHER_NAMESPACE), listens at once
(`/health` answers 503 until a worker serves), builds vLLM's OpenAI server for each model the workers
register (`workers.frontend.openai_layer`, `workers.frontend.model_apps`), and registers itself in etcd
(component `frontend`, endpoint `http`, its URL in `extra.url`) once it listens, sees a worker and has
the servers of the models served then: that is
what `launcher up` waits for. Its `vllm serve` flags (tools, reasoning, chat template) go to vLLM's
own parser, which checks them when the frontend starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Collection
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from workers.frontend.app import FrontendApp, Observer, Settings
from workers.frontend.balance import BalancedAcceptor, GroupLoad, protocol_factory
from workers.frontend.catalog import Catalog, ModelRoute, follow
from workers.frontend.dispatch import Dispatcher
from workers.frontend.errors import ApiError
from workers.frontend.metrics import FrontendMetrics
from workers.frontend.model_apps import Builder, ModelApps, Signature
from workers.frontend.openai_layer import build_openai_app, model_config_of, serve_args, with_cors
from workers.frontend.processes import (
    ServerGroup,
    auto_processes,
    exit_with_parent,
    int_or_auto,
    tell_parent,
    usable_cores,
)
from workers.kinds import KINDS
from workers.runtime import exitcodes
from workers.runtime.registry import Registration
from workers.runtime.serve import WorkerContext, run_loop, setup_logging
from workers.runtime.settings import RuntimeSettings, ServiceRefused, ServiceUnavailable

log = logging.getLogger("workers.frontend")

COMPONENT = KINDS["frontend"].component


def build_parser() -> argparse.ArgumentParser:
    """Its flags (workers.kinds lists them; launcher.engine_flags reads them to check `args:`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help=(
        "the deployment's own model, as its workers load it: a request naming no model goes to it "
        "(workers.frontend.model_apps)"))
    p.add_argument("--api-key-env", default=None,
                   help="name of the environment variable with the API key every /v1 route requires")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--request-timeout", type=float, default=10.0,
                   help="seconds of worker silence before a request fails (504)")
    p.add_argument("--retries", type=int, default=2, help="tries on other instances before the first token")
    p.add_argument("--migration-limit", type=int, default=3,
                   help="times a stream whose instance is lost mid-stream is continued on another (0: never)")
    p.add_argument("--processes", type=int_or_auto, default=1,
                   help="HTTP server processes sharing the port, as `vllm serve --api-server-count` "
                        "(workers.frontend.processes); auto: one per 8 of the cores this host (or container) "
                        "gives the frontend, 1 to 8")
    # A child of a --processes group: the listening socket it inherits, and the pipe it says "serving" on.
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--group-load", default=None, help=argparse.SUPPRESS)  # the group's GroupLoad file
    p.add_argument("--group-index", type=int, default=None, help=argparse.SUPPRESS)  # this process's slot in it
    g = p.add_argument_group("vllm serve", "`vllm serve`'s own server flags, passed on to vLLM's parser (which checks "
                             "their values when the frontend starts) and used where `vllm serve` uses them")
    _add_vllm_flags(g, (*VLLM_SWITCHES, *VLLM_VALUES))
    g.add_argument("--model-flags", default={}, type=model_flags, help=(
        "a JSON object: served model name -> that model's own `vllm serve` flags, as argv (only "
        f"{', '.join(MODEL_FLAGS)}); they go after the flags above for that model's OpenAI layer, so a value "
        "given for both is the model's. A model matches by any of its served names"))
    return p


def _add_vllm_flags(group: Any, flags: tuple[str, ...]) -> None:
    for flag in flags:
        if flag in VLLM_SWITCHES:
            group.add_argument(f"--{flag}", action="store_true", default=None)
        elif flag in CORS_LISTS:
            group.add_argument(f"--{flag}", default=None, type=json_list)
        else:
            group.add_argument(f"--{flag}", default=None)


class _Refusal(Exception):
    pass


class _ModelFlagParser(argparse.ArgumentParser):
    """The flags one model may set (MODEL_FLAGS); a mistake raises instead of exiting, for the caller to
    say which model it was in."""

    def __init__(self) -> None:
        super().__init__(prog="--model-flags", add_help=False, allow_abbrev=False)
        _add_vllm_flags(self, MODEL_FLAGS)

    def error(self, message: str) -> NoReturn:
        raise _Refusal(message)


def model_flags(value: str) -> dict[str, list[str]]:
    """--model-flags: each model's list read by MODEL_FLAGS' parser (a server-wide flag, an unknown one or a
    missing value is refused, naming the model), and written back as argv for vLLM's parser."""
    try:
        given = json.loads(value)
    except ValueError:
        given = None
    if not isinstance(given, dict) or not all(
            isinstance(flags, list) and all(isinstance(f, str) for f in flags) for flags in given.values()):
        raise argparse.ArgumentTypeError("a JSON object of served model name -> list of flags, such as "
                                         f"'{{\"m\": [\"--tool-call-parser\", \"hermes\"]}}'; not {value!r}")
    out: dict[str, list[str]] = {}
    for name, flags in given.items():
        try:
            read = _ModelFlagParser().parse_args(flags)
        except _Refusal as exc:
            raise argparse.ArgumentTypeError(f"model {name}: {exc} (a model's own flags are {', '.join(MODEL_FLAGS)}; "
                                             "the others are the server's, for every model)") from None
        out[name] = vllm_flags_of(read)
    return out


def json_list(value: str) -> str:
    """A JSON list of strings, as vLLM's parser reads the CORS lists (json.loads); kept as text for it. Its
    name types the flag for `launcher validate` (launcher.engine_flags.classify)."""
    try:
        items = json.loads(value)
    except ValueError:
        items = None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise argparse.ArgumentTypeError(f"a JSON list of strings, such as '[\"https://ui.example\"]'; not {value!r}")
    return value


# `vllm serve` flags a topology may give a frontend (`args:`): tools, reasoning, the chat template, answers,
# CORS (openai_layer.with_cors).
VLLM_SWITCHES = ("enable-auto-tool-choice", "exclude-tools-when-tool-choice-none", "trust-request-chat-template",
                 "enable-prompt-tokens-details", "enable-force-include-usage", "return-tokens-as-token-ids",
                 "enable-log-requests", "allow-credentials")
VLLM_VALUES = ("tool-call-parser", "reasoning-parser", "chat-template", "chat-template-content-format",
               "response-role", "default-chat-template-kwargs", "tool-parser-plugin", "max-log-len",
               "allowed-origins", "allowed-methods", "allowed-headers")
CORS_LISTS = ("allowed-origins", "allowed-methods", "allowed-headers")
# Of those, the ones that shape one model's OpenAI layer, which a model may set for itself (--model-flags,
# a topology's frontends[].models); CORS and request logging are the HTTP server's, one for every model.
SERVER_WIDE = ("enable-log-requests", "max-log-len", "allow-credentials", *CORS_LISTS)
MODEL_FLAGS = tuple(flag for flag in (*VLLM_SWITCHES, *VLLM_VALUES) if flag not in SERVER_WIDE)


def vllm_flags_of(args: argparse.Namespace) -> list[str]:
    """The `vllm serve` flags given, as argv for vLLM's parser (of those `args` has: a model's have fewer)."""
    argv: list[str] = []
    for flag in VLLM_SWITCHES:
        if getattr(args, flag.replace("-", "_"), None):
            argv.append(f"--{flag}")
    for flag in VLLM_VALUES:
        value = getattr(args, flag.replace("-", "_"), None)
        if value is not None:
            argv += [f"--{flag}", value]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.processes == "auto":
        cores = usable_cores()
        args.processes = auto_processes(cores)
        args.processes_why = f"processes auto: {args.processes} ({cores} cores here: one per 8, 1 to 8)"
    if not 1 <= args.processes <= 64:
        parser.error(f"--processes {args.processes}: give 1 to 64, or auto")
    return args


def api_key(args: argparse.Namespace) -> str | None:
    if not args.api_key_env:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty); "
                         "export it before `launcher up`")
    return key


class _Server(uvicorn.Server):
    """uvicorn's server; the first process of a group also passes each stop signal on to its children,
    and does not re-raise it once drained (uvicorn's default), so it can wait for them first. Every process
    of a group accepts through a BalancedAcceptor (its share of the shared socket) instead of the asyncio
    server uvicorn's startup would make."""

    group: ServerGroup | None = None
    balance: GroupLoad | None = None  # a group's process: accept its share only (workers.frontend.balance)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.balance is None or not sockets:
            return await super().startup(sockets)
        await self.lifespan.startup()
        if self.lifespan.should_exit:  # as uvicorn's own startup (the frontend runs with lifespan off)
            sys.exit(STARTUP_FAILURE)
        factory = protocol_factory(self)
        acceptors: list[Any] = [BalancedAcceptor(sock, factory, self.balance, self.server_state.connections).start()
                                for sock in sockets]
        self.servers = acceptors  # uvicorn only closes and waits for them
        self.started = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.group is None:
            return super().handle_exit(sig, frame)
        self.group.forward(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


async def serve(args: argparse.Namespace, argv: list[str]) -> None:
    key = api_key(args)  # before connecting: a missing key is a configuration error, said at once
    vllm_args = serve_args(args.model or "model", vllm_flags_of(args))  # vLLM's parser: a bad flag is said at once
    model_args = {}
    for name, flags in args.model_flags.items():  # each model's, checked too, naming the model
        try:
            model_args[name] = serve_args(args.model or "model", vllm_flags_of(args) + flags)
        except SystemExit as exc:
            raise SystemExit(f"--model-flags {name}: {exc}") from None
    child = args.listen_fd is not None
    if not child and getattr(args, "processes_why", None):
        log.info("%s", args.processes_why)
    group = ServerGroup.open(args.processes, argv, args.host, args.port) if args.processes > 1 and not child else None
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()
    assert ctx.nc is not None and ctx.registry is not None
    catalog = Catalog()
    follower = asyncio.create_task(follow(ctx.registry, settings.namespace, catalog))
    dispatcher = Dispatcher(ctx.nc, catalog, args.request_timeout, args.retries, args.migration_limit)
    metrics = FrontendMetrics()
    models = ModelApps(catalog, _builder(vllm_args, model_args, catalog, dispatcher, metrics), args.model,
                       _signature(catalog))
    app = FrontendApp(dispatcher, catalog, Settings(key, args.max_request_bytes), models, metrics)
    # On SIGTERM uvicorn stops accepting and lets the streams in flight finish. It waits a little longer
    # than the workers drain, so a stream they hand back at their drain's end still gets its error event.
    grace = math.ceil(settings.drain_timeout) + 5
    config = uvicorn.Config(with_cors(app.app, vllm_args), host=args.host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=grace, lifespan="off", interface="asgi3")
    server = _Server(config)
    server.group = group
    if group:
        server.balance = GroupLoad(group.load_path, 0)
    elif child and args.group_load:
        if args.group_index is None:
            raise SystemExit("frontend: --group-load needs --group-index (this process's slot)")
        server.balance = GroupLoad(Path(args.group_load), args.group_index)
    sockets = [group.sock] if group else [socket.socket(fileno=args.listen_fd)] if child else None
    url = f"http://{args.host}:{args.port}"
    refused = asyncio.Event()  # the frontend's own model's layer could not be built: it stops, exit 1
    building = asyncio.create_task(_build_as_registered(models, catalog))
    tasks = [follower, building]
    if child:  # accept only once it can serve; the parent registers the group
        orphaned = asyncio.Event()
        tasks += [asyncio.create_task(exit_with_parent(orphaned)),
                  asyncio.create_task(_child_ready(server, args.ready_fd, orphaned))]
    else:
        tasks.append(asyncio.create_task(_register_when_serving(ctx, server, models, url, group, refused,
                                                                args.model_flags)))
    if group:
        tasks += group.start()
    try:
        can_serve = True
        if child:  # settled; or its own model's layer failed (it exits 1 below: the parent hears it), or orphaned
            settled = asyncio.create_task(_settled(models, catalog))
            gone = asyncio.create_task(orphaned.wait())
            await asyncio.wait([settled, gone], return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not settled.done():
                settled.cancel()
                can_serve = False
            elif settled.exception() is not None:
                log.error("this frontend process stops: %s", settled.exception())
                refused.set()
                can_serve = False
        if can_serve:
            await server.serve(sockets=sockets)  # returns on SIGTERM/SIGINT (uvicorn's handlers), after draining
    finally:
        if group:
            group.forward(signal.SIGTERM)
            await group.wait_children(grace + 5)
        for task in tasks:
            task.cancel()
        await ctx.close()
        if group:
            group.close()
    if not server.started or refused.is_set() or (group and group.failed):
        sys.exit(1)  # e.g. the port was taken, or vLLM refused the model: said in the log


async def _child_ready(server: uvicorn.Server, ready_fd: int, orphaned: asyncio.Event) -> None:
    """A group's child: serving once it accepts (it only does once built); stops with an orphaned group."""
    while not server.started:
        await asyncio.sleep(0.05)
    tell_parent(ready_fd)
    await orphaned.wait()
    server.should_exit = True


def names_of(catalog: Catalog, route: ModelRoute) -> set[str]:
    """Every name any registered worker of the model serves it by (its served_model_name, else the model);
    a value of another shape in a registration is skipped, not a failed build."""
    names = {route.name}
    for reg in catalog.by_key.values():
        if reg.model != route.path:
            continue
        config = reg.extra.get("model_config")
        for given in (reg.extra.get("served_model_name"),
                      config.get("served_model_name") if isinstance(config, dict) else None):
            if isinstance(given, str):
                names.add(given)
            elif isinstance(given, (list, tuple)):
                names.update(n for n in given if isinstance(n, str))
    return names


def args_for_model(vllm_args: argparse.Namespace, model_args: dict[str, argparse.Namespace],
                   names: set[str], name: str) -> argparse.Namespace:
    """The `vllm serve` flags a model's layer is built with: its own (--model-flags, under any of its served
    `names`) where given, else the frontend's. Two entries for one model are refused, not one of them picked."""
    mine = [n for n in model_args if n in names]
    if len(mine) > 1:
        raise ValueError(f"--model-flags gives flags for {' and '.join(mine)}, names of the one model {name}: "
                         "give its flags under one name")
    return model_args[mine[0]] if mine else vllm_args


def _builder(vllm_args: argparse.Namespace, model_args: dict[str, argparse.Namespace], catalog: Catalog,
             dispatcher: Dispatcher, metrics: FrontendMetrics) -> Builder:
    """How a model's vLLM OpenAI server is built: from the registration of one of its workers, with its own
    flags where it has some."""
    async def build(route: ModelRoute) -> Any:
        try:
            config = model_config_of(catalog, route)
            args = args_for_model(vllm_args, model_args, names_of(catalog, route), route.name)
            return await build_openai_app(args, route, config, dispatcher, Observer(metrics, route.name))
        except Exception:
            log.exception("vLLM's OpenAI layer could not be built for %s", route.name)
            raise
    return build


def _signature(catalog: Catalog) -> Signature:
    """What a model's app is built from: the model its workers loaded, its context, its registered model
    configuration (a change of any of them under the same served name means a new app)."""
    def signature(route: ModelRoute) -> Any:
        return route.path, route.max_model_len, json.dumps(model_config_of(catalog, route), sort_keys=True,
                                                           default=str)
    return signature


async def _until_serving(catalog: Catalog) -> None:
    while not catalog.serving():
        await catalog.next_change(1)


async def _settled(models: ModelApps, catalog: Catalog) -> None:
    """The frontend's own model (`--model`; without it, any) is served, and every model served now has its
    vLLM server or failed to (its own 500); the failure of the frontend's own model raises
    (`ModelApps.settle`)."""
    while not catalog.serving() or (models.preferred_path is not None and models.preferred_name() is None):
        await catalog.next_change(1)
    await models.settle()


async def _build_as_registered(models: ModelApps, catalog: Catalog) -> None:
    """vLLM's OpenAI server for each model, once a worker registered it (its configuration comes with it),
    and again when that registration changes."""
    while True:
        models.build_known()
        await catalog.next_change(1)


async def _register_when_serving(ctx: WorkerContext, server: uvicorn.Server, models: ModelApps, url: str,
                                 group: ServerGroup | None, refused: asyncio.Event,
                                 flagged: Collection[str] = ()) -> None:
    """Ready = listening, some worker serves, vLLM's server is built for every model served (a model that
    registers later is built then), and every other process of its group serves: only then may `launcher
    up` call it ready. If the frontend's own model cannot be built, it stops (`refused`): a configuration
    error that `launcher up` reports."""
    assert ctx.registry is not None
    while not server.started:
        await asyncio.sleep(0.05)
    log.info("listening on %s; waiting for a worker to serve", url)
    try:
        await _settled(models, models.catalog)
    except ApiError as exc:
        log.error("the frontend stops: %s", exc.message)
        refused.set()
        server.should_exit = True
        return
    served = {n for route in models.catalog.serving().values() for n in names_of(models.catalog, route)}
    for name in sorted(set(flagged) - served):  # by hand, a typo: `launcher validate` refuses it
        log.warning("--model-flags gives flags for %s, a name no model served now answers to: they apply once a "
                    "model of that name registers", name)
    if group is not None:
        await group.all_ready.wait()
    await _until_serving(models.catalog)
    s = ctx.settings
    lease = await ctx.registry.grant()
    reg = Registration(namespace=s.namespace, component=COMPONENT, endpoint=KINDS["frontend"].endpoint, subject="",
                       lease_id=lease, host=s.host, process=s.process_name, extra={"url": url})
    await ctx.registry.register(reg)
    log.info("frontend ready at %s, serving %s", url, ", ".join(sorted(models.apps)))


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        run_loop(serve(args, argv))
    except (ServiceUnavailable, ServiceRefused) as exc:  # the address and the reason, not a traceback
        log.error("%s", exc)
        sys.exit(exitcodes.SERVICE_UNAVAILABLE)


if __name__ == "__main__":
    main()
