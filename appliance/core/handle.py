"""One model version: :class:`ModelHandle`, and how versions sort (:func:`version_key`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping

from appliance.core.admission import Admission
from appliance.core.repository import ModelSpec
from appliance.core.types import Capability, ModelInfo, ModelState, Signature
from appliance.errors import ModelUnavailable
from appliance.runtimes.base import Runtime


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``2`` before ``10`` and ``1.2`` before ``1.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[._-]", version))


class ModelHandle:
    """One model version: its spec, state, runtime once loaded, and request queue."""

    def __init__(
        self, spec: ModelSpec, *, parallel: int, queue_size: int, retry_after: float
    ) -> None:
        self.spec = spec
        # The queue tells its own handle when it empties (see wait_idle).
        self.admission = Admission(
            spec.name,
            parallel=parallel,
            queue_size=queue_size,
            retry_after=retry_after,
            on_change=self._queue_changed,
        )
        self.state = ModelState.FAILED if spec.problem else ModelState.UNLOADED
        self.error: str | None = spec.problem
        self.runtime: Runtime | None = None
        self.last_used = time.monotonic()
        self.keep_alive: float | None = None  # per-model override; None: the configured one
        self.pinned_unloaded = False  # unloaded by an operator: no load on demand
        self.retired = False  # left routing; closed once idle
        self.idle = asyncio.Event()
        self._known: tuple[frozenset[Capability], Signature, int | None, Mapping[str, str]] = (
            frozenset(),
            Signature(),
            None,
            {},
        )
        self.load_lock = asyncio.Lock()  # one load at a time
        # Stated when the repository was read (off the loop), not here on the loop.
        self.created, self.size = spec.created, spec.size

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def busy(self) -> bool:
        """Requests are admitted (running or queued) on this version."""
        return self.admission.admitted > 0  # running + waiting

    def _queue_changed(self, admission: Admission) -> None:
        if not self.busy:
            self.idle.set()

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
        self._known = (
            runtime.capabilities,
            runtime.signature,
            runtime.context_length,
            runtime.details,
        )

    def info(self) -> ModelInfo:
        # An idle-unloaded model still describes itself: it loads again on the next request.
        capabilities, signature, context, details = self._known
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
            details=details,
        )


__all__ = ["ModelHandle", "version_key"]
