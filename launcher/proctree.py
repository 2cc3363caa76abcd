"""Stop a process and everything it spawned, leaving nothing that holds a GPU.

vLLM's EngineCore and tensor-parallel workers are children that outlive a killed parent, so the
tree is taken (psutil) *before* the first signal, and each member is waited for individually.
`signal_tree` only signals (the supervisor's loop checks on later ticks that the tree is gone);
`stop_tree` signals and waits, for callers that may block (`launcher down`'s sweep, tools).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pids(pid: int) -> list[int]:
    return [p.pid for p in tree(pid)]


def create_time(pid: int) -> float | None:
    """When `pid` started: seconds since boot on Linux (/proc/<pid>/stat, field 22), else psutil's.

    Why not psutil's `create_time()`: it is boot time + that offset, and the kernel moves "boot time"
    whenever the wall clock is stepped (NTP, a resumed VM). Seen here: a step of 20 s made a live
    supervisor look like a reused pid, so `down` and `restart` said "not running" and left its
    processes behind. Time since boot never moves."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19]) / _CLOCK_TICKS
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):  # no /proc (not Linux)
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None


def cpu(pid: int) -> tuple[str, float] | None:
    """(state letter, user + system CPU seconds) from /proc/<pid>/stat; None when it is gone (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        return fields[0].decode(), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def _same_start(pid: int, recorded: float) -> bool:
    """Whether `pid` started when `recorded` says. A recorded wall-clock time (> 1e9 s: written by an
    older launcher, or without /proc) is compared with psutil's, a time since boot with ours."""
    now = psutil.Process(pid).create_time() if recorded > 1e9 else create_time(pid)
    return now is not None and abs(now - recorded) <= 1.0


def is_same_process(pid: int, create_time: float | None) -> bool:
    """Guards against pid reuse: a recorded pid is ours only if its start time matches too."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and not _same_start(pid, create_time):
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; returns those still running at the timeout.

    Unlike psutil.wait_procs, a zombie counts as gone: a re-parented child is reaped by pid 1,
    which in some containers takes seconds, and that wait would delay lease revocation and `down`.
    """
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    delay = 0.002
    while alive and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
        alive = [p for p in alive if _running(p)]
    return alive


def owns_pid(pid: int, create_time: float | None) -> bool:
    """False only when `pid` now names a *different* process (reused after ours died).

    A pid that no longer exists is still "ours" for process-group signalling: the kernel does not
    hand out a pid while a process group of that id survives, so group `pid` can only be the
    remnant of our own tree (an EngineCore whose parent died).
    """
    if create_time is None:
        return True
    try:
        return _same_start(pid, create_time)
    except psutil.NoSuchProcess:
        return True


def _members(pid: int | None, extra: list[psutil.Process] | None, create_time: float | None
             ) -> tuple[bool, list[psutil.Process]]:
    """Whether `pid` (and so its process group) is still ours, and the live members to signal."""
    ours = pid is not None and owns_pid(pid, create_time)
    members = (tree(pid) if ours and pid is not None else []) + [p for p in extra or [] if p.pid != pid or ours]
    # A zombie is already dead; waiting on one whose parent (a tmux server) never reaps it would
    # only burn the grace period.
    return ours, [p for p in members if not _is_zombie(p)]


def roots(members: list[psutil.Process]) -> list[psutil.Process]:
    """The members whose parent is not a member: the process itself, and children orphaned by a dead parent."""
    pids = {p.pid for p in members}
    out = []
    for proc in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.ppid() not in pids:
                out.append(proc)
    return out


def _send(pid: int | None, ours: bool, members: list[psutil.Process], sig: signal.Signals) -> None:
    """SIGTERM asks once, and only the roots: a worker drains and then stops its own EngineCore, and a
    second SIGTERM means "stop draining now" to it (as to most servers), while an EngineCore that gets
    SIGTERM itself exits at once and fails the requests its worker is draining. Any other signal (SIGKILL)
    goes to the whole process group and every member."""
    if sig == signal.SIGTERM:
        for proc in roots(members):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        return
    if ours and pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    for proc in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def signal_tree(pid: int | None, sig: signal.Signals, extra: list[psutil.Process] | None = None,
                create_time: float | None = None) -> list[int]:
    """Send `sig` to the process group of `pid`, every member of its tree and `extra` (SIGTERM: to the roots
    among them only, see `_send`); wait for nothing.

    The supervisor's loop uses this and checks on later ticks whether the tree is gone. Returns the
    pids signalled. `pid` None (never started, or its start failed): only `extra`.
    """
    ours, members = _members(pid, extra, create_time)
    _send(pid, ours, members, sig)
    return [p.pid for p in members]


def stop_tree(pid: int, grace: float = 10.0, extra: list[psutil.Process] | None = None,
              create_time: float | None = None) -> list[int]:
    """SIGTERM the tree's roots, wait `grace`, SIGKILL the process group and every member left, wait them out.

    Blocking: for `down`'s sweep of leftovers and for tools, never for the supervisor's loop.
    Returns the pids that were part of the tree. `extra` adds processes known from earlier
    snapshots (children that already re-parented away from the root). With `create_time`, a pid
    that has since been reused by another process is left alone (only `extra` is stopped).
    """
    ours, members = _members(pid, extra, create_time)
    if not members:
        return []
    _send(pid, ours, members, signal.SIGTERM)
    alive = wait_gone(members, timeout=grace)
    if alive:
        _send(pid, ours, alive, signal.SIGKILL)
        wait_gone(alive, timeout=10)
    return [p.pid for p in members]


def tree_usage(pid: int) -> tuple[float, int]:
    """CPU percent (since the last call for these processes) and RSS bytes of the whole tree."""
    cpu = 0.0
    rss = 0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            cpu += proc.cpu_percent(interval=None)
            rss += proc.memory_info().rss
    return cpu, rss
