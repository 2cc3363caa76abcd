"""workers/kinds.py is the one table of process kinds: each row agrees with its module, the topology's
`kind:` comes from it, and a kind added to it (tests/fake_kind.py's `echo`) is validated, planned,
started, registered and served through the frontend with no change anywhere else."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from launcher.plan import build_plan
from launcher.topology import Topology, TopologyError, json_schema, load_topology
from launcher.validation import check_file
from tests import fake_kind
from tests.helpers import ROOT, Services, until, worker
from workers.engine import add_worker_flags
from workers.frontend.app import FrontendApp, Settings
from workers.frontend.catalog import Catalog, ModelRoute, follow
from workers.frontend.dispatch import Dispatcher
from workers.frontend.model_apps import ModelApps
from workers.kinds import KINDS, Kind, entry_component, worker_kinds
from workers.runtime import requestplane
from workers.runtime.registry import Registry

_TYPES = {None: "str", int: "int", float: "float", str: "str"}


def module_flags(kind: Kind) -> dict[str, str]:
    """The flags the kind's module adds beside vLLM's, read from its own argparse (no vLLM needed); hidden
    ones are the module's to itself (a frontend's children), never a topology's."""
    module = importlib.import_module(kind.module)
    if kind.engine:
        parser = argparse.ArgumentParser()
        add_worker_flags(parser)
        module.add_flags(parser)
    else:
        parser = module.build_parser()
    return {a.option_strings[0][2:]: "bool" if isinstance(a, argparse.BooleanOptionalAction)
            else _TYPES.get(a.type, getattr(a.type, "__name__", "?"))
            for a in parser._actions if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS}


@pytest.mark.parametrize("kind", [*KINDS.values(), fake_kind.KIND], ids=lambda k: k.name)
def test_a_kinds_flags_are_its_modules_own(kind: Kind) -> None:
    assert dict(kind.flags) == module_flags(kind)
    assert kind.set_by_launcher <= set(kind.flags)


@pytest.mark.parametrize("kind", KINDS.values(), ids=lambda k: k.name)
def test_a_kinds_component_is_its_name_or_the_row_says_why(kind: Kind) -> None:
    assert kind.component == kind.name or kind.component_reason, kind
    assert kind.endpoints and (kind.routes or kind.entry_rank is None)


async def _never_built(route: ModelRoute) -> Any:
    raise AssertionError(f"nothing serves, so no model's app is built ({route.name})")


def test_the_frontend_takes_every_route_a_kind_answers() -> None:
    """Nothing serves yet: every OpenAI route a kind answers is a 503 with Retry-After (not a 404)."""
    catalog = Catalog()
    app = FrontendApp(Dispatcher(None, catalog, timeout=1, retries=0), catalog, Settings(),  # type: ignore[arg-type]
                      ModelApps(catalog, _never_built))

    async def statuses() -> set[tuple[int, str | None]]:
        out = set()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://t") as http:
            for path in {r for k in KINDS.values() for r in k.routes}:
                r = await http.post(path, json={})
                out.add((r.status_code, r.headers.get("retry-after")))
        return out

    assert asyncio.run(statuses()) == {(503, "5")}


def test_the_topologys_worker_kinds_are_the_tables_engine_kinds(tmp_path: Path) -> None:
    assert json_schema()["$defs"]["Worker"]["properties"]["kind"]["enum"] == list(worker_kinds())
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmodel: m\nworkers:\n  - name: w\n    kind: nope\n")
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert all(f"'{k}'" in str(err.value) for k in worker_kinds()) and "not 'nope'" in str(err.value)


# ---- a kind that only this test knows ------------------------------------------------------------

@pytest.fixture()
def echo_kind(monkeypatch: pytest.MonkeyPatch) -> Kind:
    monkeypatch.setitem(KINDS, fake_kind.KIND.name, fake_kind.KIND)
    return fake_kind.KIND


def echo_topology(tmp_path: Path, kind: Kind, services: Services | None = None) -> Path:
    topo: dict[str, Any] = {
        "name": "echo", "model": "echo-model", "metrics_port_base": 29400,
        "engine": {"max-model-len": 64},
        "workers": [worker("e", kind, replicas=2)],
        "frontends": [{"name": "web", "port": 28000}],
    }
    if services is not None:
        topo["services"] = {"etcd": services.etcd, "nats": services.nats, "managed": "never"}
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump(topo, sort_keys=False))
    return path


def test_an_unknown_kind_is_refused_until_the_table_has_its_row(tmp_path: Path) -> None:
    checked = check_file(echo_topology(tmp_path, fake_kind.KIND))
    assert any("workers[0].kind: Input should be" in p and "not 'echo'" in p for p in checked.problems)


def test_a_new_kind_is_validated_and_planned_from_its_row_alone(tmp_path: Path, echo_kind: Kind) -> None:
    checked = check_file(echo_topology(tmp_path, echo_kind))
    assert checked.problems == [] and isinstance(checked.topology, Topology)
    assert entry_component({echo_kind.name}) == echo_kind.component  # the frontend has a way in
    specs = build_plan(checked.topology, cpu_flags=frozenset())
    echo = [s for s in specs if s.kind == echo_kind.name]
    assert [s.name for s in echo] == ["e-1", "e-2"]
    for s in echo:
        assert s.argv[1:3] == ["-m", echo_kind.module] and s.tier == echo_kind.tier
        assert "--max-model-len" in s.argv and "--metrics-port" in s.argv
    assert specs[-1].kind == echo_kind.name  # after the frontend, its tier


def test_a_new_kind_runs_registers_and_serves_through_the_frontend(
        tmp_path: Path, echo_kind: Kind, services: Services) -> None:
    """The plan's own argv and environment start the fake module; the frontend's catalog and dispatcher
    find it by the table and send an OpenAI request to it."""
    topo, _ = load_topology(echo_topology(tmp_path, echo_kind, services))
    spec = next(s for s in build_plan(topo, cpu_flags=frozenset()) if s.kind == echo_kind.name)
    proc = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, cwd=ROOT)
    try:
        assert asyncio.run(_ask_through_frontend(services, topo.effective_namespace)) == "<5><6>"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _ask_through_frontend(services: Services, namespace: str) -> str:
    registry = await Registry.connect((services.etcd,))
    nc = await requestplane.connect(services.nats, "test-frontend")
    catalog = Catalog()
    follower = asyncio.create_task(follow(registry, namespace, catalog))
    try:
        await until(lambda: "echo-model" in catalog.serving(), 30, "the echo worker to register")
        assert catalog.serving()["echo-model"].component == fake_kind.KIND.component
        dispatcher = Dispatcher(nc, catalog, timeout=5, retries=1)
        payload = {"request_id": "r", "token_ids": [5, 6, 7], "sampling": {"max_tokens": 2}}
        return "".join([chunk.get("text", "") async for chunk in dispatcher.generate("echo-model", payload)])
    finally:
        follower.cancel()
        await nc.close()
        await registry.close()
