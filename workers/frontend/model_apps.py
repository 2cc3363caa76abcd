"""vLLM's OpenAI app for each model the deployment serves, and which one a request goes to.

`vllm serve` serves one model; a deployment may serve several (a worker's `model:` overrides the
topology's). Each model gets its own vLLM OpenAI app (its tokenizer, chat template, generation defaults
and context come from its workers' registration), built once its first worker registers, and a request
goes to the app of the model its body names (any of the model's served names). A request that names no
model goes to the default app, the frontend's own `--model` (the topology's), as `vllm serve` takes a
request without `model` for its model; while that model is not served it gets a 503, never another
model's answer in its place. A request naming a model nobody serves gets vLLM's own 404. A GET
(`/version`) goes to any app, and `/v1/models` lists the cards of every model served and built
(`models_body`), the default's first.

An app is built for what its workers registered (`signature`: the model they loaded, its context and
model configuration). When that changes under the same served name (workers restarted with another
`model:` or other flags), the old app is dropped at once and a new one built: requests wait for it
rather than being rendered with the old tokenizer for the new model.

A model whose app is being built when a request for it comes waits for that build (seconds: the
tokenizer), rather than getting a 404 for a model that is registered. A build that fails is logged and
that model's requests get a 500 that names it (`ModelUnavailable`); the failure is forgotten when the
model's workers go away or register another configuration, so a fixed model is built again. A request
that waits only waits for the build it needs (its model's, the default's); one naming an unknown name
waits at most `ALIAS_WAIT` for the builds under way (the name may be another model's alias).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.errors import ModelUnavailable

log = logging.getLogger(__name__)

Builder = Callable[[ModelRoute], Awaitable[Any]]  # a served model's route -> vLLM's FastAPI app for it
Signature = Callable[[ModelRoute], Any]  # what an app is built from: a change means a new app
ALIAS_WAIT = 30.0


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def route_signature(route: ModelRoute) -> Any:
    return (route.path, route.max_model_len)


def served_names(app: Any, fallback: str) -> list[str]:
    """Every name vLLM's app answers to (`--served-model-name a b`: both)."""
    models = getattr(getattr(app, "state", None), "openai_serving_models", None)
    paths = getattr(models, "base_model_paths", None) or []
    return [p.name for p in paths] or [fallback]


