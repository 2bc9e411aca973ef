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

The manager is the operator's view over parts with one job each: the version policy and
table (``appliance.core.versions``), loading, eviction and the idle janitor
(``appliance.core.loading``) and the hot-swap diff (``appliance.core.hotswap``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from appliance.config import ModelsConfig
from appliance.core.handle import ModelHandle, version_key
from appliance.core.hotswap import HotSwap
from appliance.core.loading import Loader
from appliance.core.metrics import Metrics
from appliance.core.repository import ModelSpec
from appliance.core.types import ModelState
from appliance.core.versions import CanaryHooks, VersionTable, select
from appliance.errors import ModelNotFound

log = logging.getLogger(__name__)


class ModelManager:
    """Owns every :class:`ModelHandle`; a lifecycle unit of the daemon."""

    def __init__(self, specs: Sequence[ModelSpec], config: ModelsConfig, metrics: Metrics) -> None:
        self._config = config
        self._table = VersionTable()
        self._listeners: list[Callable[[], None]] = []
        self._loader = Loader(config, metrics, self._table, self._changed)
        self._swap = HotSwap(config, self._table, self._loader, self._changed)
        self._start_up: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        for spec in select(specs, config):
            self._table.put(self._loader.handle(spec))
        for name in self._table.names():
            self._table.pick_stable(name)
        if config.preload:  # queued for the start-up loader: "loading" until their turn
            for handle in self.all_handles():
                if handle.state is ModelState.UNLOADED:
                    handle.state = ModelState.LOADING

    def attach_canary(self, hooks: CanaryHooks) -> None:
        """Let canary releases keep a stable version and take new versions as canaries."""
        self._table.canary = hooks

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
        self._start_up = asyncio.create_task(self._load_all(), name="appliance-model-loader")
        self._janitor = asyncio.create_task(
            self._loader.idle_loop(), name="appliance-model-janitor"
        )

    async def _load_all(self) -> None:
        try:
            await self._loader.load_all()
        finally:
            self._loaded.set()
            self._changed()

    async def wait_loaded(self) -> None:
        """Wait until the start-up loading is over (every model loaded, failed or deferred)."""
        await self._loaded.wait()

    @property
    def loading(self) -> bool:
        return not self._loaded.is_set()

    async def close(self) -> None:
        """Stop loading and release every runtime."""
        tasks = [t for t in (self._start_up, self._janitor) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._loader.close()

    async def ensure_loaded(self, handle: ModelHandle) -> None:
        """Load ``handle`` unless it is loaded; concurrent callers share one load."""
        await self._loader.ensure_loaded(handle)

    async def acquire(self, handle: ModelHandle) -> ModelHandle:
        """``handle`` loaded and ready, loading it on demand and waiting at most
        ``load_wait`` seconds; :class:`ModelUnavailable` otherwise."""
        return await self._loader.acquire(handle)

    def touch(self, handle: ModelHandle, keep_alive: float | None = None) -> None:
        """Mark ``handle`` used now; ``keep_alive`` (seconds, <0 forever) overrides its idle
        time from now on, as Ollama's per-request ``keep_alive`` does."""
        handle.last_used = time.monotonic()
        if keep_alive is not None:
            handle.keep_alive = keep_alive

    # -- lookup -----------------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelHandle:
        """The handle of ``name`` (its stable version unless ``version`` names one)."""
        return self._table.get(name, version)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a served model (one of :meth:`handles`)."""
        return self._table.has(name)

    def handles(self) -> list[ModelHandle]:
        """One handle per model: the stable version (what listings and health show)."""
        return self._table.handles()

    def all_handles(self) -> list[ModelHandle]:
        """Every served version of every model."""
        return self._table.all_handles()

    def versions(self, name: str) -> list[ModelHandle]:
        versions = self._table.of(name)
        if not versions:
            raise ModelNotFound(name)
        return versions

    def stable_version(self, name: str) -> str:
        return self._table.get(name).version

    def set_stable(self, name: str, version: str) -> None:
        self._table.set_stable(name, version)
        self._changed()

    def names(self) -> list[str]:
        return self._table.names()

    @property
    def policy(self) -> str:
        return self._config.version_policy

    # -- operator commands ------------------------------------------------------------

    async def reload(self, specs: Sequence[ModelSpec], *, only: str | None = None) -> None:
        """Serve what ``specs`` (a fresh repository scan) says, without dropping a request.

        With ``only``, just that model is reloaded. New and changed versions load beside the
        old ones; routing switches when they are ready; old ones close once idle.
        """
        await self._swap.reload(specs, only=only)

    async def unload(self, name: str, version: str | None = None) -> list[ModelHandle]:
        """Unload a model (every version, or one) for an operator: no load on demand until
        :meth:`load`. In-flight requests finish first."""
        handles = [self.get(name, version)] if version else self.versions(name)
        for handle in handles:
            handle.pinned_unloaded = True
            await handle.wait_idle()
            await self._loader.unload(handle)
        return handles

    async def load(self, name: str) -> None:
        """Load every served version of ``name`` now (an operator's load)."""
        for handle in self.versions(name):
            handle.pinned_unloaded = False
            if handle.state is not ModelState.FAILED:
                await self._loader.ensure_loaded(handle)

    def schedule_drop(self, handle: ModelHandle) -> None:
        """Remove one version from serving (a decided canary); closed once idle."""
        self._table.remove(handle)
        self._loader.retire(handle)
        self._table.pick_stable(handle.name)
        self._changed()

    def hold_back_newest(self) -> None:
        """Make the second newest version stable where several serve, so the newest can
        start as a canary (canary releases at start-up with version policy "all")."""
        self._table.hold_back_newest()


__all__ = ["ModelHandle", "ModelManager", "version_key"]
