"""A prefill worker: runs prompts for decode workers and leaves their KV cache with the connector.

    python -m workers.disaggregated.prefill_worker --model DIR_OR_ID \
        --kv-transfer-config '{"kv_connector": "ExampleConnector", "kv_role": "kv_producer", ...}' [any vLLM flag]

It serves component `prefill` (endpoint `generate`) with the plain engine loop: a decode worker
sends max_tokens=1 and kv_transfer_params {"do_remote_decode": true}, and the final chunk's
kv_transfer_params tell the decode worker where the KV is (NixlConnector), or are empty when the
connector finds it by the prompt alone (ExampleConnector's shared storage).
"""

from __future__ import annotations

import argparse
import sys

from workers.disaggregated.kvconfig import adapt_argv
from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser, registration_of
from workers.kinds import KINDS
from workers.runtime.serve import WorkerContext, run_worker, setup_logging
from workers.runtime.settings import RuntimeSettings

DEFAULT_COMPONENT = KINDS["prefill"].component


def kv_role_of(engine_args: object) -> str | None:
    """The connector role for the registration, so a router or `launcher status` can tell P from D."""
    config = getattr(engine_args, "kv_transfer_config", None)
    return getattr(config, "kv_role", None) if config is not None else None


async def serve(args: argparse.Namespace) -> int:
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()  # fail fast on a wrong endpoint, before minutes of model loading
    engine_args = engine_args_from(args)
    if engine_args.kv_transfer_config is None:
        raise SystemExit("a prefill worker needs --kv-transfer-config (kv_connector, kv_role kv_producer)")
    engine = build_engine(engine_args, args.metrics_port, health=ctx.unhealthy)
    ctx.on_shutdown.append(engine.shutdown)
    ctx.watch_engine(engine)
    handler = EngineHandler(engine, settings.process_name, ctx.engine_died)
    await ctx.serve(args.component, KINDS["prefill"].endpoint, handler.generate, **registration_of(engine, engine_args),
                    kv_role=kv_role_of(engine_args))
    return await ctx.run_until_stopped()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This kind's flags beside vLLM's (workers.kinds lists them)."""
    parser.add_argument("--component", default=DEFAULT_COMPONENT,
                        help=f"registration component (default: {DEFAULT_COMPONENT})")


def main() -> None:
    setup_logging()
    parser = make_parser(__doc__ or "")
    add_flags(parser)
    run_worker(serve(parser.parse_args(adapt_argv(sys.argv[1:]))))


if __name__ == "__main__":
    main()
