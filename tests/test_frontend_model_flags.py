"""Per-model `vllm serve` flags of a frontend (`frontends[].models`, the frontend's --model-flags): validate
says what is wrong where, the plan passes what the frontend reads back, and each model's OpenAI layer is
built with its own flags (the tool-choice check of vLLM's layer is what tells them apart)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher import validation
from launcher.plan import Endpoints, build_plan
from launcher.topology import load_topology
from tests.test_frontend_errors import ENTRY, StubDispatcher
from tests.test_frontend_unit import catalog_of
from workers.frontend.app import FrontendApp, Settings
from workers.frontend.metrics import FrontendMetrics
from workers.frontend.model_apps import ModelApps
from workers.frontend.openai_layer import serve_args
from workers.frontend.server import _builder, args_for_model, names_of, parse_args, vllm_flags_of
from workers.runtime.registry import Registration

TOPOLOGY = """\
name: pm
model: org/smol
workers:
  - {name: smol, kind: monolith, engine: {served-model-name: [smol, smol-alias]}}
  - {name: other, kind: monolith, model: org/other}
frontends:
  - name: web
    args: [--tool-call-parser, pythonic]
    models:
"""


# One more worker of org/other, served under another name than the first's.
OTHER2 = "  - {name: other2, kind: monolith, model: org/other, engine: {served-model-name: other2}}\n"
MIXED = TOPOLOGY.replace("frontends:", OTHER2 + "frontends:")


def checked(tmp_path: Path, models: str, topology: str = TOPOLOGY) -> list[str]:
    path = tmp_path / "t.yaml"
    path.write_text(topology + models)
    return validation.check_file(path).problems


def test_a_parser_of_the_frontends_plugin_may_be_named_under_a_model(tmp_path: Path) -> None:
    """Its parsers are vLLM's only once the frontend loads the plugin (vLLM checks them then)."""
    with_plugin = TOPOLOGY.replace("args: [--tool-call-parser, pythonic]", "args: [--tool-parser-plugin, p.py]")
    assert checked(tmp_path, "      smol:\n        args: [--tool-call-parser, mine]\n", with_plugin) == []


def test_each_models_flags_reach_the_frontend_as_it_reads_them(tmp_path: Path) -> None:
    models = """\
      smol-alias:
        args: [--enable-auto-tool-choice, --tool-call-parser, hermes]
      org/other:
        args: [--response-role, bot]
"""
    assert checked(tmp_path, models) == []
    (tmp_path / "t.yaml").write_text(TOPOLOGY + models)
    topo, _ = load_topology(tmp_path / "t.yaml")
    (web,) = [s for s in build_plan(topo, Endpoints(etcd=["http://10.0.0.1:2379"], nats="nats://10.0.0.1:4222"))
              if s.name == "web"]
    args = parse_args(web.argv[3:])  # what the frontend process reads from the plan's argv
    assert args.model_flags == {"smol-alias": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                                "org/other": ["--response-role", "bot"]}
    assert vllm_flags_of(args) == ["--tool-call-parser", "pythonic"]  # the frontend's own, for every model


@pytest.mark.parametrize(("models", "where", "says"), [
    ("      nobody:\n        args: [--response-role, bot]\n", "frontends[0].models.nobody",
     "no worker serves a model named 'nobody'"),
    ("      smol:\n        args: [--response-role, a]\n      smol-alias:\n        args: [--response-role, b]\n",
     "frontends[0].models.smol-alias", "'smol-alias' and 'smol' name the same model"),
    ("      smol:\n        args: [--allowed-origins, '[\"https://ui\"]']\n", "frontends[0].models.smol.args[0]",
     "'--allowed-origins' is the frontend's, for every model"),
    ("      smol:\n        args: [--port, '9']\n", "frontends[0].models.smol.args[0]",
     "the launcher passes --port"),
    ("      smol:\n        args: [--tool-call-parser, hermse]\n", "frontends[0].models.smol.args[0]",
     "did you mean 'hermes'?"),
    ("      smol:\n        args: []\n", "frontends[0].models.smol.args", "at least 1 item"),
    ("      smol:\n        args: [--response-role, bot]\n", "workers[2].engine.served-model-name",
     "'other2' serves org/other as other2, 'other' as org/other"),
])
def test_validate_names_the_line_and_the_mistake(tmp_path: Path, models: str, where: str, says: str) -> None:
    problems = checked(tmp_path, models, MIXED)
    assert any(where in p and says in p for p in problems), problems
    assert all(str(tmp_path / "t.yaml") + ":" in p for p in problems)  # file:line:col, each


def test_the_frontend_refuses_a_server_flag_under_a_model_naming_it() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model-flags", json.dumps({"smol": ["--allowed-origins", "[]"]})])
    with pytest.raises(SystemExit):
        parse_args(["--model-flags", '["--tool-call-parser", "hermes"]'])


