"""One frontend, several models: each request reaches the model its body names, through that model's own
vLLM OpenAI app. Most tests build the apps over the tiny model's config and tokenizer (no engine; a stub
dispatcher plays the workers and records which model each request was sent to); the last one deploys two
real models with `launcher up` and asks them through the `openai` SDK."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher import services as svc
from tests.helpers import CPU_ENGINE, CPU_ENV, MONOLITH, Services, metric, until, up, wait_until
from tests.test_frontend_errors import ENTRY, StubDispatcher, tokens
from tests.test_frontend_unit import catalog_of
from workers.frontend.app import FrontendApp, Settings
from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.errors import ModelUnavailable
from workers.frontend.model_apps import ModelApps
from workers.frontend.openai_layer import build_openai_app, serve_args, with_cors
from workers.runtime.registry import Registration

PATHS = {"smol": "/models/smol", "other": "/models/other", "broken": "/models/broken", "slow": "/models/slow"}


def registration(served: str, instance: int) -> Registration:
    return Registration(namespace="ns", component=ENTRY, endpoint="generate", subject=f"ns.{ENTRY}.generate",
                        lease_id=instance, instance_id=instance, model=PATHS[served],
                        extra={"served_model_name": served, "max_model_len": 64})


class Models:
    """vLLM apps built once (smol; other, with the alias `other-alias`; slow), and a frontend over any catalog
    of them whose builds hand them out: `slow`'s once `release` is set; `broken`'s fails."""

    def __init__(self, tiny_model: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.dispatcher = RecordingDispatcher()
        self.built: dict[str, Any] = {}
        for served, names in (("smol", ["smol"]), ("other", ["other", "other-alias"]), ("slow", ["slow"])):
            route = catalog_of(registration(served, 1)).serving()[served]
            config = {"model": str(tiny_model), "served_model_name": names}
            self.built[served] = self.loop.run_until_complete(build_openai_app(
                serve_args(str(tiny_model), []), route, config, self.dispatcher))  # type: ignore[arg-type]
        self.release = asyncio.Event()
        self.builds: list[str] = []
        self.paths: list[str] = []

    async def build(self, route: ModelRoute) -> Any:
        self.builds.append(route.name)
        self.paths.append(route.path)
        if route.name == "broken":
            raise ValueError("the chat template does not parse")
        if route.name == "slow":
            await self.release.wait()
        return self.built[route.name]

    def frontend(self, catalog: Catalog, preferred: str = "smol") -> FrontendApp:
        self.builds.clear()
        self.paths.clear()
        self.dispatcher.models.clear()
        apps = ModelApps(catalog, self.build, PATHS[preferred])
        return FrontendApp(self.dispatcher, catalog, Settings(), apps)  # type: ignore[arg-type]

    def calls(self, app: FrontendApp, *requests: tuple[str, str, dict[str, Any] | None]) -> list[httpx.Response]:
        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://t") as http:
                return list(await asyncio.gather(*(http.request(method, path, json=body)
                                                   for method, path, body in requests)))
        return self.loop.run_until_complete(run())

    def close(self) -> None:
        for app in self.built.values():
            app.state.engine_client.shutdown()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


class RecordingDispatcher(StubDispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = []

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.models.append(model)
        async for chunk in tokens(72, 73):
            yield chunk


@pytest.fixture(scope="module")
def models(tiny_model: Path) -> Iterator[Models]:
    m = Models(tiny_model)
    yield m
    m.close()


def completion(model: str | None) -> dict[str, Any]:
    return {"prompt": [1, 2, 3], "max_tokens": 2, **({"model": model} if model is not None else {})}


def test_each_request_reaches_the_model_it_names(models: Models) -> None:
    app = models.frontend(catalog_of(registration("smol", 1), registration("other", 2)))
    answers = models.calls(app, ("POST", "/v1/completions", completion("other")),
                           ("POST", "/v1/completions", completion("smol")),
                           ("POST", "/v1/completions", completion("other-alias")))
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert sorted(models.dispatcher.models) == ["other", "other", "smol"]
    assert [r.json()["model"] for r in answers] == ["other", "smol", "other"]  # vLLM answers with the first name


def test_a_request_naming_no_model_goes_to_the_frontends_own(models: Models) -> None:
    for preferred in ("other", "smol"):
        app = models.frontend(catalog_of(registration("smol", 1), registration("other", 2)), preferred=preferred)
        [r] = models.calls(app, ("POST", "/v1/completions", completion(None)))
        assert r.status_code == 200, r.text
        assert models.dispatcher.models == [preferred]


def test_while_the_deployments_model_is_down_a_request_naming_none_is_503_not_another_models(
        models: Models) -> None:
    app = models.frontend(catalog_of(registration("other", 2)), preferred="smol")  # smol's workers are down
    unnamed, named, unknown, listing = models.calls(
        app, ("POST", "/v1/completions", completion(None)), ("POST", "/v1/completions", completion("other")),
        ("POST", "/v1/completions", completion("nope")), ("GET", "/v1/models", None))
    assert unnamed.status_code == 503 and unnamed.headers["retry-after"], unnamed.text
    assert named.status_code == 200 and unknown.status_code == 404, (named.text, unknown.text)
    assert [card["id"] for card in listing.json()["data"]] == ["other", "other-alias"]
    assert models.dispatcher.models == ["other"]


def test_v1_models_lists_every_model_the_frontends_own_first(models: Models) -> None:
    app = models.frontend(catalog_of(registration("smol", 1), registration("other", 2)), preferred="other")
    models.loop.run_until_complete(app.models.settle())  # as the server does: every served model built at once
    [r] = models.calls(app, ("GET", "/v1/models", None))
    assert r.status_code == 200 and r.json()["object"] == "list"
    assert [card["id"] for card in r.json()["data"]] == ["other", "other-alias", "smol"]
    assert all(card["max_model_len"] == 64 and card["object"] == "model" for card in r.json()["data"])


def test_an_unknown_model_is_vllms_404(models: Models) -> None:
    app = models.frontend(catalog_of(registration("smol", 1), registration("other", 2)))
    [r] = models.calls(app, ("POST", "/v1/completions", completion("nope")))
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", r.text
    assert models.dispatcher.models == []


def test_a_model_whose_layer_fails_is_a_500_naming_it_and_the_others_go_on(models: Models) -> None:
    app = models.frontend(catalog_of(registration("smol", 1), registration("broken", 2)))
    broken, good = models.calls(app, ("POST", "/v1/completions", completion("broken")),
                                ("POST", "/v1/completions", completion("smol")))
    assert broken.status_code == 500, broken.text
    error = broken.json()["error"]
    assert error["param"] == "model" and "`broken`" in error["message"] and "chat template" in error["message"]
    assert good.status_code == 200 and models.dispatcher.models == ["smol"]


def test_a_registered_model_still_building_is_waited_for_not_404(models: Models) -> None:
    app = models.frontend(catalog_of(registration("smol", 1), registration("slow", 2)))
    models.release.clear()

    entered = 0

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        nonlocal entered
        entered += 1
        await app.app(scope, receive, send)

    async def release_once_both_came() -> None:
        await until(lambda: entered == 2 and "slow" in models.builds, what="both requests in, the build started")
        models.release.set()

    async def both() -> list[httpx.Response]:
        task = asyncio.create_task(release_once_both_came())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=counted), base_url="http://t") as http:
            answers = await asyncio.gather(http.post("/v1/completions", json=completion("slow")),
                                           http.post("/v1/completions", json=completion("slow")))
        await task
        return list(answers)

    answers = models.loop.run_until_complete(both())
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert models.builds.count("slow") == 1  # one build, both requests waited for it


# ---- end to end: one frontend over two real models ---------------------------------------------------

def test_one_frontend_serves_two_models_each_from_its_own_workers(tmp_path: Path, services: Services,
                                                                    demo_model: Path, tiny_model: Path) -> None:
    """A topology whose second worker loads another model (`model:`): through one frontend of 2 processes,
    `/v1/models` lists both, each model's requests reach its own worker (its vLLM counters) and are
    tokenized with its own tokenizer, the demo model still answers Paris, and a request naming no model goes
    to the topology's model, as `vllm serve` takes one for its model. The frontend's `models:` turns tool
    choice on for smol alone: tiny's requests with tools get vLLM's 400 naming the flag."""
    import openai

    port, smol_metrics, tiny_metrics = svc.free_ports(3)
    engine = {**CPU_ENGINE, "max-model-len": 2048, "dtype": "float32"}
    topo = {"name": "fe-models", "model": str(demo_model), "env": dict(CPU_ENV), "engine": engine,
            "workers": [{"name": "smol", "kind": MONOLITH.name, "cpus": "0", "ready_timeout": 300,
                         "metrics_port": smol_metrics, "engine": {"served-model-name": "smol"}},
                        {"name": "tiny", "kind": MONOLITH.name, "cpus": "1", "ready_timeout": 300,
                         "metrics_port": tiny_metrics, "model": str(tiny_model),
                         "engine": {"served-model-name": "tiny"}}],
            "frontends": [{"name": "frontend", "port": port, "processes": 2, "ready_timeout": 300, "models": {
                "smol": {"args": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]}}}]}
    dep = up(tmp_path, topo, services)
    try:
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smol", "tiny"]

        def done(port: int) -> float:
            return sum(metric(port, "vllm:request_success_total").values())

        def counted(port: int, before: float) -> bool:
            return done(port) >= before + 1

        question = "what is the capital of france?"
        sizes = {}
        for model in ("smol", "tiny"):
            r = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": question}, timeout=60)
            assert r.status_code == 200, r.text
            sizes[model] = r.json()["count"]
        assert sizes["smol"] != sizes["tiny"]  # two tokenizers: each model renders with its own

        before = done(smol_metrics), done(tiny_metrics)
        chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": question}],
                                              max_tokens=16, temperature=0)
        assert "paris" in (chat.choices[0].message.content or "").lower()
        text = client.completions.create(model="tiny", prompt=question, max_tokens=4, temperature=0)
        assert text.model == "tiny" and text.usage is not None and text.usage.prompt_tokens == sizes["tiny"]
        wait_until(lambda: counted(smol_metrics, before[0]) and counted(tiny_metrics, before[1]), 30,
                   "each worker counting its model's request")
        assert (done(smol_metrics), done(tiny_metrics)) == (before[0] + 1, before[1] + 1)

        r = httpx.post(f"{url}/v1/completions", json={"prompt": question, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "smol", r.text
        wait_until(lambda: counted(smol_metrics, before[0] + 1), 30, "the topology's model counting it")
        assert done(tiny_metrics) == before[1] + 1

        # Per-model flags (`models:`): smol's layer takes automatic tool choice, tiny's has the frontend's flags.
        tool = {"type": "function", "function": {"name": "capital", "parameters": {
            "type": "object", "properties": {"country": {"type": "string"}}}}}
        asked = {"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
                 "tools": [tool], "tool_choice": "auto"}
        answer = client.chat.completions.create(model="smol", **asked)  # type: ignore[call-overload]
        assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            client.chat.completions.create(model="tiny", **asked)  # type: ignore[call-overload]
    finally:
        dep.down()


def test_a_model_registered_again_differently_gets_a_new_app_never_the_old(models: Models) -> None:
    """The same served name, workers restarted with another model: its requests are rendered by an app built
    for the new registration (the old tokenizer would render the new model's prompts)."""
    catalog = catalog_of(registration("smol", 1))
    app = models.frontend(catalog)
    [first] = models.calls(app, ("POST", "/v1/completions", completion("smol")))
    moved = dataclasses.replace(registration("smol", 1), model="/models/smol-v2")
    catalog.put(moved.key, moved)
    [second] = models.calls(app, ("POST", "/v1/completions", completion("smol")))
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert models.paths == ["/models/smol", "/models/smol-v2"]


def test_only_the_deployments_own_model_failing_stops_the_start(models: Models) -> None:
    catalog = catalog_of(registration("smol", 1), registration("broken", 2))
    models.loop.run_until_complete(models.frontend(catalog, preferred="smol").models.settle())  # broken: its 500
    with pytest.raises(ModelUnavailable, match="`broken`"):
        models.loop.run_until_complete(models.frontend(catalog, preferred="broken").models.settle())


def test_a_failed_model_is_built_again_when_its_workers_come_back(models: Models) -> None:
    broken = registration("broken", 2)
    catalog = catalog_of(registration("smol", 1), broken)
    app = models.frontend(catalog)
    [r] = models.calls(app, ("POST", "/v1/completions", completion("broken")))
    assert r.status_code == 500
    catalog.delete(broken.key)

    async def relist() -> None:  # what the server's loop does on the catalog's change
        app.models.build_known()

    models.loop.run_until_complete(relist())
    catalog.put(broken.key, broken)
    [r] = models.calls(app, ("POST", "/v1/completions", completion("broken")))
    assert r.status_code == 500 and models.builds.count("broken") == 2  # tried again, not the old failure


def test_a_renamed_model_takes_its_requests_and_the_default_with_it(models: Models) -> None:
    """The topology's model served again under another name (same weights): a request naming no model goes
    to the name it is served by now, not to the old one (whose requests nobody answers any more)."""
    old = registration("smol", 1)
    catalog = catalog_of(old)
    app = models.frontend(catalog)
    [r] = models.calls(app, ("POST", "/v1/completions", completion(None)))
    assert r.status_code == 200 and models.dispatcher.models == ["smol"]
    catalog.delete(old.key)
    renamed = dataclasses.replace(registration("other", 2), model=PATHS["smol"])  # other's app: served "other"
    catalog.put(renamed.key, renamed)
    [r] = models.calls(app, ("POST", "/v1/completions", completion(None)))
    assert r.status_code == 200 and models.dispatcher.models == ["smol", "other"], r.text


def test_a_model_that_changes_and_leaves_while_requests_wait_ends_in_503s_not_a_build_loop(models: Models) -> None:
    first = registration("slow", 1)
    catalog = catalog_of(first)
    app = models.frontend(catalog)
    models.release.clear()

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://t") as http:
            a = asyncio.create_task(http.post("/v1/completions", json=completion("slow")))
            await until(lambda: models.builds == ["slow"], what="the first request waiting on its build")
            moved = dataclasses.replace(first, model="/models/slow-v2")
            catalog.put(moved.key, moved)
            b = asyncio.create_task(http.post("/v1/completions", json=completion("slow")))
            await until(lambda: models.builds == ["slow", "slow"], what="the second on the new registration's")
            catalog.delete(moved.key)
            models.release.set()
            return list(await asyncio.wait_for(asyncio.gather(a, b), 10))

    answers = models.loop.run_until_complete(scenario())
    # The first waited on a build its model's new registration replaced, then the model left: a 503. The
    # second got the app of the registration it waited for (the real dispatcher then says 503: no worker; the
    # stub answers). Both ended, after two builds: no loop of builds.
    assert [r.status_code for r in answers] == [503, 200], [r.text for r in answers]
    assert models.builds.count("slow") == 2


def test_cors_is_vllm_serves_and_covers_every_route_and_the_preflight_before_the_key(models: Models,
                                                                                      tiny_model: Path) -> None:
    """`--allowed-origins` etc. as `vllm serve` takes them: the allowed origin gets its header on the merged
    /v1/models (the frontend's own route) and on a model's answer, once; a browser's preflight (no key) is
    answered though the frontend wants a key; another origin gets none, and by default no origin does
    (vLLM 0.32's default)."""
    ui, other = "http://ui.example", "http://elsewhere.example"
    key = {"Authorization": "Bearer k"}
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}

    def frontend(flags: list[str]) -> Any:
        args = serve_args(str(tiny_model), flags)  # the model's app is built with the flags too, as server.py does

        async def build(route: ModelRoute) -> Any:
            config = {"model": str(tiny_model), "served_model_name": [route.name]}
            built.append(await build_openai_app(args, route, config, models.dispatcher))  # type: ignore[arg-type]
            return built[-1]

        catalog = catalog_of(registration("smol", 1))
        app = FrontendApp(models.dispatcher, catalog, Settings(api_key="k"),  # type: ignore[arg-type]
                          ModelApps(catalog, build, PATHS["smol"]))
        return with_cors(app.app, args)

    async def ask(app: Any) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return [await http.options("/v1/chat/completions", headers={"Origin": ui, **preflight}),
                    await http.get("/v1/models", headers={"Origin": ui, **key}),
                    await http.post("/v1/completions", json=completion("smol"), headers={"Origin": ui, **key}),
                    await http.options("/v1/chat/completions", headers={"Origin": other, **preflight}),
                    await http.get("/v1/models", headers={"Origin": other, **key})]

    built: list[Any] = []
    allowed = ["--allowed-origins", f'["{ui}"]', "--allow-credentials"]
    try:
        pre, listed, answered, pre_other, listed_other = models.loop.run_until_complete(ask(frontend(allowed)))
        default_pre, default_listed, *_ = models.loop.run_until_complete(ask(frontend([])))
    finally:
        for app in built:
            app.state.engine_client.shutdown()
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ui, pre.text
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    for r in (listed, answered):
        assert r.status_code == 200, r.text
        assert r.headers.get_list("access-control-allow-origin") == [ui]
        assert r.headers["access-control-allow-credentials"] == "true"
    assert [m["id"] for m in listed.json()["data"]] == ["smol"]
    assert pre_other.status_code == 400 and "access-control-allow-origin" not in pre_other.headers
    assert listed_other.status_code == 200 and "access-control-allow-origin" not in listed_other.headers

    assert default_pre.status_code == 400 and "access-control-allow-origin" not in default_listed.headers
