"""A process's identity (pid + start time) survives a step of the wall clock.

psutil's create_time() is boot time + the start offset, and the kernel moves "boot time" when the wall
clock is stepped: seen on this machine, a 20 s step made a live supervisor look like a reused pid, so
`down` found "no supervisor" and left its processes running. proctree.create_time is time since boot.
"""

from __future__ import annotations

import os
import subprocess
import sys

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