def test_a_model_gets_its_own_flags_under_any_of_its_names_and_the_others_the_frontends() -> None:
    base = argparse.Namespace(tool_call_parser="pythonic")
    mine = argparse.Namespace(tool_call_parser="hermes")
    assert args_for_model(base, {"smol-alias": mine}, {"smol", "smol-alias"}, "smol") is mine
    assert args_for_model(base, {"smol-alias": mine}, {"other"}, "other") is base
    with pytest.raises(ValueError, match="smol and smol-alias"):
        args_for_model(base, {"smol": mine, "smol-alias": mine}, {"smol", "smol-alias"}, "smol")


def test_a_models_names_are_every_name_its_workers_registered() -> None:
    """A name only the second registration of a model carries (or only its model_config, or none: the model
    path, vLLM's default) still finds the model's flags."""
    def reg(instance: int, extra: dict[str, Any]) -> Registration:
        return Registration(namespace="ns", component=ENTRY, endpoint="generate", subject=f"ns.{ENTRY}.generate",
                            lease_id=instance, instance_id=instance, model="/models/smol", extra=extra)

    catalog = catalog_of(reg(1, {"served_model_name": "smol", "model_config": {"served_model_name": ["smol"]}}),
                         reg(2, {"served_model_name": None, "model_config": {"served_model_name": ["smol", "b"]}}),
                         reg(3, {"served_model_name": "c"}),
                         reg(4, {"served_model_name": 5, "model_config": "not a mapping"}))  # skipped, no crash
    route = next(iter(catalog.serving().values()))
    assert names_of(catalog, route) == {route.name, "smol", "b", "c"}


def test_tool_choice_auto_is_served_for_the_model_that_enabled_it_and_refused_for_the_other(
        tiny_model: Path) -> None:
    """Two registered models behind the frontend's own builder (`_builder`, vLLM's app per model): only the
    one whose --model-flags enable automatic tool choice takes `tool_choice: auto`; the other gets vLLM's 400
    naming the flag, as `vllm serve` without it answers."""
    args = parse_args(["--model-flags", json.dumps({"tools": ["--enable-auto-tool-choice", "--tool-call-parser",
                                                              "hermes"]})])
    base = serve_args(str(tiny_model), vllm_flags_of(args))
    per_model = {name: serve_args(str(tiny_model), vllm_flags_of(args) + flags)
                 for name, flags in args.model_flags.items()}
    regs = [Registration(namespace="ns", component=ENTRY, endpoint="generate", subject=f"ns.{ENTRY}.generate",
                         lease_id=i, instance_id=i, model=f"/models/{name}",
                         extra={"served_model_name": name, "max_model_len": 64,
                                "model_config": {"model": str(tiny_model), "served_model_name": [name]}})
            for i, name in ((1, "tools"), (2, "plain"))]
    catalog = catalog_of(*regs)
    dispatcher = StubDispatcher()
    loop = asyncio.new_event_loop()
    models = ModelApps(catalog, _builder(base, per_model, catalog, dispatcher, FrontendMetrics()))  # type: ignore[arg-type]
    front = FrontendApp(dispatcher, catalog, Settings(), models)  # type: ignore[arg-type]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

    async def ask(model: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front.app), base_url="http://t") as http:
            return await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "tools": [tool], "tool_choice": "auto"})

    try:
        plain = loop.run_until_complete(ask("plain"))
        assert plain.status_code == 400 and "--enable-auto-tool-choice" in plain.text, plain.text
        served = loop.run_until_complete(ask("tools"))
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["message"]["content"] == "fg"  # tokens 72, 73: no tool call in them
    finally:
        for app in models.apps.values():
            app.state.engine_client.shutdown()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


PLUGIN = """\
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser


@ToolParserManager.register_module("launcher-test-parser")
class LauncherTestParser(Hermes2ProToolParser):
    pass
"""


def test_a_tool_parser_plugin_is_loaded_and_parser_names_checked_as_vllm_serve_does(tmp_path: Path) -> None:
    """vLLM's setup_server loads --tool-parser-plugin before it checks the parser names; the frontend builds its
    layers from serve_args, so it does both there (before, the plugin's parser was accepted and never loaded)."""
    from vllm.tool_parsers import ToolParserManager

    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    serve_args("m", ["--tool-parser-plugin", str(plugin), "--enable-auto-tool-choice",
                     "--tool-call-parser", "launcher-test-parser"])
    assert ToolParserManager.get_tool_parser("launcher-test-parser").__name__ == "LauncherTestParser"
    with pytest.raises(SystemExit, match="invalid tool call parser: no-such-parser"):
        serve_args("m", ["--enable-auto-tool-choice", "--tool-call-parser", "no-such-parser"])
