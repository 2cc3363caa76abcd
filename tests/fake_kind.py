"""A kind that exists only in tests (tests/test_kinds.py): `echo`, an engine worker without an engine.

It registers and serves exactly as a real worker does (WorkerContext.serve, its kind's component and
request endpoint, the model it serves), and answers `generate` with the prompt's token ids, one per
chunk, up to max_tokens. Its row is `KIND`; a test puts it into workers.kinds.KINDS with monkeypatch
and then runs the launcher's validate and plan, and the frontend's catalog and dispatcher, unchanged.

    python -m tests.fake_kind --model NAME [--metrics-port N] [--echo-prefix TEXT] [vLLM flags, ignored]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

from workers.engine import add_worker_flags
from workers.kinds import GENERATIVE_ROUTES, Kind
from workers.runtime.serve import WorkerContext, run_worker, setup_logging
from workers.runtime.settings import RuntimeSettings

KIND = Kind("echo", "tests.fake_kind", tier=2, component="echo", endpoints=("generate",), engine=True,
            entry_rank=3, flags={"metrics-port": "int", "echo-prefix": "str"},
            set_by_launcher=frozenset({"metrics-port"}), routes=GENERATIVE_ROUTES)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Its flags beside vLLM's and the --metrics-port every engine worker takes."""
    parser.add_argument("--echo-prefix", default="", help="text put before every echoed token")


async def echo(request: dict[str, Any], prefix: str = "") -> AsyncIterator[dict[str, Any]]:
    ids = list(request.get("token_ids") or [])[: int((request.get("sampling") or {}).get("max_tokens") or 16)]
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        yield {"text": f"{prefix}<{token}>", "token_ids": [token], **({"finish_reason": "length"} if last else {})}


async def serve(args: argparse.Namespace) -> int:
    ctx = WorkerContext(RuntimeSettings.from_env())
    await ctx.connect()
    await ctx.serve(KIND.component, KIND.endpoint, lambda request: echo(request, args.echo_prefix), model=args.model,
                    extra={"served_model_name": args.model, "max_model_len": 64})
    return await ctx.run_until_stopped()


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    add_worker_flags(parser)
    add_flags(parser)
    args, _engine_flags = parser.parse_known_args()
    run_worker(serve(args))


if __name__ == "__main__":
    main()
