"""vLLM's OpenAI app for each model the deployment serves, and which one a request goes to.

`vllm serve` serves one model; a deployment may serve several (a worker's `model:` overrides the
topology's). Each model gets its own vLLM OpenAI app (its tokenizer, chat template, generation defaults
and context come from its workers' registration), built once its first worker registers, and a request
goes to the app of the model its body names (any of the model's served names). A request that names no
model goes to the default app, the frontend's own `--model` (the topology's), as `vllm serve` takes a
request without `model` for its model; while that model is not served it gets a 503, never another
model's answer in its place. A request naming a model nobody serves gets vLLM's own 404. A GET
(`/version`) goes to any app, and `/v1/models` lists every built model's cards (`models_body`), the
default's first.

A model whose app is being built when a request for it comes waits for that build (seconds: the
tokenizer), rather than getting a 404 for a model that is registered. A build that fails is logged and
that model's requests get a 500 that names it (`ModelUnavailable`); before the frontend is ready, any
failure stops it (`launcher up` reports it), as with one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from workers.frontend.catalog import Catalog, ModelRoute
from workers.frontend.errors import ModelUnavailable

log = logging.getLogger(__name__)

Builder = Callable[[ModelRoute], Awaitable[Any]]  # a served model's route -> vLLM's FastAPI app for it


def served_names(app: Any, fallback: str) -> list[str]:
    """Every name vLLM's app answers to (`--served-model-name a b`: both)."""
    models = getattr(getattr(app, "state", None), "openai_serving_models", None)
    paths = getattr(models, "base_model_paths", None) or []
    return [p.name for p in paths] or [fallback]


class ModelApps:
    def __init__(self, catalog: Catalog, build: Builder, preferred_path: str | None = None) -> None:
        self.catalog = catalog
        self._build = build
        self.preferred_path = preferred_path  # the frontend's --model: its app is the default one
        self.apps: dict[str, Any] = {}  # served name (first one) -> app
        self._names: dict[str, str] = {}  # every served name -> first served name
        self._paths: dict[str, str] = {}  # first served name -> the model its workers loaded
        self.failed: dict[str, str] = {}  # served name -> why its build failed
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self.first = asyncio.Event()  # some model's app is built: the frontend can answer

    # ---- building -------------------------------------------------------------------------------
    def ensure(self, route: ModelRoute) -> asyncio.Task[Any]:
        """The build of `route`'s app: started on first call, the same task after."""
        task = self._tasks.get(route.name)
        if task is None:
            task = self._tasks[route.name] = asyncio.create_task(self._run(route))
        return task

    async def _run(self, route: ModelRoute) -> Any:
        try:
            app = await self._build(route)
        except Exception as exc:
            self.failed[route.name] = f"{type(exc).__name__}: {exc}"
            raise
        self.apps[route.name] = app
        self._paths[route.name] = route.path
        for name in served_names(app, route.name):
            self._names.setdefault(name, route.name)
        self.first.set()
        return app

    def build_known(self) -> list[asyncio.Task[Any]]:
        """Start building every served model not started yet; the builds of every served model."""
        return [self.ensure(route) for _, route in sorted(self.catalog.serving().items())]

    async def settle(self) -> None:
        """Wait for the builds of every model served now; the first failure raises."""
        tasks = self.build_known()
        if tasks:
            await asyncio.gather(*tasks)

    # ---- choosing -------------------------------------------------------------------------------
    def default_name(self) -> str | None:
        """The frontend's own model (`--model`), once built; without one, the first built by name. Never
        another model in its place: a request naming no model is for the deployment's model, and while that
        one is not served it gets a 503, not another model's answer."""
        if self.preferred_path is None:
            return min(self.apps, default=None)
        return min((name for name, path in self._paths.items() if path == self.preferred_path), default=None)

    def default(self) -> Any | None:
        name = self.default_name()
        return self.apps[name] if name is not None else None

    def any_app(self) -> Any | None:
        """For what names no model and is the same for every model (`GET /version`, `/ping`)."""
        return self.default() or (self.apps[min(self.apps)] if self.apps else None)

    async def any_built(self) -> Any | None:
        await self._built_all()
        return self.any_app()

    async def _built_all(self) -> None:
        """Every model served now built or failed (a failure is each model's own 500, not raised here)."""
        if any(not task.done() for task in self.build_known()):
            with contextlib.suppress(Exception):
                await asyncio.shield(self.settle())

    async def for_model(self, model: str) -> Any | None:
        """The app for a request naming `model` ("" when it names none); None while nothing is built."""
        name = self._names.get(model)
        if name is not None:
            return self.apps[name]
        if model in self.failed:
            raise self._unavailable(model)
        route = self.catalog.serving().get(model)
        if model and route is not None:  # registered, its app not built yet: wait for it
            try:
                return await asyncio.shield(self.ensure(route))
            except Exception:
                raise self._unavailable(model) from None
        await self._built_all()  # an alias, or no model: once every served model is built
        if model in self._names:
            return self.apps[self._names[model]]
        if not self.apps and self.failed:
            raise self._unavailable(min(self.failed))
        return self.default() if not model else self.default() or self.any_app()  # unknown: vLLM's 404

    def _unavailable(self, model: str) -> ModelUnavailable:
        return ModelUnavailable(f"the model `{model}` is registered, but vLLM's OpenAI layer could not be built for "
                                f"it ({self.failed[model]}); the frontend's log says more", param="model")

    async def models_body(self) -> dict[str, Any]:
        """`/v1/models` over every built model: vLLM's own cards from each app, the default's first."""
        await self._built_all()
        first = self.default_name()
        order = sorted(self.apps, key=lambda name: (name != first, name))
        cards: list[Any] = []
        for name in order:
            listing = await self.apps[name].state.openai_serving_models.show_available_models()
            cards += listing.data
        return {"object": "list", "data": [card.model_dump() for card in cards]}
