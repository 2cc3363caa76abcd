"""Each process in its own tmux session, named after the process: `tmux a -t v-1`, as kv-router-run.sh users do.

Why tmux at all: a developer wants to *watch* a worker live (progress bars, tracebacks) and to
find a crashed one's last screen, not only a log file. So:

- one session per process, session name = process name (tmux turns `.` and `:` into `_`);
- every pane's output is also appended to the process's log file (`pipe-pane`), so `launcher
  logs`, `status` and the supervisor's log tail work exactly as with the subprocess backend;
- `remain-on-exit` keeps a dead pane readable until the supervisor restarts it (it kills the dead
  session and starts a fresh one) or `down` removes every session;
- the pane runs `exec` all the way down, so the pane's pid *is* the worker's python process, the
  one that registers in etcd (readiness matches the registration's pid).

A per-process launch script (run dir `tmux/<name>.sh`, mode 0700) carries the environment and the
shell-quoted argv: the pane starts on a tmux server whose global environment may be a different
shell's, so the script exports the supervisor's environment plus the process's own, exactly what
the subprocess backend gives a child. Before it execs the worker, the script waits on a tmux
`wait-for` channel that the backend signals only after `remain-on-exit` and `pipe-pane` are set:
a worker that crashes in its first millisecond still leaves its exit status and its output.

Every tmux call is a subprocess with a timeout (TMUX_TIMEOUT): the supervisor calls these from a
worker thread, and a wedged tmux server must cost it a TmuxError, never a hang.

The socket: the default tmux server, unless LAUNCHER_TMUX_SOCKET names a private one (tests do).
The choice is recorded in the run dir (`tmux.json`) so `status`, `attach` and `down` from another
shell talk to the same server. Sessions carry the run dir in a user option (`@launcher_run_dir`),
so `down` never kills a session that belongs to someone else on a shared server.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from launcher import proctree
from launcher.plan import ProcessSpec
from launcher.state import RunDir, read_json, write_json

SOCKET_ENV = "LAUNCHER_TMUX_SOCKET"
OWNER_OPTION = "@launcher_run_dir"
# Variables that describe the *caller's* tmux client; the pane gets its own from tmux.
_NOT_EXPORTED = {"TMUX", "TMUX_PANE"}
# pane_dead without a status or a signal: tmux lost it (should not happen behind the gate).
UNKNOWN_EXIT = 1
# The session vanished under a live supervisor (someone ran kill-session): tmux sent SIGHUP.
SESSION_GONE_EXIT = -1
# Seconds to wait for tmux to record the exit status of a pane whose process has gone.
STATUS_WAIT = 3.0
# Seconds any one tmux command may take (they take milliseconds; a wedged server must not hang us).
TMUX_TIMEOUT = 5.0


class TmuxError(RuntimeError):
    pass


def session_name(process: str) -> str:
    """tmux forbids `.` and `:` in session names (it would rewrite them); do it visibly here."""
    return process.replace(".", "_").replace(":", "_")


def _target(process: str) -> str:
    """`=` asks tmux for an exact match (`v-1` must never pick `v-10`); the `:` makes it a valid
    session, window and pane target alike (set-option and pipe-pane take pane targets)."""
    return f"={session_name(process)}:"


def _config_file(run_dir: RunDir) -> Path:
    return run_dir.path / "tmux.json"


def recorded_socket(run_dir: RunDir) -> str | None:
    """The socket name the deployment's supervisor used (None: the default tmux server)."""
    info = read_json(_config_file(run_dir))
    if isinstance(info, dict) and "socket_name" in info:
        name = info["socket_name"]
        return str(name) if name else None
    return os.environ.get(SOCKET_ENV) or None


class TmuxServer:
    """One tmux server (default, or `-L socket_name`); each command bounded by TMUX_TIMEOUT."""

    def __init__(self, socket_name: str | None, tmux_bin: str) -> None:
        self.socket_name = socket_name
        self.tmux_bin = tmux_bin

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [self.tmux_bin, *(["-L", self.socket_name] if self.socket_name else []), *args]
        try:
            return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=TMUX_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TmuxError(f"tmux {args[0]} did not answer within {TMUX_TIMEOUT:.0f} s "
                            "(is the tmux server wedged? `tmux kill-server` ends it)") from None


def _server(socket_name: str | None) -> TmuxServer:
    tmux_bin = shutil.which("tmux")
    if tmux_bin is None:
        raise TmuxError("backend tmux needs the `tmux` program (apt-get install tmux), or use backend: subprocess")
    return TmuxServer(socket_name, tmux_bin)


