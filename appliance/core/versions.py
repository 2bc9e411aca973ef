"""Which model versions serve, and which of them answers requests naming none.

The version policy (``[models].version_policy``) picks the versions of a repository scan
that serve (:func:`select`); a :class:`VersionTable` holds them, by name and version, and
each model's *stable* version. A running canary keeps the stable version stable even when a
newer one is ready; the table asks the canary through :class:`CanaryHooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from appliance.config import ModelsConfig
from appliance.core.handle import ModelHandle, version_key
from appliance.core.repository import ModelSpec
from appliance.core.types import ModelState
from appliance.errors import ModelNotFound


class CanaryHooks(Protocol):
    """What the model lifecycle asks of canary releases (``appliance.core.canary``)."""

    def canary_version(self, name: str) -> str | None:
        """The version of ``name`` running as a canary, if one runs."""
        ...

    def start(self, stable: ModelHandle, candidate: ModelHandle) -> bool:
        """A new ready version would replace the stable one: True if a canary now compares
        them (both keep serving), False to switch at once."""
        ...


class NoCanary:
    """Canary releases off: a new version takes over at once."""

    def canary_version(self, name: str) -> str | None:
        return None

    def start(self, stable: ModelHandle, candidate: ModelHandle) -> bool:
        return False


def select(specs: Sequence[ModelSpec], config: ModelsConfig) -> list[ModelSpec]:
    """The specs the version policy serves."""
    policy = config.version_policy
    wanted: dict[str, set[str]] = {}
    for item in config.versions:
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


class VersionTable:
    """Every served version of every model, and each model's stable version."""

    def __init__(self) -> None:
        # name -> version -> handle, for every version the policy serves.
        self._versions: dict[str, dict[str, ModelHandle]] = {}
        # name -> the version requests without a version go to.
        self._stable: dict[str, str] = {}
        self.canary: CanaryHooks = NoCanary()

    def put(self, handle: ModelHandle) -> None:
        """Serve ``handle`` (replacing what served as its name and version)."""
        self._versions.setdefault(handle.name, {})[handle.version] = handle

    def adopt(self, handle: ModelHandle) -> None:
        """Serve a version of a model that may be new; a new model's stable version until
        the table picks again."""
        self.put(handle)
        self._stable.setdefault(handle.name, handle.version)

    def remove(self, handle: ModelHandle) -> None:
        """Stop serving ``handle``'s version (if it is the one serving it)."""
        versions = self._versions.get(handle.name, {})
        if versions.get(handle.version) is handle:
            del versions[handle.version]
        if not versions:
            self._versions.pop(handle.name, None)

    def pick_stable(self, name: str, *, newest: bool = False) -> None:
        """Keep the stable version while it can serve; else (or with ``newest``, unless a
        canary runs) the newest version that can."""
        versions = self._versions.get(name, {})
        if not versions:
            self._stable.pop(name, None)
            return
        current = self._stable.get(name)
        if (
            current in versions
            and versions[current].state is not ModelState.FAILED
            and (not newest or self.canary.canary_version(name) is not None)
        ):
            return
        ordered = sorted(versions, key=version_key)
        usable = [v for v in ordered if versions[v].state is not ModelState.FAILED]
        self._stable[name] = (usable or ordered)[-1]

    def hold_back_newest(self) -> None:
        """Make the second newest version stable where several serve, so the newest can
        start as a canary (canary releases at start-up with version policy "all")."""
        for name, versions in self._versions.items():
            usable = [
                v
                for v in sorted(versions, key=version_key)
                if versions[v].state is not ModelState.FAILED
            ]
            if len(usable) >= 2:
                self._stable[name] = usable[-2]

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

    def find(self, name: str, version: str) -> ModelHandle | None:
        """The handle serving ``name`` at ``version``, if any."""
        return self._versions.get(name, {}).get(version)

    def has(self, name: str) -> bool:
        return name in self._stable

    def stable_of(self, name: str) -> str | None:
        return self._stable.get(name)

    def set_stable(self, name: str, version: str) -> None:
        self.get(name, version)
        self._stable[name] = version

    def handles(self) -> list[ModelHandle]:
        """One handle per model: the stable version (what listings and health show)."""
        return [self._versions[name][version] for name, version in self._stable.items()]

    def all_handles(self) -> list[ModelHandle]:
        """Every served version of every model."""
        return [h for versions in self._versions.values() for h in versions.values()]

    def of(self, name: str) -> list[ModelHandle]:
        """Every served version of ``name``, oldest first (none: an empty list)."""
        versions = self._versions.get(name, {})
        return [versions[v] for v in sorted(versions, key=version_key)]

    def names(self) -> list[str]:
        return list(self._versions)


__all__ = ["CanaryHooks", "NoCanary", "VersionTable", "select"]
