"""Routing: which version answers a request, with a canary running (``appliance.core.canary``).

The :class:`Router` sits on the :class:`~appliance.core.execution.Executor`. A request that
names a version runs on it; one that names none runs on the stable version, or, while a
canary runs, is split or shadowed between stable and canary and measured on the side that
answers (the controller judges the canary from those measurements).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from appliance.core.canary import Canary, CanaryController
from appliance.core.execution import Executor, GenerationObserver, TokenStream
from appliance.core.types import Array, GenerateRequest, InferResult
from appliance.errors import ModelUnavailable, Overloaded, RequestError, ShuttingDown

log = logging.getLogger(__name__)


class Router:
    """Versioned calls routed through the canary controller."""

    def __init__(self, executor: Executor, canary: CanaryController) -> None:
        self.executor = executor
        self.canary = canary

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, Array],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferResult:
        """A tensor inference; a model with a canary running may be answered by it."""
        if version is None:
            canary, to_canary = self.canary.route(name)
            if canary is not None:
                return await canary_infer(
                    self.executor, self.canary, canary, to_canary, inputs, outputs
                )
        return await self.executor.infer_version(name, inputs, version=version, outputs=outputs)

    async def generate(
        self, name: str, request: GenerateRequest, *, version: str | None = None
    ) -> TokenStream:
        """An admitted generation (not yet started), perhaps on the canary."""
        if version is None:
            canary, to_canary = self.canary.route(name)
            if canary is not None:
                return await canary_generate(self.executor, self.canary, canary, to_canary, request)
        return await self.executor.generate_version(name, request, version=version)


async def canary_infer(
    executor: Executor,
    controller: CanaryController,
    canary: Canary,
    to_canary: bool,
    inputs: Mapping[str, Array],
    outputs: Sequence[str] | None,
) -> InferResult:
    """One tensor inference while ``canary`` runs: measured on the side that answers.

    A canary failure (an error, or NaN in a float output) is answered by stable instead, so
    clients never see it; in shadow mode a copy runs on the canary and its answer is
    dropped.
    """
    name = canary.name
    if to_canary:
        result = await _measured(executor, controller, canary, "canary", inputs, outputs)
        if result is not None:
            return result
    elif controller.mode == "shadow":
        controller.spawn(_measured(executor, controller, canary, "canary", inputs, outputs))
    started = time.perf_counter()
    try:
        result = await executor.infer_version(
            name, inputs, version=canary.stable.version, outputs=outputs
        )
    except (RequestError, Overloaded, ModelUnavailable, ShuttingDown):
        raise
    except Exception:
        controller.record(canary, "stable", False, time.perf_counter() - started)
        raise
    controller.record(canary, "stable", _sound(result), time.perf_counter() - started)
    return result


async def _measured(
    executor: Executor,
    controller: CanaryController,
    canary: Canary,
    side: str,
    inputs: Mapping[str, Array],
    outputs: Sequence[str] | None,
) -> InferResult | None:
    """Run on the canary; its answer, or None when it failed (recorded)."""
    started = time.perf_counter()
    try:
        result = await executor.infer_version(
            canary.name, inputs, version=canary.candidate.version, outputs=outputs
        )
    except RequestError:
        if side == "canary":
            return None  # e.g. a changed signature: stable decides what the client hears
        raise
    except (Overloaded, ModelUnavailable, ShuttingDown):
        return None  # busy or gone: not the canary's fault, not measured
    except Exception:
        log.debug(
            "canary %s version %s failed", canary.name, canary.candidate.version, exc_info=True
        )
        controller.record(canary, side, False, time.perf_counter() - started)
        return None
    ok = _sound(result)
    controller.record(canary, side, ok, time.perf_counter() - started)
    return result if ok else None


async def canary_generate(
    executor: Executor,
    controller: CanaryController,
    canary: Canary,
    to_canary: bool,
    request: GenerateRequest,
) -> TokenStream:
    """A generation while ``canary`` runs, measured on the side that answers.

    The canary's stream is started (run to its first piece) here, so a failure before any
    text was sent is answered by stable instead; in shadow mode a copy runs on the canary
    in the background, after stable's answer, and its text is dropped.
    """
    name, stable = canary.name, canary.stable.version
    if to_canary:
        stream: TokenStream | None = None
        refused = False
        try:
            stream = await executor.generate_version(
                name,
                request,
                version=canary.candidate.version,
                observer=_observer(controller, canary, "canary"),
            )
            await stream.start()
            return stream
        except RequestError:
            refused = True  # judged below, once stable has seen the same request
        except (Overloaded, ModelUnavailable, ShuttingDown):
            pass  # busy or gone: not the canary's fault, not measured
        except Exception:
            log.debug("canary %s version %s failed", name, canary.candidate.version, exc_info=True)
            if stream is None:  # a started stream's failure was recorded by its observer
                controller.record(canary, "canary", False, 0.0)
        except BaseException:
            if stream is not None:
                await stream.aclose()
            raise
        if stream is not None:
            await stream.aclose()
        fallback = await executor.generate_version(
            name, request, version=stable, observer=_observer(controller, canary, "stable")
        )
        if refused:
            try:
                await fallback.start()  # stable refusing too makes it the client's mistake
            except BaseException:
                await fallback.aclose()
                raise
            controller.record(canary, "canary", False, 0.0)
        return fallback
    answer = await executor.generate_version(
        name, request, version=stable, observer=_observer(controller, canary, "stable")
    )
    if controller.mode == "shadow":
        controller.spawn(_shadow_generation(executor, controller, canary, request, answer))
    return answer


async def _shadow_generation(
    executor: Executor,
    controller: CanaryController,
    canary: Canary,
    request: GenerateRequest,
    answer: TokenStream,
) -> None:
    # The copy runs once the client's answer is done: on a box of two cores, running both
    # at once would slow the client and make both sides' latencies meaningless.
    await answer.finished.wait()
    try:
        stream = await executor.generate_version(
            canary.name,
            request,
            version=canary.candidate.version,
            observer=_observer(controller, canary, "canary"),
        )
    except (RequestError, Overloaded, ModelUnavailable, ShuttingDown):
        return
    except Exception:
        controller.record(canary, "canary", False, 0.0)
        return
    async with stream:
        try:
            async for _ in stream:
                pass
        except Exception:  # recorded by the observer; nobody waits for this answer
            log.debug(
                "shadow generation on %s version %s failed",
                canary.name,
                canary.candidate.version,
                exc_info=True,
            )


def _observer(controller: CanaryController, canary: Canary, side: str) -> GenerationObserver:
    def observe(ok: bool, seconds_per_token: float) -> None:
        controller.record(canary, side, ok, seconds_per_token)

    return observe


def _sound(result: InferResult) -> bool:
    """No NaN in any float output (infinities may be meaningful, e.g. an anomaly score)."""
    return not any(
        value.dtype.kind == "f" and bool(np.isnan(value).any()) for value in result.outputs.values()
    )


__all__ = ["Router", "canary_generate", "canary_infer"]
