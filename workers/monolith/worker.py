"""A monolithic vLLM worker: one AsyncLLM behind the `generate` endpoint of component `vllm`.

    python -m workers.monolith.worker --model DIR_OR_ID [any vLLM engine flag]
"""

from __future__ import annotations

import asyncio

from workers.engine import EngineHandler, build_engine, engine_args_from, make_parser
from workers.runtime.serve import WorkerContext, setup_logging
from workers.runtime.settings import RuntimeSettings


async def serve(args: object) -> None:
    settings = RuntimeSettings.from_env()
    ctx = WorkerContext(settings)
    await ctx.connect()  # fail fast on a wrong endpoint, before minutes of model loading
    engine_args = engine_args_from(args)  # type: ignore[arg-type]
    engine = build_engine(engine_args)
    ctx.on_shutdown.append(engine.shutdown)
    handler = EngineHandler(engine, settings.process_name)
    await ctx.serve(args.component, "generate", handler.generate, model=engine_args.model,  # type: ignore[attr-defined]
                    block_size=engine_args.block_size)
    await ctx.run_until_stopped()


def main() -> None:
    setup_logging()
    parser = make_parser(__doc__ or "")
    parser.add_argument("--component", default="vllm", help="registration component (default: vllm)")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
