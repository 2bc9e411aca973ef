"""Canary releases: a new model version takes a share of the traffic (or a shadow copy of
it) beside the stable one, and is promoted or rolled back on how it compares.

Generation (GGUF models) is split and shadowed the same way. Its latency is the time per
generated token after the first (the decode pace: a version that answers at more length,
or whose prompt missed a cache, is not penalised for it); shadow copies run after stable's
answer rather than beside it, so that both sides are timed alone; a split
request whose canary fails before its first token is answered by stable, and a request the
canary's chat template refuses counts against the canary only when stable accepts it.

A canary starts when a model has a newer ready version than its stable one: after a
reload finds a new version in the repository, or at start-up when the version policy
serves several versions. Requests that name no version go to the canary with probability
``share`` (``mode = "split"``), or all go to the stable version and a copy runs on the
canary whose answer is thrown away (``mode = "shadow"``). A split request the canary fails
(an error, or NaN outputs) is answered by the stable version, so clients see no error.

Both sides are measured over a sliding ``window``: error rate and mean latency. Once the
canary has ``min_requests`` in the window and is worse than stable by more than
``max_error_rate_increase`` or ``max_latency_ratio``, it is rolled back (unloaded, an alert
raised); once it has held for a full window it is promoted (it becomes stable; the old
version is retired). State and decisions are in ``/metrics``, ``/health`` and the hub.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.config import CanaryConfig
from appliance.core.handle import ModelHandle, version_key
from appliance.core.metrics import Metrics
from appliance.core.models import ModelManager
from appliance.core.types import ModelState
from appliance.errors import RequestError

log = logging.getLogger(__name__)

Decision = Literal["promoted", "rolled_back"]
DecisionListener = Callable[["CanaryDecision"], None]


@dataclass(frozen=True)
class CanaryDecision:
    """A canary's end: what was decided, and why."""

    model: str
    stable: str
    canary: str
    decision: Decision
    reason: str
    at: float = field(default_factory=time.time)


