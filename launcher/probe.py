"""Kubernetes probes that mean what `launcher status` means: the process is registered in etcd.

`launcher export kubernetes` runs these inside each worker's container (exec probes and an init
container), with the container's own environment, so the identity they check is the one the
worker registers under (workers.runtime.settings: LAUNCHER_NAMESPACE, LAUNCHER_PROCESS, the host
name, ETCD_ENDPOINTS):

    python -m launcher.probe ready          # exit 0 iff this container's worker is registered
    python -m launcher.probe live           # as ready, but an unreachable etcd passes (see below)
    python -m launcher.probe wait A B ...   # block until processes A, B ... are registered

A registration counts for `ready` only when it names this host and a pid that is alive here, as the
supervisor counts only the current pid's key: a dead predecessor's key (its lease not yet expired)
is not readiness. `live` passes when etcd cannot be reached, because a liveness failure restarts
the container: an etcd outage must not restart every engine in the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable

import psutil

from workers.runtime import aio
from workers.runtime.registry import Registration, Registry
from workers.runtime.settings import RuntimeSettings

EXIT_OK = 0
EXIT_NOT_READY = 1
EXIT_USAGE = 2


class EtcdUnreachable(Exception):
    """etcd did not answer in time: the probe cannot tell whether the worker is registered."""


async def registrations(settings: RuntimeSettings, timeout: float) -> list[Registration]:
    """Every registration of the namespace; EtcdUnreachable when etcd does not answer in time."""
    try:
        registry = await aio.wait_for(Registry.connect(list(settings.etcd_endpoints)), timeout)
    except (ConnectionError, asyncio.TimeoutError, OSError) as exc:
        raise EtcdUnreachable(str(exc) or type(exc).__name__) from None
    try:
        return await aio.wait_for(registry.list(settings.namespace), timeout)
    except Exception as exc:
        raise EtcdUnreachable(f"{type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            await registry.client.close()


def own_registration(regs: list[Registration], settings: RuntimeSettings,
                     pid_alive: Callable[[int], bool] = psutil.pid_exists) -> Registration | None:
    """This container's worker: its process name, this host, and a pid alive here."""
    for reg in regs:
        if reg.process == settings.process_name and reg.host == settings.host and pid_alive(reg.pid):
            return reg
    return None


def missing(regs: list[Registration], names: list[str]) -> list[str]:
    """Which of `names` have no registration at all (any host, any pid: they run in other pods)."""
    have = {reg.process for reg in regs}
    return [n for n in names if n not in have]


async def check_ready(settings: RuntimeSettings, timeout: float, etcd_down_ok: bool) -> tuple[int, str]:
    if not settings.process_name:
        return EXIT_USAGE, "LAUNCHER_PROCESS is not set: which process should be registered?"
    try:
        regs = await registrations(settings, timeout)
    except EtcdUnreachable as exc:
        if etcd_down_ok:
            return EXIT_OK, f"etcd unreachable ({exc}); not failing liveness for it"
        return EXIT_NOT_READY, f"etcd unreachable: {exc}"
    reg = own_registration(regs, settings)
    if reg is None:
        return EXIT_NOT_READY, (f"{settings.process_name} on {settings.host} is not registered in "
                                f"{settings.namespace} (yet)")
    return EXIT_OK, f"{settings.process_name} registered as {reg.key} (pid {reg.pid})"


async def wait_for(settings: RuntimeSettings, names: list[str], timeout: float, interval: float,
                   say: Callable[[str], None]) -> None:
    """Until every named process is registered. No overall deadline: an init container that gives
    up only restarts and waits again; the workload's events say what it waits for."""
    last = ""
    while True:
        try:
            left = missing(await registrations(settings, timeout), names)
            msg = f"waiting for {', '.join(left)} to register in {settings.namespace}" if left else ""
        except EtcdUnreachable as exc:
            left, msg = names, f"waiting for etcd: {exc}"
        if not left:
            say(f"registered: {', '.join(names)}")
            return
        if msg != last:
            say(msg)
            last = msg
        await asyncio.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for etcd to answer")
    sub = p.add_subparsers(dest="mode", required=True)
    sub.add_parser("ready", help="exit 0 iff this container's worker is registered")
    sub.add_parser("live", help="as ready, but pass when etcd is unreachable")
    w = sub.add_parser("wait", help="block until the named processes are registered")
    w.add_argument("names", nargs="+")
    w.add_argument("--interval", type=float, default=2.0)
    args = p.parse_args(argv)
    settings = RuntimeSettings.from_env()
    if args.mode == "wait":
        asyncio.run(wait_for(settings, args.names, args.timeout, args.interval, lambda m: print(m, flush=True)))
        return EXIT_OK
    code, msg = asyncio.run(check_ready(settings, args.timeout, etcd_down_ok=args.mode == "live"))
    print(msg, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
