"""The core API every transport calls: look up models, validate requests, run them.

All request validation that does not depend on a wire format lives here, so HTTP, MQTT and
any later transport reject the same things with the same messages.

:class:`Core` is a thin facade over layers built whole in its constructor, each calling only
the one below: the :class:`~appliance.core.execution.Executor` (one request on one model
version), the :class:`~appliance.core.routing.Router` (stable or canary, through the
:class:`~appliance.core.canary.CanaryController`) and the
:class:`~appliance.core.pipelines.Pipelines` (chains of routed calls). Transports and ops
units use only this facade, never the model manager or the metrics behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry

from appliance.config import CanaryConfig, Pipeline
from appliance.core.cache import ResultCache
from appliance.core.canary import CanaryController, CanaryDecision
from appliance.core.execution import MAX_EMBED_INPUTS, Executor, TokenStream
from appliance.core.metrics import Metrics, RequestTotals
from appliance.core.models import ModelManager
from appliance.core.pipelines import Pipelines
from appliance.core.repository import ModelSpec
from appliance.core.routing import Router
from appliance.core.runtime_metrics import RuntimeCollector
from appliance.core.types import (
    DATATYPES,
    Array,
    EmbeddingResult,
    GenerateRequest,
    InferResult,
    ModelInfo,
    ModelState,
)
from appliance.errors import RequestError, UnsupportedOperation
from appliance.runtimes.base import Runtime

log = logging.getLogger(__name__)

U = TypeVar("U")


class QueueState(NamedTuple):
    """One model version's queue, as health reports it."""

    waiting: int
    running: int