class Side:
    """Outcomes of one version over the window: (monotonic time, ok, seconds)."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, bool, float]] = collections.deque()

    def add(self, ok: bool, seconds: float, window: float) -> None:
        now = time.monotonic()
        self.samples.append((now, ok, seconds))
        while self.samples and now - self.samples[0][0] > window:
            self.samples.popleft()

    def summary(self) -> dict[str, Any]:
        n = len(self.samples)
        errors = sum(1 for _, ok, _ in self.samples if not ok)
        latencies = [s for _, ok, s in self.samples if ok]
        return {
            "requests": n,
            "errors": errors,
            "error_rate": errors / n if n else 0.0,
            "latency_avg_ms": 1000 * sum(latencies) / len(latencies) if latencies else None,
        }


class Canary:
    """One running comparison of ``candidate`` against ``stable``."""

    def __init__(self, stable: ModelHandle, candidate: ModelHandle) -> None:
        self.stable = stable
        self.candidate = candidate
        self.started = time.monotonic()
        self.sides = {"stable": Side(), "canary": Side()}

    @property
    def name(self) -> str:
        return self.stable.name


class CanaryController:
    """Routes requests between stable and canary versions and decides canaries' fate."""

    def __init__(self, models: ModelManager, config: CanaryConfig, metrics: Metrics) -> None:
        self._models = models
        self._config = config
        self._metrics = metrics
        self._running: dict[str, Canary] = {}
        self._decided: set[tuple[str, str]] = set()  # (model, version) already judged
        self._listeners: list[DecisionListener] = []
        self._random = random.Random()
        self._shadow: set[asyncio.Task[Any]] = set()
        self.recent: collections.deque[CanaryDecision] = collections.deque(maxlen=20)
        models.attach_canary(self)  # start() refuses while canary releases are off
        if config.enabled:
            models.hold_back_newest()
            models.add_listener(self._models_changed)

    def add_listener(self, listener: DecisionListener) -> Callable[[], None]:
        """Call ``listener(decision)`` on the loop for every promotion and rollback."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    @property
    def mode(self) -> str:
        return self._config.mode

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run shadow work in the background, holding a reference until it is done."""
        task = asyncio.create_task(work, name="appliance-canary-shadow")
        self._shadow.add(task)
        task.add_done_callback(self._shadow.discard)

    async def close(self) -> None:
        for task in list(self._shadow):
            task.cancel()
        await asyncio.gather(*self._shadow, return_exceptions=True)

    def canary_version(self, name: str) -> str | None:
        canary = self._running.get(name)
        return canary.candidate.version if canary else None

    # -- starting ---------------------------------------------------------------------

    def _models_changed(self) -> None:
        """Several ready versions (policy "all", or a reload): the newest is a canary."""
        for name in list(self._models.names()):
            if name in self._running:
                continue
            ready = [h for h in self._models.versions(name) if h.state is ModelState.READY]
            if len(ready) < 2:
                continue
            newest = max(ready, key=lambda h: version_key(h.version))
            stable = self._models.get(name)
            if newest is not stable and stable.state is ModelState.READY:
                self.start(stable, newest)

    def start(self, stable: ModelHandle, candidate: ModelHandle) -> bool:
        """Begin comparing ``candidate`` with ``stable``; False if it was judged before."""
        key = (candidate.name, candidate.version)
        if not self._config.enabled or key in self._decided or candidate is stable:
            return False
        self._running[stable.name] = Canary(stable, candidate)
        self._metrics.canary_active.labels(stable.name, candidate.version).set(1)
        log.info(
            "model %s: canary version %s starts against %s (%s, share %.0f%%)",
            stable.name,
            candidate.version,
            stable.version,
            self._config.mode,
            100 * self._config.share,
        )
        return True

    # -- routing ----------------------------------------------------------------------

    def route(self, name: str) -> tuple[Canary | None, bool]:
        """The running canary of ``name`` and whether this request goes to it (split mode)."""
        canary = self._running.get(name)
        if canary is None:
            return None, False
        if self._config.mode == "shadow":
            return canary, False
        return canary, self._random.random() < self._config.share

    def record(self, canary: Canary, side: str, ok: bool, seconds: float) -> None:
        if self._running.get(canary.name) is not canary:
            return  # decided meanwhile
        canary.sides[side].add(ok, seconds, self._config.window)
        version = canary.candidate.version if side == "canary" else canary.stable.version
        self._metrics.canary_requests.labels(
            canary.name, version, side, "ok" if ok else "error"
        ).inc()
        self._judge(canary)

    # -- deciding ---------------------------------------------------------------------

    def _judge(self, canary: Canary) -> None:
        config = self._config
        stable = canary.sides["stable"].summary()
        candidate = canary.sides["canary"].summary()
        if candidate["requests"] < config.min_requests:
            return
        worse = candidate["error_rate"] - stable["error_rate"]
        if worse > config.max_error_rate_increase:
            self._decide(
                canary,
                "rolled_back",
                f"error rate {candidate['error_rate']:.1%} vs stable "
                f"{stable['error_rate']:.1%} over the last {config.window:g}s",
            )
            return
        ours, theirs = candidate["latency_avg_ms"], stable["latency_avg_ms"]
        if (
            ours is not None
            and theirs
            and stable["requests"] >= config.min_requests
            and (ours > theirs * config.max_latency_ratio)
        ):
            self._decide(
                canary, "rolled_back", f"mean latency {ours:.1f} ms vs stable {theirs:.1f} ms"
            )
            return
        if config.auto_promote and time.monotonic() - canary.started >= config.window:
            self._decide(
                canary,
                "promoted",
                f"error rate {candidate['error_rate']:.1%} (stable "
                f"{stable['error_rate']:.1%}) over {config.window:g}s",
            )

    def promote(self, name: str) -> CanaryDecision:
        """An operator's promotion of the running canary."""
        return self._decide(self._require(name), "promoted", "promoted by an operator")

    def rollback(self, name: str) -> CanaryDecision:
        """An operator's rollback of the running canary."""
        return self._decide(self._require(name), "rolled_back", "rolled back by an operator")

    def _require(self, name: str) -> Canary:
        self._models.get(name)
        canary = self._running.get(name)
        if canary is None:
            raise RequestError(f"model {name!r} has no canary running", param="name")
        return canary

    def _decide(self, canary: Canary, decision: Decision, reason: str) -> CanaryDecision:
        name = canary.name
        del self._running[name]
        self._decided.add((name, canary.candidate.version))
        self._metrics.canary_active.labels(name, canary.candidate.version).set(0)
        self._metrics.canary_decisions.labels(name, decision).inc()
        event = CanaryDecision(
            name, canary.stable.version, canary.candidate.version, decision, reason
        )
        if decision == "promoted":
            log.info("model %s: canary %s promoted: %s", name, event.canary, reason)
            self._models.set_stable(name, canary.candidate.version)
            if self._models.policy != "all":
                self._models.schedule_drop(canary.stable)
        else:
            log.warning("model %s: canary %s rolled back: %s", name, event.canary, reason)
            self._models.schedule_drop(canary.candidate)
        self.recent.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("canary listener failed")
        return event

    # -- reporting --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """JSON-ready state for /health and the hub."""
        return {
            "enabled": self._config.enabled,
            "mode": self._config.mode,
            "share": self._config.share,
            "running": {
                name: {
                    "stable": c.stable.version,
                    "canary": c.candidate.version,
                    "age_s": round(time.monotonic() - c.started, 3),
                    "stable_stats": c.sides["stable"].summary(),
                    "canary_stats": c.sides["canary"].summary(),
                }
                for name, c in self._running.items()
            },
            "decisions": [
                {
                    "model": d.model,
                    "stable": d.stable,
                    "canary": d.canary,
                    "decision": d.decision,
                    "reason": d.reason,
                    "at": d.at,
                }
                for d in self.recent
            ],
        }


__all__ = ["Canary", "CanaryController", "CanaryDecision", "Side"]
