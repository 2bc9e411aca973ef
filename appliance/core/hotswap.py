"""Hot swap: serve what a fresh repository scan says, without dropping a request.

New and changed versions load beside the old ones and take over only once ready; a version
that fails to load leaves the old one serving; removed or replaced versions leave routing
at once and are closed only after their last admitted request finished. Where a canary
release is on, a newer version of a model starts as a canary instead of taking over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from appliance.config import ModelsConfig
from appliance.core.handle import ModelHandle, version_key
from appliance.core.loading import Loader
from appliance.core.repository import ModelSpec
from appliance.core.types import ModelState
from appliance.core.versions import VersionTable, select

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (name, version)


class HotSwap:
    """Applies repository scans to a :class:`VersionTable` through a :class:`Loader`."""

    def __init__(
        self, config: ModelsConfig, table: VersionTable, loader: Loader, changed: Callable[[], None]
    ) -> None:
        self._config = config
        self._table = table
        self._loader = loader
        self._changed = changed

    async def reload(self, specs: Sequence[ModelSpec], *, only: str | None = None) -> None:
        """Serve what ``specs`` says (with ``only``, for that model alone)."""
        selected = [s for s in select(specs, self._config) if only is None or s.name == only]
        new: dict[Key, ModelSpec] = {(s.name, s.version): s for s in selected}
        current = {
            (h.name, h.version): h
            for h in self._table.all_handles()
            if only is None or h.name == only
        }
        # Load replacements before they take over; a failed one leaves the old serving.
        for handle in self._plan(new, current):
            await self._bring_in(handle, current.get((handle.name, handle.version)))
        for key, old in current.items():
            if key not in new:
                self._phase_out(old, new)
        for name in {n for n, _ in [*new, *current]}:
            self._table.pick_stable(name, newest=True)
        self._changed()

    def _plan(
        self, new: Mapping[Key, ModelSpec], current: Mapping[Key, ModelHandle]
    ) -> list[ModelHandle]:
        """The handles to load: unchanged ones that are unloaded, and new ones (a new
        version serves at once; a changed file's handle waits to replace the old one)."""
        loads: list[ModelHandle] = []
        for key, spec in new.items():
            old = current.get(key)
            if old is not None and old.spec == spec and old.state is not ModelState.FAILED:
                old.pinned_unloaded = False
                if old.state is ModelState.UNLOADED:
                    loads.append(old)
                continue
            handle = self._loader.handle(spec)
            loads.append(handle)
            if old is None:
                self._table.adopt(handle)
        return loads

    async def _bring_in(self, handle: ModelHandle, old: ModelHandle | None) -> None:
        if handle.state is ModelState.FAILED:
            return
        await self._loader.ensure_loaded(handle)
        if old is None or old is handle:
            return
        if handle.state is ModelState.READY or old.state is ModelState.FAILED:
            self._table.put(handle)
            self._loader.retire(old)
        else:
            log.error(
                "model %s version %s: the new file failed to load (%s); the old one keeps serving",
                handle.name,
                handle.version,
                handle.error,
            )
            old.error = f"reload failed: {handle.error}"

    def _phase_out(self, old: ModelHandle, new: Mapping[Key, ModelSpec]) -> None:
        """A version the scan no longer serves: retired, unless nothing newer is ready or
        a canary now compares the two."""
        newer = [
            h for h in (self._table.find(n, v) for n, v in new if n == old.name) if h is not None
        ]
        ready = [h for h in newer if h.state is ModelState.READY]
        if old.state is not ModelState.FAILED and not ready:
            # Every new version of this model failed: the old one keeps serving.
            old.error = "newer version failed to load; still serving this one"
            return
        if old.state is ModelState.READY and old.version == self._table.stable_of(old.name):
            candidate = max(ready, key=lambda h: version_key(h.version))
            # Only a newer version is a canary: one left when the stable version's files
            # were removed (a rollback) takes over at once.
            newer_one = version_key(candidate.version) > version_key(old.version)
            if newer_one and self._table.canary.start(old, candidate):
                return  # a canary compares them; it retires the loser
        self._table.remove(old)
        self._loader.retire(old)


__all__ = ["HotSwap"]
