"""Loading and unloading model versions: on demand, at start-up, for room, when idle.

A :class:`Loader` owns every runtime the daemon holds. It loads a version when a request
needs it (concurrent callers share one load, waiting at most ``load_wait``), evicts the
least recently used idle versions when ``max_loaded`` or ``memory_budget`` would be
exceeded, unloads versions idle past their keep-alive (the janitor), and closes retired
versions once their last admitted request is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from appliance.config import ModelsConfig
from appliance.core.handle import ModelHandle
from appliance.core.metrics import Metrics
from appliance.core.repository import ModelSpec, verify_file
from appliance.core.types import ModelState
from appliance.core.versions import VersionTable
from appliance.errors import ModelUnavailable
from appliance.runtimes import backend_installed, runtime_class
from appliance.runtimes.base import Runtime

log = logging.getLogger(__name__)

_BACKEND_PACKAGES = {"gguf": "llama-cpp-python (pip install 'appliance[gguf]')"}
_TICK = 0.5  # seconds between idle checks, at most


class Loader:
    """Loads, evicts and unloads the versions of a :class:`VersionTable`; ``changed()`` is
    called after every state change."""

    def __init__(
        self,
        config: ModelsConfig,
        metrics: Metrics,
        table: VersionTable,
        changed: Callable[[], None],
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._table = table
        self._changed = changed
        self.retiring: set[ModelHandle] = set()  # out of routing, closed once idle
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Future[None]] = set()

    def handle(self, spec: ModelSpec) -> ModelHandle:
        """A new (unloaded) handle of ``spec``, its queue sized by the configuration."""
        config = self._config
        parallel = spec.options.parallel or config.parallel or 1
        if spec.problem is None:
            cls = runtime_class(spec.runtime)
            parallel = spec.options.parallel or config.parallel or cls.default_parallel()
            limit = cls.max_parallel
            if limit is not None and parallel > limit:
                log.info(
                    "model %s: %s runs %d request(s) at a time", spec.name, spec.runtime, limit
                )
                parallel = limit
        queue = spec.options.queue_size
        handle = ModelHandle(
            spec,
            parallel=parallel,
            queue_size=config.queue_size if queue is None else queue,
            retry_after=config.retry_after,
        )
        self._metrics.model_ready.labels(spec.name).set(0)
        name, table = spec.name, self._table  # its queues: every version's, retiring too
        self._metrics.watch_queues(
            name, lambda: [h.admission for h in [*table.of(name), *self.retiring] if h.name == name]
        )
        if spec.problem:
            self._metrics.model_load_failures.labels(spec.name).inc()
        return handle

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``work`` in the background, cancelled by :meth:`close`."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel background loads and drains; release every runtime."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in [*self._table.all_handles(), *self.retiring]:
            await self.unload(handle)
        await asyncio.gather(*self._closing, return_exceptions=True)

    # -- loading ----------------------------------------------------------------------

    async def load_all(self) -> None:
        """The start-up loading: queued versions, as far as the limits allow without
        evicting; the others load on first use."""
        for handle in self._table.all_handles():
            if handle.state is not ModelState.LOADING:
                continue
            if self._fits_without_eviction(handle):
                await self.ensure_loaded(handle)
                self._changed()
            else:
                handle.state = ModelState.UNLOADED  # loads on first use

    def _fits_without_eviction(self, handle: ModelHandle) -> bool:
        loaded = [h for h in self._table.all_handles() if h.runtime is not None]
        limit, budget = self._config.max_loaded, self._config.memory_budget
        if limit and len(loaded) + 1 > limit:
            return False
        return not (budget and sum(h.size for h in loaded) + handle.size > budget)

    async def acquire(self, handle: ModelHandle) -> ModelHandle:
        """``handle`` loaded and ready, loading it on demand and waiting at most
        ``load_wait`` seconds; :class:`ModelUnavailable` otherwise."""
        if handle.state is ModelState.READY:
            handle.last_used = time.monotonic()
            return handle
        if handle.state is ModelState.FAILED or handle.pinned_unloaded or handle.retired:
            raise ModelUnavailable(handle.name, handle.state.value, handle.error)
        task = self.spawn(self.ensure_loaded(handle), f"appliance-load-{handle.name}")
        try:
            await asyncio.wait_for(asyncio.shield(task), self._config.load_wait)
        except asyncio.TimeoutError:
            raise ModelUnavailable(
                handle.name, handle.state.value, f"still loading after {self._config.load_wait:g}s"
            ) from None
        handle.ready_runtime()
        handle.last_used = time.monotonic()
        return handle

    async def ensure_loaded(self, handle: ModelHandle) -> None:
        """Load ``handle`` unless it is loaded; concurrent callers share one load."""
        if handle.state is ModelState.READY:
            return
        async with handle.load_lock:
            if handle.state in (ModelState.READY, ModelState.FAILED):
                return
            await self._make_room(handle)
            handle.state = ModelState.LOADING
            self._changed()
            await self._load(handle)
            self._table.pick_stable(handle.name)
            self._changed()

    async def _make_room(self, handle: ModelHandle) -> None:
        """Unload least recently used idle models until ``handle`` fits the limits."""
        limit, budget = self._config.max_loaded, self._config.memory_budget
        deadline = time.monotonic() + self._config.load_wait
        while True:
            loaded = [
                h
                for h in [*self._table.all_handles(), *self.retiring]
                if h.runtime is not None and h is not handle
            ]
            over_count = bool(limit) and len(loaded) + 1 > limit
            over_bytes = bool(budget) and sum(h.size for h in loaded) + handle.size > budget
            if not (over_count or over_bytes):
                return
            idle = sorted((h for h in loaded if not h.busy), key=lambda h: h.last_used)
            if idle:
                victim = idle[0]
                log.info(
                    "model %s version %s: unloading (least recently used) to make room for %s",
                    victim.name,
                    victim.version,
                    handle.name,
                )
                self._metrics.model_evictions.labels(victim.name, "lru").inc()
                await self.unload(victim)
                continue
            if time.monotonic() > deadline:
                raise ModelUnavailable(
                    handle.name, "unloaded", "the memory budget is taken by busy models"
                )
            await asyncio.sleep(0.05)

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
            handle.state = ModelState.UNLOADED
            raise
        except Exception as exc:
            handle.state = ModelState.FAILED
            handle.error = str(exc) or type(exc).__name__
            self._metrics.model_load_failures.labels(spec.name).inc()
            log.error(
                "model %s version %s failed to load: %s", spec.name, spec.version, handle.error
            )
            if runtime is not None:
                await runtime.close()
            return
        handle.runtime = runtime
        handle.remember(runtime)
        handle.state = ModelState.READY
        handle.error = None
        handle.last_used = time.monotonic()
        elapsed = time.monotonic() - started
        self._metrics.model_ready.labels(spec.name).set(1)
        self._metrics.model_load_seconds.labels(spec.name).set(elapsed)
        log.info(
            "model %s (%s, version %s) ready in %.2fs",
            spec.name,
            spec.runtime,
            spec.version,
            elapsed,
        )

    # -- unloading --------------------------------------------------------------------

    async def unload(self, handle: ModelHandle) -> None:
        """Close ``handle``'s runtime now (a failed version stays failed)."""
        runtime, handle.runtime = handle.runtime, None
        if handle.state is not ModelState.FAILED:
            handle.state = ModelState.UNLOADED
        if not any(h.runtime is not None for h in self._table.of(handle.name)):
            self._metrics.model_ready.labels(handle.name).set(0)
        if runtime is not None:
            # A close runs to its end even when its caller is cancelled (the janitor, on
            # shutdown): :meth:`close` waits for it, so no worker thread outlives the core.
            closing = asyncio.ensure_future(runtime.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            try:
                await asyncio.shield(closing)
            except Exception:
                log.exception("model %s: error while unloading", handle.name)
            log.info("model %s version %s unloaded", handle.name, handle.version)
        self._changed()

    def retire(self, handle: ModelHandle) -> None:
        """Out of routing now; closed once its admitted requests are done."""
        handle.retired = True
        self.retiring.add(handle)
        self.spawn(self._drain(handle), f"appliance-retire-{handle.name}")

    async def _drain(self, handle: ModelHandle) -> None:
        try:
            await handle.wait_idle()
            await self.unload(handle)
        finally:
            self.retiring.discard(handle)

    async def idle_loop(self) -> None:
        """The janitor: unload versions unused for their keep-alive, forever."""
        while True:
            await asyncio.sleep(self._tick())
            now = time.monotonic()
            for handle in self._table.all_handles():
                keep = (
                    handle.keep_alive
                    if handle.keep_alive is not None
                    else (self._config.keep_alive)
                )
                if keep < 0 or handle.runtime is None or handle.busy:
                    continue
                if now - handle.last_used >= keep:
                    log.info(
                        "model %s version %s idle for %.1fs: unloading",
                        handle.name,
                        handle.version,
                        now - handle.last_used,
                    )
                    self._metrics.model_evictions.labels(handle.name, "idle").inc()
                    await self.unload(handle)

    def _tick(self) -> float:
        values = [self._config.keep_alive] + [
            h.keep_alive for h in self._table.all_handles() if h.keep_alive is not None
        ]
        positive = [v for v in values if v >= 0]
        return min([_TICK] + [max(0.02, v / 4) for v in positive])


__all__ = ["Loader"]