class ModelApps:
    def __init__(self, catalog: Catalog, build: Builder, preferred_path: str | None = None,
                 signature: Signature = route_signature) -> None:
        self.catalog = catalog
        self._build = build
        self._signature = signature
        self.preferred_path = preferred_path  # the frontend's --model: its app is the default one
        self.apps: dict[str, Any] = {}  # served name (first one) -> app
        self._names: dict[str, str] = {}  # every served name -> first served name
        self._served: dict[str, list[str]] = {}  # first served name -> every name its app answers to
        self._paths: dict[str, str] = {}  # first served name -> the model its workers loaded
        self._built_from: dict[str, Any] = {}  # first served name -> the signature its app was built for
        self.failed: dict[str, str] = {}  # served name -> why its build failed
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.first = asyncio.Event()  # some model's app is built: the frontend can answer
        # served name -> (route, its signature): the catalog makes new route objects only when it changes,
        # so a request pays for the signature once per change, not once per request.
        self._signatures: dict[str, tuple[ModelRoute, Any]] = {}

    def _signature_of(self, route: ModelRoute) -> Any:
        cached = self._signatures.get(route.name)
        if cached is None or cached[0] is not route:
            cached = self._signatures[route.name] = (route, self._signature(route))
        return cached[1]

    # ---- building -------------------------------------------------------------------------------
    def ensure(self, route: ModelRoute) -> asyncio.Task[Any]:
        """The build of `route`'s app as registered now: started on first call, the same task after; a new
        one when what the workers registered changed (the old app is dropped first)."""
        signature = self._signature_of(route)
        if route.name in self._tasks and self._built_from.get(route.name) != signature:
            log.info("model %s changed (%s): its OpenAI layer is built again", route.name, route.path)
            self._forget(route.name)
        task = self._tasks.get(route.name)
        if task is None:
            self._built_from[route.name] = signature
            task = self._tasks[route.name] = asyncio.create_task(self._run(route))
            task.add_done_callback(_retrieved)  # a failure nobody awaits is in `failed`, not an asyncio warning
        return task

    def _forget(self, name: str) -> None:
        self._tasks.pop(name, None)
        self._built_from.pop(name, None)
        self.failed.pop(name, None)
        self.apps.pop(name, None)
        self._paths.pop(name, None)
        self._served.pop(name, None)
        for alias in [a for a, owner in self._names.items() if owner == name]:
            del self._names[alias]

    async def _run(self, route: ModelRoute) -> Any:
        try:
            app = await self._build(route)
        except Exception as exc:
            if self._tasks.get(route.name) is asyncio.current_task():
                self.failed[route.name] = f"{type(exc).__name__}: {exc}"
            raise
        if self._tasks.get(route.name) is not asyncio.current_task():
            return app  # built for what was registered before: a newer build replaces it
        self.apps[route.name] = app
        self._paths[route.name] = route.path
        self._served[route.name] = served_names(app, route.name)
        self._names[route.name] = route.name  # a model's own name wins over another model's alias
        for name in self._served[route.name]:
            owner = self._names.setdefault(name, route.name)
            if owner != route.name and owner in self.catalog.serving():
                log.warning("the name %s is served by %s and %s: requests for it go to %s", name, owner,
                            route.name, owner)
            elif owner != route.name:  # its old owner is served no more (renamed): the name is this model's now
                self._names[name] = route.name
        self.first.set()
        return app

    def build_known(self) -> list[asyncio.Task[Any]]:
        """Start building every served model not (or no longer) built as registered; the builds of every
        served model. A failed model no longer served is forgotten, so it is built again when it comes back."""
        serving = self.catalog.serving()
        for name in [n for n in self.failed if n not in serving]:
            self._forget(name)
        return [self.ensure(route) for _, route in sorted(serving.items())]

    async def settle(self) -> None:
        """Wait for the builds of every model served now. A failure is that model's own (its 500), except the
        frontend's own model's, which raises: the deployment's model cannot be served."""
        while pending := [t for t in self.build_known() if not t.done()]:  # (a build replaced meanwhile: its new one)
            await asyncio.wait(pending)
        preferred = self.preferred_name()
        if preferred is not None and preferred in self.failed:
            raise self._unavailable(preferred)

    async def _wait_builds(self, timeout: float) -> None:
        pending = [t for t in self.build_known() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)  # (asyncio.wait cancels nothing on its timeout)

    # ---- choosing -------------------------------------------------------------------------------
    def preferred_name(self) -> str | None:
        """The served name of the frontend's own model while it is served (without `--model`: the first)."""
        serving = sorted(self.catalog.serving().items())
        if self.preferred_path is None:
            return serving[0][0] if serving else None
        return next((name for name, route in serving if route.path == self.preferred_path), None)

    def default_name(self) -> str | None:
        """The frontend's own model (`--model`), once built, under the name it is served by now (else the
        last it was); without `--model`, the first built by name. Never another model in its place: a
        request naming no model is for the deployment's model."""
        serving = self.catalog.serving()
        if self.preferred_path is None:
            return min((n for n in self.apps if n in serving), default=min(self.apps, default=None))
        mine = [name for name, path in self._paths.items() if path == self.preferred_path]
        return min((n for n in mine if n in serving), default=min(mine, default=None))

    def default(self) -> Any | None:
        name = self.default_name()
        return self.apps[name] if name is not None else None

    def any_app(self) -> Any | None:
        """For what names no model and is the same for every model (`GET /version`, `/ping`)."""
        return self.default() or (self.apps[min(self.apps)] if self.apps else None)

    async def any_built(self) -> Any | None:
        if not self.apps:
            await self._wait_builds(ALIAS_WAIT)
        return self.any_app()

    async def _built(self, route: ModelRoute) -> Any | None:
        """`route`'s app as registered now (a build that a newer registration replaced is waited past);
        None once the model is served no more (the gate's 503)."""
        while True:
            task = self.ensure(route)
            try:
                app = await asyncio.shield(task)
            except Exception:
                if self._tasks.get(route.name) is task:
                    raise self._unavailable(route.name) from None
                app = None
            if self._tasks.get(route.name) is task:
                return app
            current = self.catalog.serving().get(route.name)
            if current is None:
                return None
            route = current

    def _current(self, name: str) -> Any | None:
        """The app built for `name`'s registration as it is now; None when it must be built (again)."""
        route = self.catalog.serving().get(name)
        if name in self.apps and (route is None or self._built_from.get(name) == self._signature_of(route)):
            return self.apps[name]  # (no route: its workers are gone; the dispatcher says 503)
        return None

    async def for_model(self, model: str) -> Any | None:
        """The app for a request naming `model` ("" when it names none); None while nothing can answer."""
        serving = self.catalog.serving()
        if not model:  # the deployment's own model, or a 503 (None)
            preferred = self.preferred_name()
            if preferred is None:
                return self.default()
            if preferred in self.failed:
                raise self._unavailable(preferred)
            return self._current(preferred) or await self._built(serving[preferred])
        name = self._names.get(model)
        if name is not None:
            app = self._current(name)
            if app is not None:
                return app
            return await self._built(serving[name])  # registered again otherwise: never the old app
        if model in self.failed:
            raise self._unavailable(model)
        route = serving.get(model)
        if route is not None:  # registered, its app not built yet: wait for it
            return await self._built(route)
        await self._wait_builds(ALIAS_WAIT)  # an unknown name: perhaps an alias of a model being built
        if model in self._names:
            return self.apps[self._names[model]]
        return self.default() or self.any_app()  # vLLM's 404

    def _unavailable(self, model: str) -> ModelUnavailable:
        return ModelUnavailable(f"the model `{model}` is registered, but vLLM's OpenAI layer could not be built for "
                                f"it ({self.failed.get(model, 'its build failed')}); the frontend's log says more",
                                param="model")

    async def models_body(self) -> dict[str, Any]:
        """`/v1/models` over every model served now and built: vLLM's own cards from each app, the default's
        first."""
        serving = self.catalog.serving()
        first = self.default_name()
        order = sorted((n for n in self.apps if n in serving), key=lambda name: (name != first, name))
        cards: list[Any] = []
        for name in order:
            listing = await self.apps[name].state.openai_serving_models.show_available_models()
            cards += listing.data
        return {"object": "list", "data": [card.model_dump() for card in cards]}

