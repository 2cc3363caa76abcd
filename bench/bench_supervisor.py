"""Supervisor benchmark: restart and lease-revocation latency, `down` time, idle cost; tmux vs subprocess.

    python bench/bench_supervisor.py [--workers 4] [--kills 5] [--idle 10]

Workers are the cheap fake of tests/test_supervisor_e2e.py (registers in etcd like a real worker,
with one child that leaves its process group), so the numbers are the supervisor's own overhead
plus a python start-up, not vLLM's engine start (which adds its 25-45 s to any restart). The
restart backoff is set to its floor (0.1 s) so the latency is the supervisor's, not the policy's.

Side by side in one run, on one etcd and one nats-server started here:
- death -> lease gone: kill -9 a ready worker, poll etcd until its key is gone. Baseline: the same
  fake worker started by hand (nobody revokes its lease), so its key lives until the TTL expires.
- death -> registered again: kill -9 until the restarted worker's new key appears.
- `launcher down` wall time for a deployment of N workers (each with a child).
- the supervisor's own CPU (%) and RSS while the deployment idles.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import services as svc  # noqa: E402
from launcher.backends.tmux import SOCKET_ENV  # noqa: E402
from launcher.state import RunDir  # noqa: E402
from tests.helpers import launcher, write_topology  # noqa: E402
from tests.test_supervisor_e2e import FAKE_WORKER  # noqa: E402
from workers.runtime.registry import Registration, Registry  # noqa: E402

POLL = 0.01


async def _wait_key_gone_and_back(registry: Registry, namespace: str, process: str, old: Registration,
                                  killed_at: float, timeout: float = 60.0) -> tuple[float, float | None]:
    gone: float | None = None
    while time.monotonic() - killed_at < timeout:
        regs = await registry.list(namespace)
        mine = [r for r in regs if r.process == process]
        if gone is None and all(r.lease_id != old.lease_id for r in mine):
            gone = time.monotonic() - killed_at
        if gone is not None and any(r.pid != old.pid for r in mine):
            return gone, time.monotonic() - killed_at
        await asyncio.sleep(POLL)
    if gone is None:
        raise RuntimeError(f"{process}'s key still there {timeout} s after the kill")
    return gone, None


async def kill_and_time(etcd: str, namespace: str, process: str, back: bool = True) -> tuple[float, float | None]:
    registry = await Registry.connect([etcd])
    try:
        old = next(r for r in await registry.list(namespace) if r.process == process)
        os.kill(old.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        if not back:
            while any(r.lease_id == old.lease_id for r in await registry.list(namespace)):
                await asyncio.sleep(POLL)
            return time.monotonic() - killed_at, None
        return await _wait_key_gone_and_back(registry, namespace, process, old, killed_at)
    finally:
        await registry.client.close()


async def wait_registered(etcd: str, namespace: str, processes: set[str], timeout: float = 60) -> None:
    registry = await Registry.connect([etcd])
    try:
        deadline = time.monotonic() + timeout
        while {r.process for r in await registry.list(namespace)} < processes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not registered: {processes}")
            await asyncio.sleep(0.1)
    finally:
        await registry.client.close()


def topology(name: str, fake_dir: Path, backend: str, workers: int) -> dict[str, Any]:
    return {
        "name": name, "backend": backend, "model": "fake-model",
        "env": {"PYTHONPATH": f"{fake_dir}{os.pathsep}{ROOT}", "FAKE_WORKER": "register"},
        "workers": [{"name": "v", "replicas": workers,
                     "restart": {"policy": "on-failure", "max_restarts": 1000, "backoff": 0.1, "backoff_max": 0.1}}],
    }


def bench_backend(backend: str, args: argparse.Namespace, work: Path, env: dict[str, str], etcd: str
                  ) -> dict[str, Any]:
    fake_dir = work / "fake"
    name = f"bench-{backend}"
    path = write_topology(work / f"{name}.yaml", topology(name, fake_dir, backend, args.workers))
    t0 = time.monotonic()
    launcher(["up", str(path)], env, timeout=300)
    up_s = time.monotonic() - t0
    rd = RunDir(Path(env["LAUNCHER_HOME"]) / name)
    sup = psutil.Process(rd.supervisor_pid() or 0)
    time.sleep(2.5)  # let the first tree scan and start-up settle
    sup.cpu_percent(None)
    rss = []
    t_idle = time.monotonic()
    while time.monotonic() - t_idle < args.idle:
        time.sleep(1)
        rss.append(sup.memory_info().rss)
    idle_cpu = sup.cpu_percent(None)
    lease_gone, restart = [], []
    for k in range(args.kills):
        process = f"v-{k % args.workers + 1}"
        gone, back = asyncio.run(kill_and_time(etcd, name, process))
        lease_gone.append(gone)
        if back is not None:
            restart.append(back)
        asyncio.run(wait_registered(etcd, name, {f"v-{i + 1}" for i in range(args.workers)}))
    t0 = time.monotonic()
    launcher(["down", name], env, timeout=120)
    down_s = time.monotonic() - t0
    return {"backend": backend, "up_s": up_s, "idle_cpu": idle_cpu, "rss_mib": max(rss) / 2**20,
            "lease_gone": lease_gone, "restart": restart, "down_s": down_s}


def baseline_expiry(etcd: str, nats: str, fake_dir: Path, runs: int) -> list[float]:
    """The same worker with nobody watching: its key stays until etcd expires the lease."""
    out = []
    for k in range(runs):
        namespace = f"bench-baseline-{k}"
        env = {**os.environ, "PYTHONPATH": f"{fake_dir}{os.pathsep}{ROOT}", "FAKE_WORKER": "register",
               "ETCD_ENDPOINTS": etcd, "NATS_SERVER": nats, "LAUNCHER_NAMESPACE": namespace,
               "LAUNCHER_PROCESS": "v-1"}
        proc = subprocess.Popen([sys.executable, "-c", "pass"], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        asyncio.run(wait_registered(etcd, namespace, {"v-1"}))
        time.sleep(1.0 + k * 1.3)  # kill at different points of the keepalive cycle
        gone, _ = asyncio.run(kill_and_time(etcd, namespace, "v-1", back=False))
        out.append(gone)
        proc.wait()
        for child in psutil.process_iter(["environ"]):  # the fake's setsid child
            try:
                if (child.info["environ"] or {}).get("LAUNCHER_NAMESPACE") == namespace:
                    child.kill()
            except psutil.Error:
                pass
    return out


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle sampling")
    p.add_argument("--baseline-runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-supervisor-") as tmp:
        work = Path(tmp)
        (work / "fake").mkdir()
        (work / "fake" / "sitecustomize.py").write_text(FAKE_WORKER)
        etcd = f"http://127.0.0.1:{svc.free_port()}"
        nats = f"nats://127.0.0.1:{svc.free_port()}"
        started = [svc.start_etcd(etcd, work), svc.start_nats(nats, work)]
        socket = f"bench-supervisor-{svc.free_port()}"
        env = {"ETCD_ENDPOINTS": etcd, "NATS_SERVER": nats, "LAUNCHER_HOME": str(work / "home"), SOCKET_ENV: socket}
        try:
            results = [bench_backend(b, args, work, env, etcd) for b in ("subprocess", "tmux")]
            expiry = baseline_expiry(etcd, nats, work / "fake", args.baseline_runs)
        finally:
            subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
            svc.stop_services(started, grace=5)
    print(f"\nsupervisor benchmark: {args.workers} fake workers, {args.kills} kill -9 per backend, "
          f"{os.cpu_count()} CPUs, median (min, max)\n")
    rows = [
        ("death -> lease gone", *(ms(r["lease_gone"]) for r in results)),
        ("death -> registered again", *(ms(r["restart"]) for r in results)),
        (f"launcher up ({args.workers} workers)", *(f"{r['up_s']:.2f} s" for r in results)),
        (f"launcher down ({args.workers} workers)", *(f"{r['down_s']:.2f} s" for r in results)),
        (f"supervisor idle CPU ({args.idle:.0f} s)", *(f"{r['idle_cpu']:.1f} %" for r in results)),
        ("supervisor RSS", *(f"{r['rss_mib']:.0f} MiB" for r in results)),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':{width}}{'subprocess':<34}{'tmux':<34}")
    for label, a, b in rows:
        print(f"{label:{width}}{a:<34}{b:<34}")
    print(f"\nbaseline, nobody revokes (lease expires, TTL 10 s): death -> key gone {ms(expiry)}")
    for r in results:
        ratio = statistics.median(expiry) / statistics.median(r["lease_gone"])
        print(f"  {r['backend']}: the supervisor's revocation removes the key {ratio:.0f}x sooner than expiry")
    tmux_vs_sub = statistics.median(results[1]["restart"]) / statistics.median(results[0]["restart"])
    print(f"  restart latency tmux / subprocess: {tmux_vs_sub:.2f}x; "
          f"down tmux / subprocess: {results[1]['down_s'] / results[0]['down_s']:.2f}x")


if __name__ == "__main__":
    main()
