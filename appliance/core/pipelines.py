"""Pipelines: a declarative chain of models served as one tensor model.

``[[pipelines.chain]]`` in the configuration names the steps. The first step is a tensor
model fed the request's inputs; a later step is either another tensor model fed the
previous outputs (matched by name), or a language model whose prompt is filled from them
(``{score}``), answering in a BYTES output. A step with ``when`` runs only when that BOOL
output is true somewhere, so an anomaly detector's quiet windows cost no generation.

Because a pipeline is addressed like a tensor model, every transport runs it unchanged:
``POST /v2/models/<pipeline>/infer``, an MQTT request, or an MQTT stream rule whose
``model`` is the pipeline's name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from appliance.config import Pipeline, PipelineStep
from appliance.core.models import ModelManager
from appliance.core.routing import Router
from appliance.core.types import (
    Array,
    Capability,
    ChatMessage,
    GenerateRequest,
    InferResult,
    ModelInfo,
    ModelState,
    SamplingParams,
    Signature,
    TensorSpec,
)
from appliance.errors import ModelNotFound, RequestError

log = logging.getLogger(__name__)


class Pipelines:
    """The configured pipelines, by name; each step a routed call (a canary may answer)."""

    def __init__(self, pipelines: Sequence[Pipeline], models: ModelManager, router: Router) -> None:
        self._pipelines = {p.name: p for p in pipelines}
        self._models = models
        self._router = router

    def has(self, name: str) -> bool:
        return name in self._pipelines

    def names(self) -> list[str]:
        return list(self._pipelines)

    def infos(self) -> list[ModelInfo]:
        return [self.info(name) for name in self._pipelines]

    def info(self, name: str) -> ModelInfo:
        """Ready when every step's model serves (or can load); the first step's inputs."""
        pipeline = self._pipelines[name]
        problems: list[str] = []
        first: ModelInfo | None = None
        outputs: list[TensorSpec] = []
        for step in pipeline.steps:
            try:
                info = self._models.get(step.model).info()
            except ModelNotFound:
                problems.append(f"model {step.model!r} not found")
                continue
            if info.state is ModelState.FAILED:
                problems.append(f"model {step.model!r} failed: {info.error}")
            if first is None:
                first = info
            if step.prompt:
                outputs.append(TensorSpec(step.output, "BYTES", (-1,)))
            else:
                outputs += list(info.signature.outputs)
        state = ModelState.FAILED if problems else ModelState.READY
        return ModelInfo(
            name=name,
            version="1",
            runtime="pipeline",
            state=state,
            description=pipeline.description or " → ".join(s.model for s in pipeline.steps),
            error="; ".join(problems) or None,
            capabilities=frozenset({Capability.INFER}),
            signature=Signature(
                inputs=first.signature.inputs if first else (), outputs=tuple(outputs)
            ),
            context_length=None,
            created=first.created if first else 0,
        )

    async def run(
        self,
        name: str,
        inputs: Mapping[str, Array],
        outputs: Sequence[str] | None,
    ) -> InferResult:
        """Run every step in order; the union of the steps' outputs."""
        pipeline = self._pipelines[name]
        collected: dict[str, Array] = {}
        current: Mapping[str, Array] = inputs
        for index, step in enumerate(pipeline.steps):
            if step.prompt:
                collected[step.output] = await _language_step(self._router, step, collected)
                continue
            if index > 0:
                current = {k: v for k, v in collected.items()}
                wanted = {t.name for t in self._models.get(step.model).info().signature.inputs}
                current = {k: v for k, v in current.items() if k in wanted}
            result = await self._router.infer(step.model, current)
            collected.update(result.outputs)
        if outputs:
            missing = [o for o in outputs if o not in collected]
            if missing:
                raise RequestError(
                    f"unknown output tensor {missing[0]!r}; the pipeline "
                    f"returns: {', '.join(collected)}",
                    param="outputs",
                )
            return InferResult(outputs={o: collected[o] for o in outputs})
        return InferResult(outputs=collected)


async def _language_step(router: Router, step: PipelineStep, values: Mapping[str, Array]) -> Array:
    if step.when:
        flag = values.get(step.when)
        if flag is None:
            raise RequestError(
                f"pipeline step {step.model!r}: no output {step.when!r} to test", param="when"
            )
        if not bool(np.asarray(flag).any()):
            return np.array([b""], dtype=object)
    try:
        prompt = step.prompt.format_map(_Values(values))
    except (KeyError, IndexError, ValueError) as exc:
        raise RequestError(
            f"pipeline step {step.model!r}: cannot fill the prompt: {exc}", param="prompt"
        ) from None
    request = GenerateRequest(
        messages=(ChatMessage(role="user", content=prompt),),
        params=SamplingParams(max_tokens=step.max_tokens, temperature=0.0, seed=0),
    )
    parts: list[str] = []
    async with await router.generate(step.model, request) as stream:
        async for chunk in stream:
            parts.append(chunk.text)
    return np.array(["".join(parts).encode("utf-8")], dtype=object)


class _Values(dict[str, Any]):
    """Prompt placeholders: a tensor's values, a single one as a number."""

    def __init__(self, values: Mapping[str, Array]) -> None:
        super().__init__()
        for key, value in values.items():
            array = np.asarray(value)
            if array.dtype == object:
                items = [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                    for v in array.ravel()
                ]
                self[key] = items[0] if len(items) == 1 else ", ".join(items)
            elif array.size == 1:
                item = array.ravel()[0].item()
                self[key] = round(item, 3) if isinstance(item, float) else item
            else:
                self[key] = (
                    np.round(array, 3).tolist() if array.dtype.kind == "f" else (array.tolist())
                )

    def __missing__(self, key: str) -> Any:
        raise KeyError(f"no output named {key!r}")


__all__ = ["Pipelines"]
