"""One wrong file per class of mistake (tests/bad_topologies/), and what `validate` says about it.

Each file starts with `# expect: TEXT` (the message), `# line: N` (where it must point) and, when the
check needs vLLM's flag table, `# needs: vllm`. The same footer ends every refusal.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher import engine_flags
from tests.test_validate_fuzz import assert_well_behaved, run_validate

BAD = sorted((Path(__file__).parent / "bad_topologies").glob("*.yaml"))
SECRETS = ("hunter2hunter2", "admin:")


def header(path: Path, key: str) -> str | None:
    m = re.search(rf"^# {key}: (.*)$".encode(), path.read_bytes(), re.M)
    return m.group(1).decode() if m else None


def vllm_table() -> bool:
    try:
        engine_flags.load_table()
    except engine_flags.TableUnavailable:
        return False
    return True


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_topology_is_refused_with_its_message(path: Path) -> None:
    if header(path, "needs") == "vllm" and not vllm_table():
        pytest.skip("needs vLLM's flag table, and vLLM is not installed here")
    code, output, seconds, growth = run_validate(path)
    assert code == 2, output
    assert_well_behaved(path, code, output, seconds, growth)
    expect, line = header(path, "expect"), header(path, "line")
    assert expect and line
    wanted = [ln for ln in output.splitlines() if expect in ln]
    assert wanted, f"expected {expect!r} in:\n{output}"
    assert wanted[0].startswith(f"error {path}:{line}:"), wanted[0]
    assert not any(s in output for s in SECRETS), output


def test_every_class_has_a_file() -> None:
    names = {p.stem for p in BAD}
    assert {"engine_unknown_flag", "engine_tp_not_int", "engine_tp_zero", "engine_bad_choice", "duplicate_key",
            "unknown_tag", "list_as_key", "not_utf8", "control_character", "alias_bomb", "recursive_alias",
            "huge_cpus_range", "kv_transfer_without_kind", "prefill_without_decode", "etcd_bad_scheme",
            "nats_bad_port", "kv_ip_not_an_address", "kv_port_true", "credentials_in_url",
            # args: is read as engine: is (issue 22): a typo, TP vs devices, prefix caching behind a router,
            # a flag the launcher sets itself, and a router's / frontend's own parser.
            "args_unknown_flag", "args_tp_devices_disagree", "args_kv_worker_no_prefix_caching",
            "args_launcher_owned", "args_frontend_owned", "args_router_unknown_flag", "args_bad_value"} <= names
