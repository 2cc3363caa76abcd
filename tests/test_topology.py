"""Schema errors a user makes, and what the launcher must say about them (file, line, field, fix)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.topology import TopologyError, load_topology

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topo.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(TopologyError) as info:
        load_topology(write(tmp_path, text))
    return info.value.problems


def test_every_shipped_topology_loads() -> None:
    for path in sorted((ROOT / "topologies").glob("*.yaml")):
        topo, _ = load_topology(path)
        assert topo.workers, path


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """\
name: t
model: m
workers:
  - name: w
    tensor_parallel_size: 2
""")
    assert len(problems) == 1
    assert f"{tmp_path / 'topo.yaml'}:5:5" in problems[0]
    assert "workers[0].tensor_parallel_size" in problems[0]
    assert "unknown key 'tensor_parallel_size'" in problems[0]


def test_wrong_type_points_at_the_value_line(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """\
name: t
model: m
workers:
  - name: a
  - name: b
    gpus: [0, x]
""")
    assert any(":6:" in p and "workers[1].gpus[1]" in p for p in problems), problems


def test_missing_required_key(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "name: t\nworkers:\n  - name: w\n")
    assert any("required key 'model' is missing" in p for p in problems)


def test_bad_enum_lists_choices(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "name: t\nmodel: m\nworkers:\n  - name: w\n    kind: prefil\n")
    assert ":5:" in problems[0] and "'monolith'" in problems[0] and "'prefill'" in problems[0]


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "name: t\nmodel: [unclosed\nworkers: []\n")
    assert "invalid YAML" in problems[0]
    assert f"{tmp_path / 'topo.yaml'}:" in problems[0]


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping" in problems_of(tmp_path, "- a\n- b\n")[0]


def test_relative_model_path_is_resolved_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    sub = tmp_path / "topos"
    sub.mkdir()
    path = sub / "t.yaml"
    path.write_text("name: t\nmodel: ../models/m\nworkers:\n  - name: w\n")
    topo, _ = load_topology(path)
    assert topo.model == str((tmp_path / "models" / "m").resolve())


def test_cli_validate_prints_errors_not_tracebacks(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nmodel: m\nworkers:\n  - name: w\n    gpuz: [0]\n")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}:5:5" in proc.stderr and "gpuz" in proc.stderr


def test_cli_validate_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "validate", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr



def test_drain_timeout_and_migration_limit_are_bounded(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "name: t\nmodel: m\nworkers: [{name: w, drain_timeout: 0}]\n"
                                     "frontends: [{name: f, migration_limit: -1}]\n")
    assert len(problems) == 2
    assert "workers[0].drain_timeout: Input should be greater than 0, not 0" in problems[0]
    assert "frontends[0].migration_limit: Input should be greater than or equal to 0, not -1" in problems[1]


def test_frontend_processes_are_1_to_64_or_auto(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "name: t\nmodel: m\nworkers: [{name: w}]\n"
                                     "frontends: [{name: f, processes: 0}, {name: g, port: 8001, processes: many}]\n")
    assert len(problems) >= 2, problems
    assert any("frontends[0].processes" in p and "give 1 to 64, or auto" in p for p in problems), problems
    assert any("frontends[1].processes" in p for p in problems), problems
