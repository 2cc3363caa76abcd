"""vLLM's own OpenAI server, built in the frontend over the deployment's workers.

Everything `vllm serve` answers for a generative model comes from vLLM's classes here, unchanged:
chat, completions, responses, Anthropic messages, tokenize, detokenize, version, models, with their
validation, error objects, tools, reasoning, structured output, n, echo, batches and logprobs. The one
thing replaced is the engine core (`workers.frontend.remote_engine`).

The model's configuration comes from the workers' registration (`model_config`: the engine arguments
that shape vLLM's ModelConfig, and the max_model_len their engine resolved), so the frontend validates and
renders as the worker's engine would. The frontend's own vLLM server flags (`--enable-auto-tool-choice`,
`--tool-call-parser`, `--reasoning-parser`, `--chat-template`, ...) are `vllm serve`'s, read by vLLM's
own parser and checked by its own validation when the frontend starts.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.dispatch import Dispatcher
from workers.frontend.remote_engine import RemoteEngineCore, build_engine

log = logging.getLogger(__name__)

SUPPORTED_TASKS: tuple[Any, ...] = ("generate",)


_loaded_plugins: set[str] = set()  # --tool-parser-plugin paths imported in this process (once each)


def serve_args(model: str, flags: list[str]) -> argparse.Namespace:
    """`vllm serve MODEL FLAGS...` as vLLM's own parser reads and checks it (SystemExit with its message),
    with what `vllm serve`'s setup_server does next: load a --tool-parser-plugin (its parsers register with
    vLLM; once per process, though every model's flags carry the frontend's) and check the tool parser name
    (vLLM's validate_api_server_args). The reasoning parser's name is checked here too: vLLM checks it only
    where it builds an engine configuration, which the frontend never does."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import validate_api_server_args
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="frontend (vllm serve flags)"))
    args = parser.parse_args(["--model", model, *flags])
    try:
        validate_parsed_serve_args(args)
        plugin = args.tool_parser_plugin
        if plugin and len(plugin) > 3 and plugin not in _loaded_plugins:  # as vLLM's setup_server
            ToolParserManager.import_tool_parser(plugin)
            _loaded_plugins.add(plugin)
        validate_api_server_args(args)
        known = ReasoningParserManager.list_registered()
        if args.reasoning_parser and args.reasoning_parser not in known:
            raise KeyError(f"invalid reasoning parser: {args.reasoning_parser} (choose from {', '.join(known)})")
    except KeyError as exc:
        raise SystemExit(f"frontend: {exc.args[0] if exc.args else exc}") from None
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"frontend: {exc}") from None
    return args


def with_cors(app: Any, args: argparse.Namespace) -> Any:
    """`vllm serve`'s CORS (--allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials; no
    origin by default) in front of everything the frontend answers: its own /v1/models, /health and errors
    too, and a preflight (allowed or not) before the API key check, since a browser sends no key on one.
    Any other OPTIONS needs the key, as every request does. Each model's vLLM app is built without its own
    CORS (build_openai_app)."""
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=args.allowed_origins, allow_credentials=args.allow_credentials,
                          allow_methods=args.allowed_methods, allow_headers=args.allowed_headers)


def model_config_of(catalog: Catalog, route: ModelRoute) -> dict[str, Any]:
    """The registered engine arguments of one of the model's engine workers (all load the same model)."""
    for reg in catalog.by_key.values():
        config = reg.extra.get("model_config")
        if reg.model == route.path and isinstance(config, dict):
            return dict(config)
    return {"model": route.path, "served_model_name": [route.name]}


async def build_openai_app(args: argparse.Namespace, route: ModelRoute, model_config: dict[str, Any],
                           dispatcher: Dispatcher, observer: Any = None) -> Any:
    """vLLM's FastAPI app (`vllm serve`'s routers, exception handlers and middleware) and its state,
    over an AsyncLLM whose engine core is the deployment."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.usage.usage_lib import UsageContext

    args = argparse.Namespace(**vars(args))
    for name, value in model_config.items():
        if value is not None:
            setattr(args, name, value)
    names = model_config.get("served_model_name")
    args.served_model_name = names if isinstance(names, list) else [names or route.name]
    if route.max_model_len is not None:
        args.max_model_len = route.max_model_len
    args.disable_log_stats = True
    args.api_key = None  # the frontend checks its key itself (`--api-key-env`), before anything else
    args.allowed_origins, args.allow_credentials = [], False  # CORS is answered once, in front (with_cors)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    served = route.name
    core = RemoteEngineCore(dispatcher, lambda: served, observer)
    engine = build_engine(vllm_config, core)
    root = logging.getLogger()
    level = root.level
    app = build_app(args, SUPPORTED_TASKS, vllm_config.model_config)
    # vLLM 0.32's build_app leaves the root logger at ERROR (seen: 20 -> 40), which silenced every INFO and
    # WARNING of the frontend's own (retries, migrations, readiness) from then on.
    root.setLevel(level)
    await init_app_state(engine, app.state, args, SUPPORTED_TASKS)
    log.info("vLLM's OpenAI layer is up for %s (max_model_len %s, tool parser %s, reasoning parser %s)",
             served, vllm_config.model_config.max_model_len, args.tool_call_parser,
             args.structured_outputs_config.reasoning_parser or None)
    return app
