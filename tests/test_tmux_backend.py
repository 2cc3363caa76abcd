"""The tmux backend on a real tmux server (private socket): what a user sees with `tmux a -t NAME`.

No etcd and no vLLM here: the commands are tiny python one-liners, so every test takes well
under a second. The supervisor-level behaviour (restarts, readiness, down) is in
test_supervisor_e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from launcher import proctree
from launcher.backends.tmux import SOCKET_ENV, TmuxBackend, TmuxError, attach_argv, kill_sessions, sessions_of
from launcher.plan import ProcessSpec
from launcher.state import RunDir
from tests.helpers import wait_until


def tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True)


def py(name: str, code: str, env: dict[str, str] | None = None) -> ProcessSpec:
    return ProcessSpec(name=name, kind="monolith", argv=[sys.executable, "-c", code], env=env or {},
                       devices="-", tier=2)


@pytest.fixture()
def run_dir(tmp_path: Path) -> RunDir:
    rd = RunDir(tmp_path / "deployment")
    rd.create()
    return rd


@pytest.fixture()
def backend(run_dir: RunDir, tmux_socket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TmuxBackend]:
    monkeypatch.setenv(SOCKET_ENV, tmux_socket)
    b = TmuxBackend(run_dir)
    yield b
    for pid, created in list(b._pids.values()):
        if proctree.is_same_process(pid, created):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    b.close()


def test_the_pid_is_the_command_itself_with_its_env_and_quoted_args(backend: TmuxBackend, run_dir: RunDir) -> None:
    tricky = "it's \"quoted\" $HOME `x` ; a|b"
    code = ("import os, sys, time; print('env=' + os.environ['WORKER_SETTING'], 'arg=' + sys.argv[1], "
            "'pid=' + str(os.getpid()), flush=True); time.sleep(60)")
    spec = ProcessSpec(name="v-1", kind="monolith", argv=[sys.executable, "-c", code, tricky],
                       env={"WORKER_SETTING": "a b'c"}, devices="-", tier=2)
    pid = backend.start(spec, run_dir.log_path("v-1"))
    proc = psutil.Process(pid)
    # Same pid from the pane's first program to the worker: the launch script execs it.
    wait_until(lambda: proc.cmdline() == spec.argv)
    assert proc.pid == pid and proc.cmdline() == spec.argv, "the pane must exec the command, not wrap it"
    log = run_dir.log_path("v-1")
    text = str(wait_until(lambda: log.exists() and "pid=" in log.read_text() and log.read_text()))
    assert f"env=a b'c arg={tricky} pid={pid}" in text
    assert proc.cwd() == os.getcwd()
    assert backend.poll("v-1") is None


def test_exit_code_and_signal_come_from_the_dead_pane(backend: TmuxBackend, run_dir: RunDir) -> None:
    backend.start(py("crash", "print('boom: no such model', flush=True); raise SystemExit(3)"),
                  run_dir.log_path("crash"))
    backend.start(py("killed", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), run_dir.log_path("killed"))
    assert wait_until(lambda: backend.poll("crash") is not None) and backend.poll("crash") == 3
    assert wait_until(lambda: backend.poll("killed") is not None) and backend.poll("killed") == -signal.SIGKILL
    # A process that dies in its first millisecond still leaves its output in the log and on screen.
    assert "boom: no such model" in run_dir.log_path("crash").read_text()
    # What `tmux a -t crash` shows, scrollback included (tmux may scroll the last screen up when
    # it prints "Pane is dead").
    screen = tmux(backend.socket_name or "", "capture-pane", "-p", "-S", "-", "-t", "=crash:").stdout
    assert "boom: no such model" in screen
    assert sessions_of(run_dir) == ["crash", "killed"], "a dead pane stays until restart or down"


def test_restart_replaces_the_dead_session_and_appends_to_the_log(backend: TmuxBackend, run_dir: RunDir) -> None:
    log = run_dir.log_path("w")
    first = backend.start(py("w", "print('first run', flush=True); raise SystemExit(1)"), log)
    wait_until(lambda: backend.poll("w") is not None)
    second = backend.start(py("w", "import time; print('second run', flush=True); time.sleep(60)"), log)
    assert second != first
    wait_until(lambda: "second run" in log.read_text())
    assert log.read_text().index("first run") < log.read_text().index("second run")
    assert backend.poll("w") is None
    assert sessions_of(run_dir) == ["w"]


def test_a_crash_loop_on_its_own_tmux_server_restarts_every_time(backend: TmuxBackend, run_dir: RunDir) -> None:
    """The dead session is the server's only one: killing it before making the next ended the server, and
    the next new-session raced its exit ("server exited unexpectedly"; seen in a full test run as a
    crash-looping worker marked `could not start`). The new session now exists before the old goes. The race
    shows only on a loaded machine (the old code passes this quietly): this holds the swap to one session
    under its own name after every restart, and a restart after each of many crashes."""
    log = run_dir.log_path("w")
    pids = []
    for i in range(12):
        pids.append(backend.start(py("w", f"print('run {i}', flush=True); raise SystemExit(3)"), log))
        assert wait_until(lambda: backend.poll("w") is not None) and backend.poll("w") == 3
        assert sessions_of(run_dir) == ["w"], "one session, under its own name, after each restart"
    assert len(set(pids)) == 12
    assert "run 11" in log.read_text()


def test_session_names_match_exactly_and_dots_become_underscores(backend: TmuxBackend, run_dir: RunDir) -> None:
    sleeper = "import time; time.sleep(60)"
    backend.start(py("v-10", sleeper), run_dir.log_path("v-10"))
    backend.start(py("v-1", "raise SystemExit(5)"), run_dir.log_path("v-1"))
    backend.start(py("worker.a", sleeper), run_dir.log_path("worker.a"))
    assert wait_until(lambda: backend.poll("v-1") is not None) and backend.poll("v-1") == 5
    assert backend.poll("v-10") is None, "v-1's status must not be read from v-10"
    assert sessions_of(run_dir) == ["v-1", "v-10", "worker_a"]


def test_a_strangers_live_session_is_never_killed(backend: TmuxBackend, run_dir: RunDir, tmux_socket: str) -> None:
    tmux(tmux_socket, "new-session", "-d", "-s", "v-1", "sleep 60")
    with pytest.raises(TmuxError, match="already exists"):
        backend.start(py("v-1", "pass"), run_dir.log_path("v-1"))
    backend.start(py("v-2", "import time; time.sleep(60)"), run_dir.log_path("v-2"))
    assert kill_sessions(run_dir) == ["v-2"]
    assert tmux(tmux_socket, "has-session", "-t", "=v-1:").returncode == 0


def test_socket_is_recorded_for_other_shells(backend: TmuxBackend, run_dir: RunDir, tmux_socket: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    backend.start(py("v-1", "import time; time.sleep(60)"), run_dir.log_path("v-1"))
    monkeypatch.delenv(SOCKET_ENV)  # another shell: only the run dir knows the socket
    monkeypatch.delenv("TMUX", raising=False)
    assert sessions_of(run_dir) == ["v-1"]
    assert attach_argv(run_dir, "v-1") == ["tmux", "-L", tmux_socket, "attach-session", "-t", "=v-1:"]
    assert kill_sessions(run_dir) == ["v-1"]
    assert sessions_of(run_dir) == []


def test_close_removes_every_session(backend: TmuxBackend, run_dir: RunDir) -> None:
    backend.start(py("a", "raise SystemExit(0)"), run_dir.log_path("a"))
    pid = backend.start(py("b", "import time; time.sleep(60)"), run_dir.log_path("b"))
    psutil.Process(pid).kill()
    wait_until(lambda: backend.poll("b") is not None)
    backend.close()
    assert sessions_of(run_dir) == []
