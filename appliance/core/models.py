"""The set of models a daemon serves, and their lifecycle.

Every model version is a :class:`ModelHandle`. Which versions serve is the version policy's
choice (``[models].version_policy``); requests that name no version go to the model's
*stable* version, or now and then to a canary (``appliance.core.canary``).

Lifecycle:

- **Start.** Models load one after another in a background task once the daemon is up
  (``/health`` says "loading" meanwhile), as far as the memory budget allows; with
  ``preload = false`` (or beyond the budget) they load on first use.
- **On demand.** A request for an unloaded model loads it; requests for a model being loaded
  wait up to ``load_wait`` seconds instead of failing. Loading evicts the least recently used
  idle models first when ``max_loaded`` or ``memory_budget`` would be exceeded.
- **Idle unload.** A model unused for its keep-alive (``[models].keep_alive``, or a
  per-request value such as Ollama's ``keep_alive``) is unloaded; the next request loads it.
- **Hot swap.** :meth:`ModelManager.reload` takes a fresh scan of the repository: new
  versions load beside the old ones and take over only once ready; a version that fails to
  load leaves the old one serving; removed or replaced versions leave routing at once and
  are closed only after their last admitted request finished, so nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
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
_TICK = 0.5  # seconds between idle checks, at most


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``2`` before ``10`` and ``1.2`` before ``1.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


class ModelHandle:
    """One model version: its spec, state, runtime once loaded, and request queue."""

    def __init__(self, spec: ModelSpec, admission: Admission) -> None:
        self.spec = spec
        self.admission = admission
        self.state = ModelState.FAILED if spec.problem else ModelState.UNLOADED
        self.error: str | None = spec.problem
        self.runtime: Runtime | None = None
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None  # per-model override; None: the configured one
        self.pinned_unloaded = False  # unloaded by an operator: no load on demand
        self.retired = False  # left routing; closed once idle
        self._ready = asyncio.Event()
        self.idle = asyncio.Event()
        self._known: tuple[frozenset[Capability], Signature, int | None] = (
            frozenset(), Signature(), None)
        self._lock = asyncio.Lock()  # one load at a time
        try:
            stat = spec.path.stat()
            self.created, self.size = int(stat.st_mtime), stat.st_size
        except OSError:
            self.created = self.size = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def busy(self) -> bool:
        """Requests are admitted (running or queued) on this version."""
        return self.admission.running + self.admission.waiting > 0

    async def wait_idle(self) -> None:
        """Until no request is admitted on this version."""
        if self.busy:
            self.idle.clear()  # set again by the admission's change hook once empty
            await self.idle.wait()

    def ready_runtime(self) -> Runtime:
        """The runtime, or :class:`ModelUnavailable` if the model is not serving."""
        if self.state is not ModelState.READY or self.runtime is None:
            raise ModelUnavailable(self.name, self.state.value, self.error)
        return self.runtime

    def remember(self, runtime: Runtime) -> None:
        """Keep what the loaded model said about itself, for when it is unloaded again."""
        self._known = (runtime.capabilities, runtime.signature, runtime.context_length)

    def info(self) -> ModelInfo:
        # An idle-unloaded model still describes itself: it loads again on the next request.
        capabilities, signature, context = self._known
        return ModelInfo(
            name=self.name,
            version=self.spec.version,
            runtime=self.spec.runtime,
            state=self.state,
            description=self.spec.description,
            error=self.error,
            capabilities=capabilities,
            signature=signature,
            context_length=context,
            created=self.created,
            size=self.size,
        )


class ModelManager:
    """Owns every :class:`ModelHandle`; a lifecycle unit of the daemon."""

    def __init__(self, specs: Sequence[ModelSpec], config: ModelsConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        # name -> version -> handle, for every version the policy serves.
        self._versions: dict[str, dict[str, ModelHandle]] = {}
        # name -> the version requests without a version go to.
        self._stable: dict[str, str] = {}
        self._retiring: set[ModelHandle] = set()
        self._listeners: list[Callable[[], None]] = []
        self._loader: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loaded = asyncio.Event()
        self._install(self._select(specs))
        if config.preload:  # queued for the start-up loader: "loading" until their turn
            for handle in self.all_handles():
                if handle.state is ModelState.UNLOADED:
                    handle.state = ModelState.LOADING

    # -- building ---------------------------------------------------------------------

    def _select(self, specs: Sequence[ModelSpec]) -> list[ModelSpec]:
        """The specs the version policy serves."""
        policy = self._config.version_policy
        wanted: dict[str, set[str]] = {}
        for item in self._config.versions:
            name, _, version = item.partition(":")
            wanted.setdefault(name, set()).add(version)
        by_name: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            by_name.setdefault(spec.name, []).append(spec)
        out: list[ModelSpec] = []
        for name, group in by_name.items():
            group.sort(key=lambda s: version_key(s.version))
            if policy == "all":
                out += group
            elif policy == "specific" and name in wanted:
                out += [s for s in group if s.version in wanted[name]]
            else:
                out.append(group[-1])
        return out

    def _handle(self, spec: ModelSpec) -> ModelHandle:
        config = self._config
        parallel = spec.options.parallel or config.parallel
        if spec.problem is None:
            limit = runtime_class(spec.runtime).max_parallel
            if limit is not None and parallel > limit:
                log.info("model %s: %s runs %d request(s) at a time", spec.name,
                         spec.runtime, limit)
                parallel = limit
        queue = spec.options.queue_size
        holder: list[ModelHandle] = []

        def queue_changed(admission: Admission) -> None:
            if holder and not holder[0].busy:
                holder[0].idle.set()

        admission = Admission(
            spec.name,
            parallel=parallel,
            queue_size=config.queue_size if queue is None else queue,
            retry_after=config.retry_after,
            on_change=queue_changed,
        )
        self._metrics.model_ready.labels(spec.name).set(0)
        name = spec.name  # its queues: every version's, retiring ones included
        self._metrics.watch_queues(name, lambda: [
            h.admission for h in [*self._versions.get(name, {}).values(), *self._retiring]
            if h.name == name])
        if spec.problem:
            self._metrics.model_load_failures.labels(spec.name).inc()
        holder.append(ModelHandle(spec, admission))
        return holder[0]

    def _install(self, specs: Sequence[ModelSpec]) -> None:
        for spec in specs:
            self._versions.setdefault(spec.name, {})[spec.version] = self._handle(spec)
        for name in self._versions:
            self._pick_stable(name)

    def _pick_stable(self, name: str, *, newest: bool = False) -> None:
        """Keep the stable version while it can serve; else (or with ``newest``, unless a
        canary runs) the newest version that can."""
        versions = self._versions.get(name, {})
        if not versions:
            self._stable.pop(name, None)
            return
        current = self._stable.get(name)
        if current in versions and versions[current].state is not ModelState.FAILED and (
            not newest or self._canary_of(name) is not None
        ):
            return
        ordered = sorted(versions, key=version_key)
        usable = [v for v in ordered if versions[v].state is not ModelState.FAILED]
        self._stable[name] = (usable or ordered)[-1]

    # Hooks the canary controller sets: the canary version of a model, if one runs; and
    # "a new version replaces the stable one" (True: a canary starts, keep both).
    canary_of: Callable[[str], str | None] | None = None
    on_new_version: Callable[[ModelHandle, ModelHandle], bool] | None = None

    def _canary_of(self, name: str) -> str | None:
        return self.canary_of(name) if self.canary_of is not None else None

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
        """Start loading the models in the background, and the idle janitor."""
        self._loader = asyncio.create_task(self._load_all(), name="appliance-model-loader")
        self._janitor = asyncio.create_task(self._idle_loop(), name="appliance-model-janitor")

    async def wait_loaded(self) -> None:
        """Wait until the start-up loading is over (every model loaded, failed or deferred)."""
        await self._loaded.wait()

    @property
    def loading(self) -> bool:
        return not self._loaded.is_set()

    async def close(self) -> None:
        """Stop loading and release every runtime."""
        for task in [self._loader, self._janitor, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._loader, self._janitor, *self._tasks] if t),
                             return_exceptions=True)
        for handle in [*self.all_handles(), *self._retiring]:
            await self._unload(handle, state=ModelState.UNLOADED)

    async def _load_all(self) -> None:
        try:
            for handle in self.all_handles():
                if handle.state is not ModelState.LOADING:
                    continue
                if self._fits_without_eviction(handle):
                    await self.ensure_loaded(handle)
                    self._changed()
                else:
                    handle.state = ModelState.UNLOADED  # loads on first use
        finally:
            self._loaded.set()
            self._changed()

    def _fits_without_eviction(self, handle: ModelHandle) -> bool:
        loaded = [h for h in self.all_handles() if h.runtime is not None]
        limit, budget = self._config.max_loaded, self._config.memory_budget
        if limit and len(loaded) + 1 > limit:
            return False
        return not (budget and sum(h.size for h in loaded) + handle.size > budget)

    async def ensure_loaded(self, handle: ModelHandle) -> None:
        """Load ``handle`` unless it is loaded; concurrent callers share one load."""
        if handle.state is ModelState.READY:
            return
        async with handle._lock:
            if handle.state in (ModelState.READY, ModelState.FAILED):
                return
            await self._make_room(handle)
            handle.state = ModelState.LOADING
            self._changed()
            await self._load(handle)
            self._pick_stable(handle.name)
            self._changed()

    async def _make_room(self, handle: ModelHandle) -> None:
        """Unload least recently used idle models until ``handle`` fits the limits."""
        limit, budget = self._config.max_loaded, self._config.memory_budget
        deadline = time.monotonic() + self._config.load_wait
        while True:
            loaded = [h for h in [*self.all_handles(), *self._retiring]
                      if h.runtime is not None and h is not handle]
            over_count = bool(limit) and len(loaded) + 1 > limit
            over_bytes = bool(budget) and sum(h.size for h in loaded) + handle.size > budget
            if not (over_count or over_bytes):
                return
            idle = sorted((h for h in loaded if not h.busy), key=lambda h: h.last_used)
            if idle:
                victim = idle[0]
                log.info("model %s version %s: unloading (least recently used) to make room "
                         "for %s", victim.name, victim.version, handle.name)
                self._metrics.model_evictions.labels(victim.name, "lru").inc()
                await self._unload(victim, state=ModelState.UNLOADED)
                continue
            if time.monotonic() > deadline:
                raise ModelUnavailable(handle.name, "unloaded",
                                       "the memory budget is taken by busy models")
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
            log.error("model %s version %s failed to load: %s", spec.name, spec.version,
                      handle.error)
            if runtime is not None:
                await runtime.close()
            handle._ready.set()
            return
        handle.runtime = runtime
        handle.remember(runtime)
        handle.state = ModelState.READY
        handle.error = None
        handle.last_used = time.monotonic()
        handle._ready.set()
        elapsed = time.monotonic() - started
        self._metrics.model_ready.labels(spec.name).set(1)
        self._metrics.model_load_seconds.labels(spec.name).set(elapsed)
        log.info("model %s (%s, version %s) ready in %.2fs", spec.name, spec.runtime,
                 spec.version, elapsed)

    async def _unload(self, handle: ModelHandle, *, state: ModelState) -> None:
        runtime, handle.runtime = handle.runtime, None
        if handle.state is not ModelState.FAILED:
            handle.state = state
        handle._ready.clear()
        if not any(h.runtime is not None for h in self._versions.get(handle.name, {}).values()):
            self._metrics.model_ready.labels(handle.name).set(0)
        if runtime is not None:
            try:
                await runtime.close()
            except Exception:
                log.exception("model %s: error while unloading", handle.name)
            log.info("model %s version %s unloaded", handle.name, handle.version)
        self._changed()

    # -- idle unload ------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick())
            now = time.monotonic()
            for handle in self.all_handles():
                keep = handle.keep_alive if handle.keep_alive is not None else (
                    self._config.keep_alive)
                if keep < 0 or handle.runtime is None or handle.busy:
                    continue
                if now - handle.last_used >= keep:
                    log.info("model %s version %s idle for %.1fs: unloading", handle.name,
                             handle.version, now - handle.last_used)
                    self._metrics.model_evictions.labels(handle.name, "idle").inc()
                    await self._unload(handle, state=ModelState.UNLOADED)

    def _tick(self) -> float:
        values = [self._config.keep_alive] + [
            h.keep_alive for h in self.all_handles() if h.keep_alive is not None
        ]
        positive = [v for v in values if v >= 0]
        return min([_TICK] + [max(0.02, v / 4) for v in positive])

    def touch(self, handle: ModelHandle, keep_alive: float | None = None) -> None:
        """Mark ``handle`` used now; ``keep_alive`` (seconds, <0 forever) overrides its idle
        time from now on, as Ollama's per-request ``keep_alive`` does."""
        handle.last_used = time.monotonic()
        if keep_alive is not None:
            handle.keep_alive = keep_alive

    # -- lookup -----------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelHandle:
        """The handle of ``name`` (its stable version unless ``version`` names one)."""
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFound(name, version)
        if version is None:
            return versions[self._stable[name]]
        handle = versions.get(version)
        if handle is None:
            raise ModelNotFound(name, version)
        return handle

    async def acquire(self, handle: ModelHandle) -> ModelHandle:
        """``handle`` loaded and ready, loading it on demand and waiting at most
        ``load_wait`` seconds; :class:`ModelUnavailable` otherwise."""
        if handle.state is ModelState.READY:
            handle.last_used = time.monotonic()
            return handle
        if handle.state is ModelState.FAILED or handle.pinned_unloaded or handle.retired:
            raise ModelUnavailable(handle.name, handle.state.value, handle.error)
        try:
            await asyncio.wait_for(asyncio.shield(self._load_task(handle)),
                                   self._config.load_wait)
        except asyncio.TimeoutError:
            raise ModelUnavailable(handle.name, handle.state.value,
                                   f"still loading after {self._config.load_wait:g}s") from None
        handle.ready_runtime()
        handle.last_used = time.monotonic()
        return handle

    def _load_task(self, handle: ModelHandle) -> asyncio.Task[None]:
        task = asyncio.create_task(self.ensure_loaded(handle),
                                   name=f"appliance-load-{handle.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def has(self, name: str) -> bool:
        """Whether ``name`` is a served model (one of :meth:`handles`)."""
        return name in self._stable

    def handles(self) -> list[ModelHandle]:
        """One handle per model: the stable version (what listings and health show)."""
        return [self._versions[name][version] for name, version in self._stable.items()]

    def all_handles(self) -> list[ModelHandle]:
        """Every served version of every model."""
        return [h for versions in self._versions.values() for h in versions.values()]

    def versions(self, name: str) -> list[ModelHandle]:
        versions = self._versions.get(name)
        if not versions:
            raise ModelNotFound(name)
        return [versions[v] for v in sorted(versions, key=version_key)]

    def stable_version(self, name: str) -> str:
        self.get(name)
        return self._stable[name]

    def set_stable(self, name: str, version: str) -> None:
        self.get(name, version)
        self._stable[name] = version
        self._changed()

    # -- hot swap ---------------------------------------------------------------------

    async def reload(self, specs: Sequence[ModelSpec], *, only: str | None = None) -> None:
        """Serve what ``specs`` (a fresh repository scan) says, without dropping a request.

        With ``only``, just that model is reloaded. New and changed versions load beside the
        old ones; routing switches when they are ready; old ones close once idle.
        """
        selected = [s for s in self._select(specs) if only is None or s.name == only]
        new: dict[tuple[str, str], ModelSpec] = {(s.name, s.version): s for s in selected}
        current = {(h.name, h.version): h for h in self.all_handles()
                   if only is None or h.name == only}
        loads: list[ModelHandle] = []
        for key, spec in new.items():
            old = current.get(key)
            if old is not None and old.spec == spec and old.state is not ModelState.FAILED:
                old.pinned_unloaded = False
                if old.state is ModelState.UNLOADED:
                    loads.append(old)
                continue
            handle = self._handle(spec)
            loads.append(handle)
            if old is None:
                self._versions.setdefault(spec.name, {})[spec.version] = handle
                if spec.name not in self._stable:
                    self._stable[spec.name] = spec.version
        # Load replacements before they take over; a failed one leaves the old serving.
        for handle in loads:
            if handle.state is ModelState.FAILED:
                continue
            await self.ensure_loaded(handle)
            key = (handle.name, handle.version)
            old = current.get(key)
            if old is not None and old is not handle:
                if handle.state is ModelState.READY or old.state is ModelState.FAILED:
                    self._versions[handle.name][handle.version] = handle
                    self._retire(old)
                else:
                    log.error("model %s version %s: the new file failed to load (%s); the "
                              "old one keeps serving", handle.name, handle.version, handle.error)
                    old.error = f"reload failed: {handle.error}"
        for key, old in current.items():
            if key not in new:
                newer = [self._versions[old.name][v] for (n, v) in new if n == old.name]
                if old.state is not ModelState.FAILED and not any(
                    h.state is ModelState.READY for h in newer
                ):
                    # Every new version of this model failed: the old one keeps serving.
                    old.error = "newer version failed to load; still serving this one"
                    continue
                if (old.state is ModelState.READY and self.on_new_version is not None
                        and old.version == self._stable.get(old.name)):
                    candidate = max((h for h in newer if h.state is ModelState.READY),
                                    key=lambda h: version_key(h.version))
                    if self.on_new_version(old, candidate):
                        continue  # a canary compares them; it retires the loser
                del self._versions[old.name][old.version]
                if not self._versions[old.name]:
                    del self._versions[old.name]
                self._retire(old)
        for name in {n for n, _ in [*new, *current]}:
            if self._stable.get(name) not in self._versions.get(name, {}):
                self._stable.pop(name, None)
            self._pick_stable(name, newest=True)
        self._changed()

    def _retire(self, handle: ModelHandle) -> None:
        """Out of routing now; closed once its admitted requests are done."""
        handle.retired = True
        self._retiring.add(handle)
        task = asyncio.create_task(self._drain(handle), name=f"appliance-retire-{handle.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, handle: ModelHandle) -> None:
        try:
            await handle.wait_idle()
            await self._unload(handle, state=ModelState.UNLOADED)
        finally:
            self._retiring.discard(handle)

    async def unload(self, name: str, version: str | None = None) -> list[ModelHandle]:
        """Unload a model (every version, or one) for an operator: no load on demand until
        :meth:`load`. In-flight requests finish first."""
        handles = [self.get(name, version)] if version else self.versions(name)
        for handle in handles:
            handle.pinned_unloaded = True
            await handle.wait_idle()
            await self._unload(handle, state=ModelState.UNLOADED)
        return handles

    async def load(self, name: str) -> None:
        """Load every served version of ``name`` now (an operator's load)."""
        for handle in self.versions(name):
            handle.pinned_unloaded = False
            if handle.state is not ModelState.FAILED:
                await self.ensure_loaded(handle)

    def schedule_drop(self, handle: ModelHandle) -> None:
        """Remove one version from serving (a decided canary); closed once idle."""
        with contextlib.suppress(KeyError):
            del self._versions[handle.name][handle.version]
        self._retire(handle)
        self._pick_stable(handle.name)
        self._changed()

    def hold_back_newest(self) -> None:
        """Make the second newest version stable where several serve, so the newest can
        start as a canary (canary releases at start-up with version policy "all")."""
        for name, versions in self._versions.items():
            usable = [v for v in sorted(versions, key=version_key)
                      if versions[v].state is not ModelState.FAILED]
            if len(usable) >= 2:
                self._stable[name] = usable[-2]

    def names(self) -> list[str]:
        return list(self._versions)

    @property
    def policy(self) -> str:
        return self._config.version_policy
