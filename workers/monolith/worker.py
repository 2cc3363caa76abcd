"""A monolithic vLLM worker: one AsyncLLM behind the `generate` endpoint of component `vllm`.

    python -m workers.monolith.worker --model DIR_OR_ID [any vLLM engine flag]
"""

from __future__ import annotations

import argparse

from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser, registration_of
from workers.kinds import KINDS
from workers.runtime.serve import WorkerContext, run_worker, setup_logging
from workers.runtime.settings import RuntimeSettings


async def serve(args: object) -> int:
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()  # fail fast on a wrong endpoint, before minutes of model loading
    engine_args = engine_args_from(args)  # type: ignore[arg-type]
    engine = build_engine(engine_args, args.metrics_port, health=ctx.unhealthy)  # type: ignore[attr-defined]
    ctx.on_shutdown.append(engine.shutdown)
    ctx.watch_engine(engine)
    handler = EngineHandler(engine, settings.process_name, ctx.engine_died)
    await ctx.serve(args.component, KINDS["monolith"].endpoint, handler.generate,  # type: ignore[attr-defined]
                    **registration_of(engine, engine_args))
    return await ctx.run_until_stopped()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """This kind's flags beside vLLM's (workers.kinds lists them)."""
    component = KINDS["monolith"].component
    parser.add_argument("--component", default=component, help=f"registration component (default: {component})")


def main() -> None:
    setup_logging()
    parser = make_parser(__doc__ or "")
    add_flags(parser)
    run_worker(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