class Core:
    """What transports may ask of the appliance.

    ``canary`` configures canary releases (off by default), ``pipelines`` the served
    chains, and ``rescan`` re-reads the model repository (blocking; without it
    :meth:`reload_models` is refused).
    """

    def __init__(
        self,
        models: ModelManager,
        metrics: Metrics,
        *,
        cache: ResultCache | None = None,
        canary: CanaryConfig | None = None,
        pipelines: Sequence[Pipeline] = (),
        rescan: Callable[[], list[ModelSpec]] | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.cache = cache
        self.executor = Executor(models, metrics, cache)
        self.canary = CanaryController(models, canary or CanaryConfig(), metrics)
        self.router = Router(self.executor, self.canary)
        self.pipelines = Pipelines(pipelines, models, self.router)
        self._rescan = rescan
        metrics.registry.register(RuntimeCollector(self._loaded_runtimes))
        self.started = time.time()
        self._status: dict[str, Callable[[], Mapping[str, Any]]] = {}

    async def close(self) -> None:
        """Stop background work of the layers (shadow copies of a canary)."""
        await self.canary.close()

    # -- state ------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuse new work from now on; in-flight work finishes."""
        self.executor.begin_shutdown()

    def add_status(
        self, name: str, provider: Callable[[], Mapping[str, Any]]
    ) -> Callable[[], None]:
        """Publish a lifecycle unit's state: ``provider()`` is called (on the loop, must be
        quick and JSON-ready) whenever a transport reports health, under ``name``.

        Returns a function that removes it. Transports only serialize :meth:`unit_status`.
        """
        if name in self._status:
            raise ValueError(f"a status named {name!r} is already registered")
        self._status[name] = provider

        def remove() -> None:
            self._status.pop(name, None)

        return remove

    def unit_status(self) -> dict[str, Any]:
        """Every registered unit's state, by name; a failing provider reports its error."""
        out: dict[str, Any] = {}
        for name, provider in list(self._status.items()):
            try:
                out[name] = dict(provider())
            except Exception as exc:
                log.exception("status provider %s failed", name)
                out[name] = {"error": str(exc) or type(exc).__name__}
        return out

    @property
    def ready(self) -> bool:
        """Loading is over and at least one model (or none was configured) serves."""
        if self.models.loading or self.executor.closing:
            return False
        handles = self.models.handles()
        return not handles or any(h.state is ModelState.READY for h in handles)

    @property
    def loading(self) -> bool:
        return self.models.loading

    async def wait_loaded(self) -> None:
        """Until the start-up loading is over (every model loaded, failed or deferred)."""
        await self.models.wait_loaded()

    def list_models(self, *, pipelines: bool = True) -> list[ModelInfo]:
        """Every served model (its stable version), then the pipelines unless not wanted."""
        models = [h.info() for h in self.models.handles()]
        if pipelines:
            models += self.pipelines.infos()
        return models

    def model_names(self) -> list[str]:
        """The served models' names (pipelines not included)."""
        return self.models.names()

    def queue(self, name: str) -> QueueState:
        """Requests waiting for and running on the stable version of model ``name``."""
        admission = self.models.get(name).admission
        return QueueState(admission.waiting, admission.running)

    def is_pipeline(self, name: str) -> bool:
        return self.pipelines.has(name)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a served model or pipeline (one of :meth:`list_models`)."""
        return self.models.has(name) or self.pipelines.has(name)

    def add_model_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on the loop whenever a model's state changes (it must not
        block). Returns a function that removes it."""
        return self.models.add_listener(listener)

    def add_canary_listener(self, listener: Callable[[CanaryDecision], None]) -> Callable[[], None]:
        """Call ``listener(decision)`` on the loop for every canary promotion and rollback."""
        return self.canary.add_listener(listener)

    def canary_version(self, name: str) -> str | None:
        """The version of ``name`` running as a canary now, if any."""
        return self.canary.canary_version(name)

    def canary_stats(self, name: str) -> dict[str, Any]:
        """The running canary of ``name``'s measurements so far (empty when none runs)."""
        running = self.canary.status()["running"].get(name)
        return dict(running.get("canary_stats", {})) if isinstance(running, dict) else {}

    def count_request(
        self,
        transport: str,
        route: str,
        model: str,
        status: str,
        seconds: float,
        *,
        shed: bool = False,
    ) -> None:
        """One finished request of any transport, in ``appliance_requests``; ``shed``: it
        was refused by a full queue (backpressure, also in ``appliance_requests_shed``).

        Only served models become label values: names clients make up would otherwise
        add series to /metrics without bound.
        """
        if model and not self.serves(model):
            model = ""
        self.metrics.count_request(transport, route, model, status, seconds)
        if shed:
            self.metrics.requests_shed.labels(transport, route).inc()

    def model(self, name: str, version: str | None = None) -> ModelInfo:
        if self.pipelines.has(name):
            return self.pipelines.info(name)
        return self.models.get(name, version).info()

    def versions(self, name: str) -> list[ModelInfo]:
        """Every served version of ``name``, oldest first."""
        return [h.info() for h in self.models.versions(name)]

    async def reload_models(self, *, only: str | None = None) -> None:
        """Re-read the repository (``rescan``) and hot-swap what changed; with ``only``,
        just that model."""
        if self._rescan is None:
            raise UnsupportedOperation("this appliance has no model repository to re-read")
        if only is not None and self.pipelines.has(only):
            raise RequestError(f"{only!r} is a pipeline, not a model", param="name")
        specs = await asyncio.to_thread(self._rescan)
        if only is not None and all(s.name != only for s in specs):
            self.models.get(only)  # 404 for a model that was never there
        await self.models.reload(specs, only=only)

    async def load(self, name: str, version: str | None = None) -> ModelInfo:
        """Load ``name`` now if it is not loaded (waiting at most ``load_wait``)."""
        handle = await self.models.acquire(self.models.get(name, version))
        return handle.info()

    async def unload(self, name: str) -> None:
        """Unload every version of ``name`` for an operator: no load on demand until
        :meth:`load`. In-flight requests finish first."""
        await self.models.unload(name)

    def keep_alive(self, name: str, version: str | None, seconds: float | None) -> None:
        """Set how long ``name`` stays loaded once idle (seconds; negative: forever; None:
        the configured default); 0 unloads it as soon as it is idle, as Ollama's
        ``keep_alive`` does."""
        handle = self.models.get(name, version)
        self.models.touch(handle)
        handle.keep_alive = seconds  # None: back to [models].keep_alive

    def unit_metrics(self, factory: Callable[[CollectorRegistry], U]) -> U:
        """A unit's own metrics on the daemon's registry (made on first use), e.g.
        ``core.unit_metrics(MqttMetrics)``."""
        return self.metrics.unit(factory)

    def request_totals(self) -> RequestTotals:
        """Every transport's request counts and latencies so far, as typed values."""
        return self.metrics.totals()

    def render_metrics(self) -> bytes:
        """Every metric of the daemon's registry, in the Prometheus text format."""
        return self.metrics.render()

    def lifecycle_status(self) -> dict[str, Any]:
        """Versions, what is loaded, and canaries: the "lifecycle" unit of /health."""
        models = self.models
        loaded = [h for h in models.all_handles() if h.runtime is not None]
        return {
            "loaded": [f"{h.name}:{h.version}" for h in loaded],
            "loaded_bytes": sum(h.size for h in loaded),
            "versions": {
                name: {h.version: h.state.value for h in models.versions(name)}
                for name in models.names()
            },
            "stable": {name: models.stable_version(name) for name in models.names()},
            "canary": self.canary.status(),
        }

    # -- requests ---------------------------------------------------------------------

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, Array],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferResult:
        """Validate ``inputs`` against the model's signature and run it.

        A pipeline name runs the pipeline; a model with a canary running may be answered
        by the canary (see ``appliance.core.canary``).
        """
        if self.pipelines.has(name):
            return await self.pipelines.run(name, inputs, outputs)
        return await self.router.infer(name, inputs, version=version, outputs=outputs)

    async def generate(
        self, name: str, request: GenerateRequest, *, version: str | None = None
    ) -> TokenStream:
        """Admit a generation and return its token stream (not yet started).

        Raises before anything is streamed when the request is invalid or the model busy, so
        transports can still answer with an error status; a prompt longer than the model's
        context is refused by the runtime before the first chunk.
        """
        return await self.router.generate(name, request, version=version)

    async def embed(
        self, name: str, texts: Sequence[str], *, version: str | None = None
    ) -> EmbeddingResult:
        """Embedding vectors of ``texts`` (at most ``MAX_EMBED_INPUTS``)."""
        return await self.executor.embed(name, texts, version=version)

    def _loaded_runtimes(self) -> list[tuple[str, Runtime]]:
        return [(h.name, h.runtime) for h in self.models.handles() if h.runtime is not None]


__all__ = ["DATATYPES", "MAX_EMBED_INPUTS", "Core", "QueueState", "TokenStream"]
