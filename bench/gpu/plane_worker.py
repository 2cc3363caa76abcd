"""Bench only: our EngineHandler behind a request plane loaded from a source file (bench_compare's
`before` side: the plane as it was before issue 13, on the same engine, in the same run).

    python bench/gpu/plane_worker.py --plane FILE --nats URL --subject S --model DIR [vLLM flags]

Prints READY once the engine is built and the subscriptions exist; runs until SIGTERM. No etcd
registration: the benchmark addresses the subject directly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_plane(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("requestplane_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def serve(args: object) -> None:
    from workers.engine import EngineHandler, build_engine, engine_args_from

    plane = load_plane(args.plane)  # type: ignore[attr-defined]
    nc = await plane.connect(args.nats, "plane-worker")  # type: ignore[attr-defined]
    engine = build_engine(engine_args_from(args))
    handler = EngineHandler(engine, "plane-worker")
    subject = args.subject  # type: ignore[attr-defined]
    server = plane.EndpointServer(nc, subject, subject + ".1", handler.generate)
    await server.start()
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    engine.shutdown()
    await nc.close()


def main() -> None:
    from workers.engine import make_parser

    parser = make_parser(__doc__ or "")
    parser.add_argument("--plane", required=True, help="a requestplane.py source file")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--subject", required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
