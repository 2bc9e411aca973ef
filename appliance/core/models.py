"""The set of models a daemon serves, and their lifecycle.

Models load one after another in a background task once the daemon is up, so ``/health``
can say "loading" meanwhile and a large model does not compete with a small one for RAM.
A model that fails to load is kept with its reason; the others serve on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from appliance.config import ModelsConfig
from appliance.core.admission import Admission
from appliance.core.metrics import Metrics
from appliance.core.repository import ModelSpec, verify_file
from appliance.core.types import Capability, ModelInfo, ModelState, Signature
from appliance.errors import ModelNotFound, ModelUnavailable
from appliance.runtimes import backend_installed, runtime_class
from appliance.runtimes.base import Runtime

log = logging.getLogger(__name__)

_BACKEND_PACKAGES = {"gguf": "llama-cpp-python (pip install 'appliance[gguf]')"}


class ModelHandle:
    """One model: its spec, state, runtime once loaded, and request queue."""

    def __init__(self, spec: ModelSpec, admission: Admission) -> None:
        self.spec = spec
        self.admission = admission
        self.state = ModelState.FAILED if spec.problem else ModelState.LOADING
        self.error: str | None = spec.problem
        self.runtime: Runtime | None = None
        try:
            stat = spec.path.stat()
            self.created, self.size = int(stat.st_mtime), stat.st_size
        except OSError:
            self.created = self.size = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def ready_runtime(self) -> Runtime:
        """The runtime, or :class:`ModelUnavailable` if the model is not serving."""
        if self.state is not ModelState.READY or self.runtime is None:
            raise ModelUnavailable(self.name, self.state.value, self.error)
        return self.runtime

    def info(self) -> ModelInfo:
        runtime = self.runtime if self.state is ModelState.READY else None
        return ModelInfo(
            name=self.name,
            version=self.spec.version,
            runtime=self.spec.runtime,
            state=self.state,
            description=self.spec.description,
            error=self.error,
            capabilities=runtime.capabilities if runtime else frozenset[Capability](),
            signature=runtime.signature if runtime else Signature(),
            context_length=runtime.context_length if runtime else None,
            created=self.created,
            size=self.size,
        )


class ModelManager:
    """Owns every :class:`ModelHandle`; a lifecycle unit of the daemon."""

    def __init__(self, specs: Sequence[ModelSpec], config: ModelsConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._handles: dict[str, ModelHandle] = {}
        for spec in specs:
            parallel = spec.options.parallel or config.parallel
            if spec.problem is None:
                limit = runtime_class(spec.runtime).max_parallel
                if limit is not None and parallel > limit:
                    log.info("model %s: %s runs %d request(s) at a time", spec.name,
                             spec.runtime, limit)
                    parallel = limit
            queue = spec.options.queue_size
            admission = Admission(
                spec.name,
                parallel=parallel,
                queue_size=config.queue_size if queue is None else queue,
                retry_after=config.retry_after,
                on_change=self._queue_changed,
            )
            handle = ModelHandle(spec, admission)
            self._handles[spec.name] = handle
            metrics.model_ready.labels(spec.name).set(0)
            if spec.problem:
                metrics.model_load_failures.labels(spec.name).inc()
        self._loader: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def _queue_changed(self, admission: Admission) -> None:
        self._metrics.queue_depth.labels(admission.name).set(admission.waiting)
        self._metrics.running.labels(admission.name).set(admission.running)

    def add_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` on the loop whenever a model's state changes.

        Listeners must not block (schedule work instead). Returns a function that removes it.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("model state listener failed")

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start loading every model in the background."""
        self._loader = asyncio.create_task(self._load_all(), name="appliance-model-loader")

    async def wait_loaded(self) -> None:
        """Wait until every model has either loaded or failed."""
        await self._loaded.wait()

    @property
    def loading(self) -> bool:
        return not self._loaded.is_set()

    async def close(self) -> None:
        """Stop loading and release every runtime."""
        if self._loader is not None:
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        for handle in self._handles.values():
            runtime, handle.runtime = handle.runtime, None
            handle.state = ModelState.UNLOADED
            if runtime is not None:
                try:
                    await runtime.close()
                except Exception:
                    log.exception("model %s: error while unloading", handle.name)

    async def _load_all(self) -> None:
        try:
            for handle in self._handles.values():
                if handle.state is ModelState.LOADING:
                    await self._load(handle)
                    self._changed()
        finally:
            self._loaded.set()
            self._changed()

    async def _load(self, handle: ModelHandle) -> None:
        spec = handle.spec
        started = time.monotonic()
        runtime: Runtime | None = None
        try:
            if not backend_installed(spec.runtime):
                package = _BACKEND_PACKAGES.get(spec.runtime, spec.runtime)
                raise RuntimeError(f"the {spec.runtime} backend is not installed: {package}")
            await asyncio.to_thread(verify_file, spec)
            cls = runtime_class(spec.runtime)
            runtime = cls(spec.name, spec.path, spec.options, workers=handle.admission.parallel)
            await runtime.load()
        except asyncio.CancelledError:
            if runtime is not None:
                await runtime.close()
            raise
        except Exception as exc:
            handle.state = ModelState.FAILED
            handle.error = str(exc) or type(exc).__name__
            self._metrics.model_load_failures.labels(spec.name).inc()
            log.error("model %s failed to load: %s", spec.name, handle.error)
            if runtime is not None:
                await runtime.close()
            return
        handle.runtime = runtime
        handle.state = ModelState.READY
        elapsed = time.monotonic() - started
        self._metrics.model_ready.labels(spec.name).set(1)
        self._metrics.model_load_seconds.labels(spec.name).set(elapsed)
        log.info("model %s (%s, version %s) ready in %.2fs", spec.name, spec.runtime,
                 spec.version, elapsed)

    # -- lookup -----------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelHandle:
        handle = self._handles.get(name)
        if handle is None or (version is not None and version != handle.spec.version):
            raise ModelNotFound(name, version)
        return handle

    def handles(self) -> list[ModelHandle]:
        return list(self._handles.values())
