"""Versioned execution: run one request on one model version.

The :class:`Executor` is the floor under the canary router and the pipelines: it looks a
version up (loading it on demand), checks the request against what the model takes,
admits it to the version's queue, runs it on the runtime and counts it. It knows nothing
of canaries or pipelines; they call it.

The executor never blocks the event loop: counting the tokens of embedding inputs runs in
a worker thread, and the exact prompt-length check of a generation is the runtime's own
(done off the loop before its first chunk, see ``appliance.runtimes.base``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from appliance.core.admission import Ticket
from appliance.core.cache import ResultCache, request_key
from appliance.core.handle import ModelHandle
from appliance.core.metrics import Metrics
from appliance.core.models import ModelManager
from appliance.core.sampling import check_sampling
from appliance.core.toolcalls import with_tool_calls
from appliance.core.types import (
    Array,
    Capability,
    EmbeddingResult,
    GenerateRequest,
    InferResult,
    Signature,
    TokenChunk,
    datatype_of,
)
from appliance.errors import RequestError, ShuttingDown, UnsupportedOperation
from appliance.runtimes.base import Runtime

MAX_EMBED_INPUTS = 2048
_PLANS = 64  # signatures whose checks are kept gathered

# How a generation ended: (ok, seconds per generated token after the first).
GenerationObserver = Callable[[bool, float], None]


class Executor:
    """Runs requests on exactly the model version asked for (the stable one without)."""

    def __init__(
        self, models: ModelManager, metrics: Metrics, cache: ResultCache | None = None
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.cache = cache
        self.closing = False
        # Per signature (by identity): its input names and output names.
        self._plans: dict[int, tuple[Signature, dict[str, None], tuple[str, ...]]] = {}

    def begin_shutdown(self) -> None:
        """Refuse new work from now on; in-flight work finishes."""
        self.closing = True

    # -- tensor inference -------------------------------------------------------------

    async def infer_version(
        self,
        name: str,
        inputs: Mapping[str, Array],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferResult:
        """Validate ``inputs`` against the model's signature and run exactly this version
        (the stable one without ``version``)."""
        handle, runtime = await self._runtime(name, version, Capability.INFER)
        wanted = self._check_tensors(runtime, inputs, outputs)
        cache, key = self.cache, ""
        options = handle.spec.options
        if cache is not None and cache.enabled(handle.name, options.cache):
            key = request_key(handle.name, handle.spec.version, inputs, wanted)
            hit = await cache.get(key)
            if hit is not None:
                self.metrics.cache_hits.labels(name).inc()
                return hit
            self.metrics.cache_misses.labels(name).inc()
        ticket = self._admit(handle)
        async with ticket:
            started = time.perf_counter()
            try:
                results = await runtime.infer(inputs, wanted)
            finally:
                self.metrics.inference_seconds(name).observe(time.perf_counter() - started)
        result = InferResult(outputs=results)
        if cache is not None and key:
            await cache.put(key, result, cache.ttl(options.cache_ttl))
        return result

    def _check_tensors(
        self, runtime: Runtime, inputs: Mapping[str, Array], outputs: Sequence[str] | None
    ) -> list[str]:
        signature = runtime.signature
        plan = self._plans.get(id(signature))
        if plan is None or plan[0] is not signature:
            plan = self._plan(signature)
        _, expected, names = plan
        for tensor in inputs:
            if tensor not in expected:
                raise RequestError(
                    f"unexpected input tensor {tensor!r}; the model takes: {', '.join(expected)}",
                    param="inputs",
                )
        for spec in signature.inputs:
            if spec.name not in inputs:
                raise RequestError(f"missing input tensor {spec.name!r}", param="inputs")
            value = inputs[spec.name]
            actual_type = datatype_of(value.dtype)
            if actual_type != spec.datatype:
                raise RequestError(
                    f"input tensor {spec.name!r} has datatype {actual_type}, "
                    f"expected {spec.datatype}",
                    param="inputs",
                )
            if len(value.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, value.shape, strict=True)
            ):
                raise RequestError(
                    f"input tensor {spec.name!r} has shape {list(value.shape)}, expected "
                    f"{_shape_text(spec.shape)}",
                    param="inputs",
                )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise RequestError(
                    f"input tensor {spec.name!r} contains NaN or infinite values", param="inputs"
                )
        if not outputs:
            return list(names)
        for out in outputs:
            if out not in names:
                raise RequestError(
                    f"unknown output tensor {out!r}; the model returns: {', '.join(names)}",
                    param="outputs",
                )
        return list(dict.fromkeys(outputs))

    def _plan(self, signature: Signature) -> tuple[Signature, dict[str, None], tuple[str, ...]]:
        """What the checks of ``signature`` look up, gathered once per signature (a
        model's is fixed while it is loaded) instead of on every request."""
        if len(self._plans) >= _PLANS:  # signatures of runtimes long unloaded
            self._plans.clear()
        plan = (
            signature,
            dict.fromkeys(spec.name for spec in signature.inputs),
            tuple(spec.name for spec in signature.outputs),
        )
        self._plans[id(signature)] = plan
        return plan

    # -- text generation --------------------------------------------------------------

    async def generate_version(
        self,
        name: str,
        request: GenerateRequest,
        *,
        version: str | None = None,
        observer: GenerationObserver | None = None,
    ) -> TokenStream:
        """:meth:`generate` on exactly this version; ``observer`` hears how it ended."""
        handle, runtime = await self._runtime(name, version, Capability.GENERATE)
        self._check_generation(runtime, request)
        ticket = self._admit(handle)
        return TokenStream(self.metrics, handle, runtime, request, ticket, observer)

    def _check_generation(self, runtime: Runtime, request: GenerateRequest) -> None:
        context = runtime.context_length
        params = request.params
        if request.prompt is None and not request.messages:
            raise RequestError("a prompt or at least one message is required", param="messages")
        check_sampling(params)
        if context is None:
            return
        if params.max_tokens is not None and params.max_tokens > context:
            raise RequestError(
                f"max_tokens {params.max_tokens} exceeds the model's context length {context}",
                param="max_tokens",
            )
        # Whether the prompt fits is the runtime's check: it tokenises the prompt exactly
        # as it will run it (chat template included), off the loop, before the first chunk.

    # -- embeddings -------------------------------------------------------------------

    async def embed(
        self, name: str, texts: Sequence[str], *, version: str | None = None
    ) -> EmbeddingResult:
        handle, runtime = await self._runtime(name, version, Capability.EMBED)
        if not texts:
            raise RequestError("input must hold at least one text", param="input")
        if len(texts) > MAX_EMBED_INPUTS:
            raise RequestError(
                f"input holds {len(texts)} texts; at most {MAX_EMBED_INPUTS} are allowed",
                param="input",
            )
        context = runtime.context_length
        if context is not None:
            # Up to MAX_EMBED_INPUTS texts to tokenise: in a worker thread, not on the loop.
            await asyncio.to_thread(_check_lengths, runtime, texts, context)
        async with self._admit(handle):
            started = time.perf_counter()
            try:
                result = await runtime.embed(texts)
            finally:
                self.metrics.inference_seconds(name).observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.labels(name).inc(result.prompt_tokens)
        return result

    # -- helpers ----------------------------------------------------------------------

    async def _runtime(
        self, name: str, version: str | None, capability: Capability
    ) -> tuple[ModelHandle, Runtime]:
        if self.closing:
            raise ShuttingDown("the appliance is shutting down")
        # Loads the model on first use (or after an idle unload), waiting boundedly.
        handle = await self.models.acquire(self.models.get(name, version))
        runtime = handle.ready_runtime()
        if capability not in runtime.capabilities:
            what = {
                Capability.INFER: "tensor inference",
                Capability.GENERATE: "text generation",
                Capability.EMBED: "embeddings",
            }[capability]
            can = ", ".join(sorted(c.value for c in runtime.capabilities))
            raise UnsupportedOperation(
                f"model {name!r} ({handle.spec.runtime}) does not support {what}; it supports: "
                f"{can}",
                param="model",
            )
        return handle, runtime

    def _admit(self, handle: ModelHandle) -> Ticket:
        try:
            ticket = handle.admission.admit()
        except Exception:
            self.metrics.rejected.labels(handle.name).inc()
            raise
        return ticket


class TokenStream:
    """An admitted generation. Iterate it once; ``aclose`` (or ``async with``) frees the model.

    Holding the queue ticket in this object rather than in an async generator means the
    ticket is released even when the stream is never iterated.
    """

    def __init__(
        self,
        metrics: Metrics,
        handle: ModelHandle,
        runtime: Runtime,
        request: GenerateRequest,
        ticket: Ticket,
        observer: GenerationObserver | None = None,
    ) -> None:
        self._metrics = metrics
        self._handle = handle
        self._runtime = runtime
        self.request = request
        self._ticket = ticket
        self._observer = observer
        self._iterator: AsyncIterator[TokenChunk] | None = None
        self._held: TokenChunk | None = None  # the first piece, once started
        self.finished = asyncio.Event()  # set once the model's slot is given back

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        if self._held is not None:
            held, self._held = self._held, None
            assert self._iterator is not None
            return _prepend(held, self._iterator)
        if self._iterator is not None:
            raise RuntimeError("a token stream can be iterated only once")
        self._iterator = self._run()
        return self._iterator

    async def start(self) -> None:
        """Generate until the first piece, held for the iteration that follows.

        A failure before anything streamed then surfaces here, while another model can
        still answer instead (a canary's stable version).
        """
        iterator = aiter(self)
        self._held = await anext(iterator)

    async def aclose(self) -> None:
        iterator = self._iterator
        try:
            if iterator is not None:
                aclose: Callable[[], Any] | None = getattr(iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
        finally:
            self._ticket.release()
            self.finished.set()

    async def _run(self) -> AsyncIterator[TokenChunk]:
        metrics = self._metrics
        name = self._handle.name
        async with self._ticket:
            started = first_at = time.perf_counter()
            first = True
            raw = chunks = self._runtime.generate(self.request)
            if self.request.tools is not None:
                # Calls are parsed here, once, so no transport parses model output.
                chunks = with_tool_calls(raw, self.request.tools)
            try:
                async for chunk in chunks:
                    if first:
                        first_at = time.perf_counter()
                        metrics.time_to_first_token.labels(name).observe(first_at - started)
                        first = False
                    if chunk.finish_reason is not None:
                        metrics.prompt_tokens.labels(name).inc(chunk.prompt_tokens)
                        if self._observer is not None:
                            self._observer(
                                True, _per_token(started, first_at, chunk.completion_tokens)
                            )
                    elif chunk.text or chunk.tool_calls:
                        # Counted as they stream so an abandoned generation shows too.
                        metrics.tokens_generated.labels(name).inc()
                    yield chunk
            except RequestError:
                raise  # the request's fault (e.g. the chat template refused it), not the model's
            except Exception:
                # The model failed (a client going away is not an Exception).
                if self._observer is not None:
                    self._observer(False, 0.0)
                raise
            finally:
                # Stop the runtime's generation before the model's slot is given back, so
                # the next request never overlaps with a dying one.
                for stream in (chunks, raw) if chunks is not raw else (raw,):
                    close: Callable[[], Any] | None = getattr(stream, "aclose", None)
                    if close is not None:
                        await close()
                metrics.inference_seconds(name).observe(time.perf_counter() - started)
                self.finished.set()


def _check_lengths(runtime: Runtime, texts: Sequence[str], context: int) -> None:
    """Every embedding input fits the model's context (blocking: tokenises each text)."""
    for i, text in enumerate(texts):
        tokens = runtime.count_tokens(text)
        if tokens > context:
            raise RequestError(
                f"input[{i}] is {tokens} tokens, longer than the model's context length {context}",
                param="input",
            )


def _per_token(started: float, first_at: float, tokens: int) -> float:
    """Seconds per generated token after the first (the decode pace), else the whole time."""
    now = time.perf_counter()
    return (now - first_at) / (tokens - 1) if tokens >= 2 else now - started


async def _prepend(first: TokenChunk, rest: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
    yield first
    async for chunk in rest:
        yield chunk


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("-1 (any)" if d == -1 else str(d) for d in shape) + "]"


__all__ = ["MAX_EMBED_INPUTS", "Executor", "GenerationObserver", "TokenStream"]
