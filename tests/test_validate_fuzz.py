"""`launcher validate` on mutated shipped topologies: an answer every time, never a crash or a hang.

Each example takes one file of topologies/, mutates it the ways people and hostile inputs do (types
changed, keys deleted or duplicated, random bytes, control characters, aliases, tags, truncation)
and runs the CLI in-process. Whatever comes in, `validate` must exit 0 or 2, print no traceback,
put file:line:col in front of every error, end errors with the footer, and stay within 2 s and
200 MB per file. The time and memory bounds are not speed claims: they are generous limits that
only an unbounded expansion (an alias bomb, a huge range) or a hang would cross. The 2 s is CPU
time of this process (an expansion burns CPU), so that other jobs on a loaded 2-core machine do not
make it flaky; a blocked hang is caught by a 10 s wall-clock bound. A typical example takes ~10 ms.
"""

from __future__ import annotations

import contextlib
import io
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher import cli, engine_flags

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {p.name: p.read_text() for p in sorted((ROOT / "topologies").glob("*.yaml"))}
MAX_CPU_SECONDS = 2.0
MAX_WALL_SECONDS = 10.0
MAX_GROWTH_KB = 200 * 1024  # ru_maxrss is in KiB on Linux
ERROR_LINE = re.compile(r"^error (?P<file>.+?):(?P<line>\d+):(?P<col>\d+): \S")
FOOTER = re.compile(r"^(?P<n>\d+) problem\(s\) in (?P<file>.+); nothing was started$")


@pytest.fixture(scope="module", autouse=True)
def _warm_flag_table() -> None:
    """Build vLLM's flag table (seconds, once) before the bounded examples, or learn there is none."""
    with contextlib.suppress(engine_flags.TableUnavailable):
        engine_flags.load_table()


def run_validate(path: Path) -> tuple[int, str, tuple[float, float], int]:
    """(exit code, stdout+stderr, (CPU s, wall s), growth of peak RSS in KiB) of `launcher validate PATH`."""
    out, err = io.StringIO(), io.StringIO()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["validate", str(path)])
        except SystemExit as exc:
            code = exc.code
    seconds = (time.process_time() - cpu_start, time.perf_counter() - start)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return int(code or 0), out.getvalue() + err.getvalue(), seconds, growth


def assert_well_behaved(path: Path, code: int, output: str, seconds: tuple[float, float], growth: int) -> None:
    assert code in (0, 2), output
    assert "Traceback" not in output, output
    cpu, wall = seconds
    assert cpu < MAX_CPU_SECONDS and wall < MAX_WALL_SECONDS, f"{cpu:.2f} s CPU, {wall:.2f} s wall"
    assert growth < MAX_GROWTH_KB, f"peak RSS grew {growth} KiB"
    lines = [ln for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error ")]
    for line in errors:
        m = ERROR_LINE.match(line)
        assert m and m["file"] == str(path), f"no file:line:col in {line!r}"
    if code == 2:
        footer = FOOTER.match(lines[-1])
        assert footer and int(footer["n"]) == len(errors) >= 1, output
    else:
        assert not errors and lines[-1].startswith("ok "), output


# --- mutations ----------------------------------------------------------------------------

SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 1, 2, 65536, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=20), st.sampled_from(["0-999999999", "0|1", "nats://u:p@h:1", "http://[::1]:0", "2k", "x"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=3), max_leaves=6)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _structural(data: st.DataObject, text: str) -> str:
    """Change a value's type, delete a key, or rename one, on the parsed document; dump it again."""
    doc = yaml.safe_load(text)
    path = data.draw(st.sampled_from(_paths(doc)))
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    op = data.draw(st.sampled_from(["replace", "delete", "rename"]))
    last = path[-1]
    if op == "replace":
        parent[last] = data.draw(VALUES)
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=12) | st.sampled_from(["kind", "engine", "gpus", "kv_port"]))] = (
            parent.pop(last))
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _insert(data: st.DataObject, text: str, piece: str) -> str:
    at = data.draw(st.integers(0, len(text)))
    return text[:at] + piece + text[at:]


def _line_op(data: st.DataObject, text: str, op: Callable[[str], str]) -> str:
    lines = text.splitlines(keepends=True)
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = op(lines[i])
    return "".join(lines)


ALIAS_PIECES = ["&a [*a]", "*nowhere", "&x {a: 1}", "{<<: *x}", "&e {max-model-len: 1}",
                "\nz: &b [x, x, x, x, x, x, x, x, x]\ny: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
                "w: &d [*c, *c, *c, *c, *c, *c, *c, *c]\nv: [*d, *d, *d, *d, *d, *d, *d, *d]\n"]
TAG_PIECES = ["!foo ", "!!python/object:os.system ", "!!binary ", "! ", "!!str ", "!!int ", "!!timestamp "]


def mutate(data: st.DataObject, text: str) -> bytes:
    kind = data.draw(st.sampled_from(["structural", "duplicate", "bytes", "control", "alias", "tag", "truncate",
                                      "indent", "non-scalar key"]))
    if kind == "structural":
        return _structural(data, text).encode()
    if kind == "duplicate":
        return _line_op(data, text, lambda line: line + line).encode()
    if kind == "bytes":
        raw = text.encode()
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if kind == "control":
        char = chr(data.draw(st.sampled_from([*range(0, 9), 11, 12, *range(14, 32), 127, 133, 0xFEFF])))
        return _insert(data, text, char).encode()
    if kind == "alias":
        piece = data.draw(st.sampled_from(ALIAS_PIECES))
        return _line_op(data, text, lambda line: line.rstrip("\n") + " " + piece + "\n").encode()
    if kind == "tag":
        piece = data.draw(st.sampled_from(TAG_PIECES))
        return _line_op(data, text, lambda line: re.sub(r"(:\s+|-\s+)", lambda m: m.group() + piece, line, count=1)
                        ).encode()
    if kind == "indent":
        return _line_op(data, text, lambda line: " " * data.draw(st.integers(0, 6)) + line.lstrip(" ")).encode()
    if kind == "non-scalar key":
        return _line_op(data, text, lambda line: re.sub(r"^(\s*)([A-Za-z_-]+):", r"\1? [\2]\n\1:", line, count=1)
                        ).encode()
    return text.encode()[: data.draw(st.integers(0, len(text)))]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_topologies_get_an_answer_not_a_crash(tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(SHIPPED)))
    path = tmp_path / name
    path.write_bytes(mutate(data, SHIPPED[name]))
    assert_well_behaved(path, *run_validate(path))


def test_every_shipped_topology_validates(tmp_path: Path) -> None:
    for name, text in SHIPPED.items():
        path = tmp_path / name
        path.write_text(text)
        code, output, seconds, growth = run_validate(path)
        assert code == 0, output
        assert_well_behaved(path, code, output, seconds, growth)