def _cmd(server: TmuxServer, *args: str) -> list[str]:
    proc = server.run(*args)
    if proc.returncode != 0 or proc.stderr.strip():
        raise TmuxError(f"tmux {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.splitlines()


def _sessions(server: TmuxServer) -> dict[str, dict[str, str]]:
    """session name -> its first pane's facts. One tmux call; {} when no server runs."""
    fmt = "\t".join(["#{session_name}", "#{pane_pid}", "#{pane_dead}", "#{pane_dead_status}",
                     "#{pane_dead_signal}", "#{" + OWNER_OPTION + "}"])
    proc = server.run("list-panes", "-a", "-F", fmt)
    out: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 6:
            continue
        name, pid, dead, status, sig, owner = parts
        out.setdefault(name, {"pid": pid, "dead": dead, "status": status, "signal": sig, "owner": owner})
    return out


def launch_script(spec: ProcessSpec, tmux_bin: str, channel: str, environ: dict[str, str]) -> str:
    """The pane's program: wait for the gate, export the environment, exec the argv (all quoted)."""
    env = {k: v for k, v in environ.items() if k not in _NOT_EXPORTED and k.isidentifier()}
    env.update(spec.env)
    lines = [
        "#!/bin/sh",
        f"# written by launcher for process {spec.name}: this is exactly what runs in tmux session "
        f"{session_name(spec.name)}",
        "# hold until the launcher has set remain-on-exit and pipe-pane (see launcher/backends/tmux.py)",
        f"{shlex.quote(tmux_bin)} wait-for {shlex.quote(channel)}",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append("exec " + " ".join(shlex.quote(a) for a in spec.argv))
    return "\n".join(lines) + "\n"


def zombie_exit_code(pid: int, created: float | None) -> int | None:
    """The exit status of our process while it is a zombie, from /proc (field 52, waitpid form).

    Needed because tmux 3.3a sometimes misses the SIGCHLD of the first pane of a server it has just
    started: the pane is shown dead, without a status, and its process stays a zombie for good.
    """
    try:
        if created is not None and not proctree.owns_pid(pid, created):
            return None
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, psutil.Error):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    if not fields or fields[0] != "Z" or len(fields) < 50:
        return None
    raw = int(fields[49])
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


class TmuxBackend:
    """The `Backend` protocol over tmux sessions; see the module docstring for why it is shaped so."""

    def __init__(self, run_dir: RunDir, socket_name: str | None = None) -> None:
        self.run_dir = run_dir
        self.socket_name = socket_name if socket_name is not None else (os.environ.get(SOCKET_ENV) or None)
        self.server = _server(self.socket_name)
        self.tmux_bin = self.server.tmux_bin
        self.owner = str(run_dir.path.resolve())
        self.scripts = run_dir.path / "tmux"
        self._pids: dict[str, tuple[int, float | None]] = {}
        self._dead_since: dict[str, float] = {}
        run_dir.create()
        write_json(_config_file(run_dir), {"socket_name": self.socket_name, "tmux": self.tmux_bin})

    def start(self, spec: ProcessSpec, log: Path) -> int:
        name = session_name(spec.name)
        replacing = self._own_session_exists(spec.name)
        # A restart makes the new session before it removes the last run's (under a passing name, then
        # renamed): were that dead session the server's only one, killing it first ends the tmux server,
        # and a new-session racing its exit fails ("server exited unexpectedly": a crash-looping worker then
        # ended `failed: could not start` instead of being restarted).
        session = f"{name}-next-{uuid.uuid4().hex[:8]}" if replacing else name
        target = f"={session}:"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.scripts.mkdir(mode=0o700, parents=True, exist_ok=True)
        script = self.scripts / f"{name}.sh"
        channel = f"launcher-go-{uuid.uuid4().hex}"
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(launch_script(spec, self.tmux_bin, channel, dict(os.environ)))
        os.chmod(script, 0o700)
        # The supervisor's working directory, as the subprocess backend gives (a tmux server started
        # elsewhere would otherwise put the pane in its own).
        _cmd(self.server, "new-session", "-d", "-s", session, "-n", name, "-x", "200", "-y", "50",
             "-c", os.getcwd(), f"exec /bin/sh {shlex.quote(str(script))}")
        try:
            _cmd(self.server, "set-option", "-t", target, OWNER_OPTION, self.owner)
            _cmd(self.server, "set-option", "-w", "-t", target, "remain-on-exit", "on")
            _cmd(self.server, "pipe-pane", "-t", target, f"cat >> {shlex.quote(str(log))}")
            pid = int(_cmd(self.server, "display-message", "-p", "-t", target, "#{pane_pid}")[0])
            if replacing:
                _cmd(self.server, "kill-session", "-t", _target(spec.name))
                _cmd(self.server, "rename-session", "-t", target, name)
        except Exception:
            self.server.run("kill-session", "-t", target)
            raise
        finally:
            # Open the gate even on failure, so the script never waits forever.
            self.server.run("wait-for", "-S", channel)
        self._pids[spec.name] = (pid, proctree.create_time(pid))
        self._dead_since.pop(spec.name, None)
        return pid

    def _own_session_exists(self, process: str) -> bool:
        """Whether this process's last run left its session (ours to replace); refuse to touch anyone
        else's (even a dead pane: it may be another deployment's crash that someone wants to read)."""
        facts = _sessions(self.server).get(session_name(process))
        if facts is None:
            return False
        if facts["owner"] != self.owner:
            where = f"tmux server '{self.socket_name}'" if self.socket_name else "the default tmux server"
            state = "dead" if facts["dead"] == "1" else "live"
            raise TmuxError(f"a {state} tmux session named '{session_name(process)}' already exists on {where} "
                            f"and is not part of this deployment ({facts['owner'] or 'not started by launcher'}); "
                            "stop it (`launcher down` its deployment, or `tmux kill-session`) or rename the process")
        return True

    def poll(self, name: str) -> int | None:
        """Cheap while the pid lives (psutil, no tmux call); once it is gone, tmux has its exit status.

        The supervisor is not the pane's parent (the tmux server is, and reaps it), hence the
        status comes from `pane_dead_status` / `pane_dead_signal` of the pane kept by remain-on-exit.
        """
        known = self._pids.get(name)
        if known is None:
            return None
        pid, created = known
        if proctree.is_same_process(pid, created):
            return None
        code = zombie_exit_code(pid, created)
        if code is not None:
            return code
        facts = _sessions(self.server).get(session_name(name))
        if facts is None or facts["pid"] != str(pid):
            return SESSION_GONE_EXIT
        if facts["status"]:
            return int(facts["status"])
        if facts["signal"]:
            return -int(facts["signal"])
        # tmux marks a pane dead when its pty closes, and records the status only when it handles
        # SIGCHLD, a moment later: ask again next tick, but do not wait for a status forever.
        first = self._dead_since.setdefault(name, time.monotonic())
        return UNKNOWN_EXIT if time.monotonic() - first > STATUS_WAIT else None

    def close(self) -> None:
        """The supervisor has stopped every process: remove our sessions (dead panes) too."""
        kill_sessions(self.run_dir, self.socket_name)
        self._pids.clear()


def kill_sessions(run_dir: RunDir, socket_name: str | None = None) -> list[str]:
    """Kill every tmux session of this deployment (by owner tag); returns their names.

    tmux sends SIGHUP to a killed pane; `down` has already stopped the process trees, so this only
    clears what is left (dead panes, or a pane whose supervisor crashed).
    """
    socket = socket_name if socket_name is not None else recorded_socket(run_dir)
    try:
        server = _server(socket)
    except TmuxError:
        return []
    owner = str(run_dir.path.resolve())
    killed = []
    for name, facts in _sessions(server).items():
        if facts["owner"] == owner:
            server.run("kill-session", "-t", f"={name}:")
            killed.append(name)
    return killed


def sessions_of(run_dir: RunDir) -> list[str]:
    """Names of the live tmux sessions that belong to this deployment (for status and tests)."""
    try:
        server = _server(recorded_socket(run_dir))
    except TmuxError:
        return []
    owner = str(run_dir.path.resolve())
    return sorted(name for name, facts in _sessions(server).items() if facts["owner"] == owner)


def attach_argv(run_dir: RunDir, process: str) -> list[str]:
    """argv for os.execvp("tmux", ...): attach to the process's session on the recorded server.

    Inside tmux already (same default server), switch the client instead of nesting.
    """
    socket = recorded_socket(run_dir)
    base = ["tmux"] + (["-L", socket] if socket else [])
    if os.environ.get("TMUX") and not socket:
        return [*base, "switch-client", "-t", _target(process)]
    return [*base, "attach-session", "-t", _target(process)]


def describe(run_dir: RunDir) -> dict[str, Any]:
    """What `tmux.json` says, for humans: the socket and how to attach."""
    socket = recorded_socket(run_dir)
    return {"socket_name": socket, "attach": "tmux " + (f"-L {socket} " if socket else "") + "a -t NAME"}
