"""No secret in what the launcher prints or writes for eyes; the processes still get the real values."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import stat
from pathlib import Path

import pytest

from launcher import cli, redact, state
from launcher.plan import build_plan
from launcher.topology import load_topology

PASSWORD = "hunter2hunter2"
TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUv1234"
BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9abcdef"
TOPOLOGY = f"""\
name: secrets
model: m
services:
  etcd: http://root:{PASSWORD}@127.0.0.1:2379
  nats: nats://app:{PASSWORD}@127.0.0.1:4222
env:
  NATS_PASS: plain-but-named-like-a-password
  AUTH_HEADER: "{BEARER}"
  SOME_VALUE: "{TOKEN}"
workers:
  - name: w
    env: {{HF_TOKEN: "{TOKEN}", TOKENIZERS_PARALLELISM: "false"}}
    args: ["--hf-token", "{PASSWORD}"]
"""
SECRETS = (PASSWORD, TOKEN, "eyJhbGciOiJIUzI1NiJ9abcdef", "plain-but-named-like-a-password")


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code: object = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return int(code or 0), out.getvalue()


@pytest.fixture
def topology(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAUNCHER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NATS_SERVER", raising=False)
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    path = tmp_path / "t.yaml"
    path.write_text(TOPOLOGY)
    return path


@pytest.mark.parametrize("argv", [["plan"], ["plan", "--json"], ["validate"]])
def test_printed_output_holds_no_secret(topology: Path, argv: list[str]) -> None:
    code, output = run_cli([*argv, str(topology)])
    assert code == 0, output
    assert not [s for s in SECRETS if s in output], output
    if argv[0] == "plan":
        assert "nats://***@127.0.0.1:4222" in output and "NATS_PASS" in output and "TOKENIZERS_PARALLELISM" in output


def test_plan_json_stays_json_and_keeps_the_hosts(topology: Path) -> None:
    _, output = run_cli(["plan", "--json", str(topology)])
    spec = json.loads(output)[0]
    assert spec["env"]["NATS_SERVER"] == "nats://***@127.0.0.1:4222"
    assert spec["env"]["HF_TOKEN"] == "***" and spec["env"]["TOKENIZERS_PARALLELISM"] == "false"
    assert spec["argv"][-2:] == ["--hf-token", "***"]


def test_processes_still_receive_the_real_values(topology: Path) -> None:
    spec = build_plan(load_topology(topology)[0])[0]
    assert spec.env["HF_TOKEN"] == TOKEN and PASSWORD in spec.env["NATS_SERVER"]


def test_an_error_that_quotes_a_url_hides_its_credentials(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"name: t\nmodel: m\nservices: {{nats: 'nats://u:{PASSWORD}@h:70000'}}\nworkers:\n  - name: w\n")
    code, output = run_cli(["validate", str(path)])
    assert code == 2 and PASSWORD not in output and "nats://***@h:70000" in output


def test_run_dir_is_private_and_its_files_are_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAUNCHER_HOME", str(tmp_path / "home"))
    rd = state.RunDir.for_deployment("d")
    rd.create()
    state.write_json(rd.plan_file, {"env": {"HF_TOKEN": TOKEN}})
    assert stat.S_IMODE(rd.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(rd.logs.stat().st_mode) == 0o700
    assert stat.S_IMODE(rd.plan_file.stat().st_mode) == 0o600
    assert rd.plan()["env"]["HF_TOKEN"] == TOKEN  # the supervisor reads the real value back


def test_log_filter_redacts_the_supervisor_log(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.redact")
    caplog.handler.addFilter(redact.RedactingFilter())
    logger.warning("etcd list failed: %s", f"cannot reach http://root:{PASSWORD}@10.0.0.1:2379")
    assert PASSWORD not in caplog.text and "http://***@10.0.0.1:2379" in caplog.text


@pytest.mark.parametrize(("name", "secret"), [
    ("NATS_PASS", True), ("AUTH_HEADER", True), ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("DB_PASSWORD", True), ("API_KEY", True), ("MY_CREDENTIALS", True), ("api-key", True),
    ("TOKENIZERS_PARALLELISM", False), ("max-num-batched-tokens", False), ("PASSTHROUGH", False),
    ("VLLM_CPU_KVCACHE_SPACE", False), ("CUDA_VISIBLE_DEVICES", False), ("KEYBOARD", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert redact.is_secret_name(name) is secret


@pytest.mark.parametrize(("text", "shown"), [
    ("nats://user:pass@host:4222", "nats://***@host:4222"),
    ("http://a:b@h1:2379,http://c@h2:2379", "http://***@h1:2379,http://***@h2:2379"),
    (f"Authorization: {BEARER}", "Authorization: ***"),
    (f"token={TOKEN}", "token=***"),
    ("key sk-proj-AbCdEfGhIjKlMnOp12", "key ***"),
    ("/work/models/SmolLM2-135M-Instruct", "/work/models/SmolLM2-135M-Instruct"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_redact_text(text: str, shown: str) -> None:
    assert redact.redact_text(text) == shown


def test_up_refuses_a_bad_env_override_without_showing_its_password(topology: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_SERVER", f"nats://app:{PASSWORD}@127.0.0.1:99999")
    code, output = run_cli(["up", str(topology)])
    assert code == 2 and "NATS_SERVER: NATS URL 'nats://***@127.0.0.1:99999' has a bad port" in output
    assert PASSWORD not in output and "Traceback" not in output



def test_a_secret_named_switch_hides_no_flag_after_it() -> None:
    """`--allow-credentials` (vllm serve's CORS switch) takes no value: the flag after it and that flag's value
    are printed as they are, and a secret after a secret-named flag with a value is still hidden."""
    argv = ["--allow-credentials", "--allowed-methods", '["GET"]', "--api-key", PASSWORD, "--allow-credentials"]
    assert redact.redact_argv(argv) == ["--allow-credentials", "--allowed-methods", '["GET"]', "--api-key",
                                        redact.MASK, "--allow-credentials"]
