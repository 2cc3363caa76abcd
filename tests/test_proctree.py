"""A process's identity (pid + start time) survives a step of the wall clock.

psutil's create_time() is boot time + the start offset, and the kernel moves "boot time" when the wall
clock is stepped: seen on this machine, a 20 s step made a live supervisor look like a reused pid, so
`down` found "no supervisor" and left its processes running. proctree.create_time is time since boot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from launcher import proctree


def test_start_time_is_time_since_boot_and_identifies_the_process() -> None:
    me = os.getpid()
    started = proctree.create_time(me)
    assert started is not None
    assert abs(started - (psutil.Process(me).create_time() - psutil.boot_time())) < 2
    assert proctree.is_same_process(me, started)
    assert not proctree.is_same_process(me, started - 5)  # another process that had this pid before
    assert proctree.owns_pid(me, started) and not proctree.owns_pid(me, started + 5)


def test_a_wall_clock_time_recorded_by_an_older_launcher_still_identifies_the_process() -> None:
    me = os.getpid()
    assert proctree.is_same_process(me, psutil.Process(me).create_time())


def test_a_process_that_ended_is_not_the_same_and_has_no_start_time() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = proctree.create_time(child.pid)
    child.wait()
    assert proctree.create_time(child.pid) is None
    assert not proctree.is_same_process(child.pid, started)


# A process that blocks SIGTERM (so one sent to it stays pending, visible in /proc) and prints its pid; with
# "spawn", it first starts a child of the same kind and prints that one's pid too.
BLOCKER = """
import os, signal, subprocess, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
if sys.argv[1] == "spawn":
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "leaf"], stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)
print(os.getpid(), flush=True)
time.sleep(120)
"""


def _sigterm_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(m & (1 << (signal.SIGTERM - 1)) for m in masks)


def test_sigterm_asks_the_root_only_and_sigkill_takes_the_whole_tree() -> None:
    """A worker drains on SIGTERM and then stops its own EngineCore: the EngineCore must not get SIGTERM
    itself (it would exit at once and fail the requests being drained), and the worker must get one, not
    one per way it is reachable (group + member: its second SIGTERM means "stop draining now")."""
    root = subprocess.Popen([sys.executable, "-c", BLOCKER, "spawn", BLOCKER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        child_pid = int(root.stdout.readline())  # type: ignore[union-attr]
        assert int(root.stdout.readline()) == root.pid  # type: ignore[union-attr]
        assert [p.pid for p in proctree.tree(root.pid)] == [root.pid, child_pid]
        proctree.signal_tree(root.pid, signal.SIGTERM, create_time=proctree.create_time(root.pid))
        assert _sigterm_pending(root.pid), "the root was asked to stop"
        assert not _sigterm_pending(child_pid), "its child was left to the root"
        proctree.signal_tree(root.pid, signal.SIGKILL)
        assert proctree.wait_gone([psutil.Process(child_pid)], timeout=10) == []
    finally:
        root.kill()
        root.wait()


def test_sigterm_reaches_an_orphan_whose_parent_died() -> None:
    """An EngineCore left behind by a killed worker has nobody to stop it but us: it is a root now."""
    orphan = subprocess.Popen([sys.executable, "-c", BLOCKER, "leaf"], stdout=subprocess.PIPE, text=True)
    try:
        int(orphan.stdout.readline())  # type: ignore[union-attr]
        assert proctree.roots([psutil.Process(orphan.pid)]) == [psutil.Process(orphan.pid)]
        proctree.signal_tree(None, signal.SIGTERM, extra=[psutil.Process(orphan.pid)])
        assert _sigterm_pending(orphan.pid)
    finally:
        orphan.kill()
        orphan.wait()
