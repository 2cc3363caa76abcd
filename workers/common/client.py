"""Send one prompt to a deployment and print the streamed response (the printout existing scripts parse).

    python -m workers.common.client --prompt "what is the capital of france?" --max-tokens 10 --chat

Each line is `Annotated(data=<text so far>, event=None, comment=[], id=None)`; an error from the
worker (or a worker that died mid-stream) prints an Annotated with event='error' and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from workers.common.protocol import GenerateRequest
from workers.kinds import KINDS, entry_components, kind_of_component
from workers.runtime import registry, requestplane
from workers.runtime.annotated import Annotated
from workers.runtime.settings import RuntimeSettings, ServiceRefused, ServiceUnavailable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--component", default=None,
                   help="default: what the deployment serves (preprocess: a KV router, decode: disaggregated, "
                        "vllm: monolith)")
    p.add_argument("--endpoint", default=None, help="default: the request endpoint of the component's kind")
    p.add_argument("--namespace", default=None, help="default: LAUNCHER_NAMESPACE, else the topology name")
    p.add_argument("--timeout", type=float, default=requestplane.DEFAULT_IDLE_TIMEOUT * 2,
                   help="seconds of silence before the worker counts as dead")
    p.add_argument("--quiet", action="store_true", help="print only the final text")
    return p.parse_args(argv)


def build_request(args: argparse.Namespace) -> GenerateRequest:
    sampling: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.chat:
        return GenerateRequest(messages=[{"role": "user", "content": args.prompt}], sampling=sampling)
    return GenerateRequest(prompt=args.prompt, sampling=sampling)


async def generate(nc: requestplane.NATS, subject: str, request: GenerateRequest,
                   idle_timeout: float) -> AsyncIterator[Annotated]:
    """Yield Annotated whose data is the text so far; errors pass through unchanged. An answer with no
    text at all (the model ended at once) still yields one Annotated, so the caller sees it ended."""
    text = ""
    shown = False
    async for item in requestplane.stream(nc, subject, request.model_dump(exclude_none=True), idle_timeout):
        if item.is_error():
            yield item
            return
        chunk = item.data or {}
        delta = chunk.get("text", "")
        if not delta:
            continue  # a step that added no text (e.g. the final bookkeeping chunk) prints nothing
        text += delta
        shown = True
        yield Annotated(data=text, event=item.event, comment=item.comment, id=item.id)
    if not shown:
        yield Annotated(data=text)


def entry_of(components: set[str], wanted: str | None) -> str | None:
    """The component to call among those registered: the one asked for, else the deployment's way in."""
    if wanted is not None:
        return wanted if wanted in components else None
    return next((c for c in entry_components() if c in components), None)


async def discover(settings: RuntimeSettings, namespace: str | None, component: str | None) -> tuple[str, str]:
    """(namespace, component) to call: with neither given, the one deployment in etcd that serves anything."""
    where = ",".join(settings.etcd_endpoints)
    found = await registry.components_by_namespace(settings.etcd_endpoints)
    if namespace is not None:
        found = {namespace: found.get(namespace, set())}
    serving = {ns: c for ns, comps in found.items() if (c := entry_of(comps, component)) is not None}
    if len(serving) == 1:
        return next(iter(serving.items()))
    what = f"'{component}'" if component else "requests (a monolith, decode or router process)"
    if not serving:
        scope = f"namespace '{namespace}'" if namespace else "any namespace"
        raise SystemExit(f"nothing in {scope} serves {what} in etcd at {where}: is the deployment up "
                         "(launcher status)? Or pass --namespace / --component")
    raise SystemExit(f"several deployments serve {what}: {', '.join(sorted(serving))}; pass --namespace")


async def run(args: argparse.Namespace) -> int:
    settings = RuntimeSettings.from_env()
    namespace = args.namespace or os.environ.get("LAUNCHER_NAMESPACE")
    component = args.component
    if namespace is None or component is None:
        namespace, component = await discover(settings, namespace, component)
    kind = kind_of_component(component)
    endpoint = args.endpoint or (kind.endpoint if kind is not None else KINDS["monolith"].endpoint)
    subject = requestplane.endpoint_subject(namespace, component, endpoint)
    nc = await requestplane.connect(settings.nats_server, name="client")
    status = 0
    last = Annotated(data="")
    try:
        async for item in generate(nc, subject, build_request(args), args.timeout):
            last = item
            if item.is_error():
                status = 1
            if not args.quiet or item.is_error():
                print(item, flush=True)
    finally:
        await nc.close()
    if args.quiet and status == 0:
        print(last.data)
    return status


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(asyncio.run(run(parse_args(argv))))
    except (ServiceUnavailable, ServiceRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
