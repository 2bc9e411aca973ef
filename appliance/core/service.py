"""The core API every transport calls: look up models, validate requests, run them.

All request validation that does not depend on a wire format lives here, so HTTP, MQTT and
any later transport reject the same things with the same messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from appliance.core.admission import Ticket
from appliance.core.cache import ResultCache, request_key
from appliance.core.canary import (
    CanaryController,
    GenerationObserver,
    canary_generate,
    canary_infer,
)
from appliance.core.metrics import Metrics
from appliance.core.models import ModelHandle, ModelManager
from appliance.core.pipelines import Pipelines
from appliance.core.repository import ModelSpec
from appliance.core.runtime_metrics import RuntimeCollector
from appliance.core.sampling import check_sampling
from appliance.core.types import (
    DATATYPES,
    Array,
    Capability,
    EmbeddingResult,
    GenerateRequest,
    InferResult,
    ModelInfo,
    ModelState,
    TokenChunk,
    datatype_of,
)
from appliance.errors import RequestError, ShuttingDown, UnsupportedOperation
from appliance.runtimes.base import Runtime

log = logging.getLogger(__name__)

MAX_EMBED_INPUTS = 2048


class Core:
    """What transports may ask of the appliance."""

    def __init__(
        self, models: ModelManager, metrics: Metrics, *, cache: ResultCache | None = None
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.cache = cache
        self.canary: CanaryController | None = None  # set by the daemon when configured
        self.pipelines: Pipelines | None = None
        # Scans the model repository again (blocking); set by the daemon.
        self.rescan: Callable[[], list[ModelSpec]] | None = None
        metrics.registry.register(RuntimeCollector(self._loaded_runtimes))
        self.started = time.time()
        self._closing = False
        self._status: dict[str, Callable[[], Mapping[str, Any]]] = {}

    # -- state ------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuse new work from now on; in-flight work finishes."""
        self._closing = True

    def add_status(
        self, name: str, provider: Callable[[], Mapping[str, Any]]
    ) -> Callable[[], None]:
        """Publish a lifecycle unit's state: ``provider()`` is called (on the loop, must be
        quick and JSON-ready) whenever a transport reports health, under ``name``.

        Returns a function that removes it. Transports only serialize :meth:`unit_status`.
        """
        if name in self._status:
            raise ValueError(f"a status named {name!r} is already registered")
        self._status[name] = provider

        def remove() -> None:
            self._status.pop(name, None)

        return remove

    def unit_status(self) -> dict[str, Any]:
        """Every registered unit's state, by name; a failing provider reports its error."""
        out: dict[str, Any] = {}
        for name, provider in list(self._status.items()):
            try:
                out[name] = dict(provider())
            except Exception as exc:
                log.exception("status provider %s failed", name)
                out[name] = {"error": str(exc) or type(exc).__name__}
        return out

    @property
    def ready(self) -> bool:
        """Loading is over and at least one model (or none was configured) serves."""
        if self.models.loading or self._closing:
            return False
        handles = self.models.handles()
        return not handles or any(h.state is ModelState.READY for h in handles)

    @property
    def loading(self) -> bool:
        return self.models.loading

    def _loaded_runtimes(self) -> list[tuple[str, Runtime]]:
        return [(h.name, h.runtime) for h in self.models.handles() if h.runtime is not None]

    def list_models(self) -> list[ModelInfo]:
        models = [h.info() for h in self.models.handles()]
        if self.pipelines is not None:
            models += self.pipelines.infos(self)
        return models

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a served model or pipeline (one of :meth:`list_models`)."""
        return self.models.has(name) or (self.pipelines is not None and self.pipelines.has(name))

    def count_request(self, transport: str, route: str, model: str, status: str,
                      seconds: float) -> None:
        """One finished request of any transport, in ``appliance_requests``.

        Only served models become label values: names clients make up would otherwise
        add series to /metrics without bound.
        """
        if model and not self.serves(model):
            model = ""
        self.metrics.count_request(transport, route, model, status, seconds)

    def model(self, name: str, version: str | None = None) -> ModelInfo:
        if self.pipelines is not None and self.pipelines.has(name):
            return self.pipelines.info(self, name)
        return self.models.get(name, version).info()

    def versions(self, name: str) -> list[ModelInfo]:
        """Every served version of ``name``, oldest first."""
        return [h.info() for h in self.models.versions(name)]

    async def reload_models(self, *, only: str | None = None) -> None:
        """Re-read the repository (``rescan``, set by the daemon) and hot-swap what changed;
        with ``only``, just that model."""
        if self.rescan is None:
            raise UnsupportedOperation("this appliance has no model repository to re-read")
        if only is not None and self.pipelines is not None and self.pipelines.has(only):
            raise RequestError(f"{only!r} is a pipeline, not a model", param="name")
        specs = await asyncio.to_thread(self.rescan)
        if only is not None and all(s.name != only for s in specs):
            self.models.get(only)  # 404 for a model that was never there
        await self.models.reload(specs, only=only)

    async def load(self, name: str, version: str | None = None) -> ModelInfo:
        """Load ``name`` now if it is not loaded (waiting at most ``load_wait``)."""
        handle = await self.models.acquire(self.models.get(name, version))
        return handle.info()

    def keep_alive(self, name: str, version: str | None, seconds: float | None) -> None:
        """Set how long ``name`` stays loaded once idle (seconds; negative: forever; None:
        the configured default); 0 unloads it as soon as it is idle, as Ollama's
        ``keep_alive`` does."""
        handle = self.models.get(name, version)
        self.models.touch(handle)
        handle.keep_alive = seconds  # None: back to [models].keep_alive

    # -- tensor inference -------------------------------------------------------------

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, Array],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferResult:
        """Validate ``inputs`` against the model's signature and run it.

        A pipeline name runs the pipeline; a model with a canary running may be answered
        by the canary (see ``appliance.core.canary``).
        """
        if self.pipelines is not None and self.pipelines.has(name):
            return await self.pipelines.run(self, name, inputs, outputs)
        if version is None and self.canary is not None:
            canary, to_canary = self.canary.route(name)
            if canary is not None:
                return await canary_infer(self, self.canary, canary, to_canary, inputs,
                                          outputs)
        return await self.infer_version(name, inputs, version=version, outputs=outputs)

    async def infer_version(
        self,
        name: str,
        inputs: Mapping[str, Array],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
    ) -> InferResult:
        """:meth:`infer` on exactly this version (the stable one without ``version``)."""
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
        expected = {spec.name: spec for spec in signature.inputs}
        for tensor in inputs:
            if tensor not in expected:
                raise RequestError(
                    f"unexpected input tensor {tensor!r}; the model takes: "
                    f"{', '.join(expected)}",
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
        names = [spec.name for spec in signature.outputs]
        if not outputs:
            return names
        for out in outputs:
            if out not in names:
                raise RequestError(
                    f"unknown output tensor {out!r}; the model returns: {', '.join(names)}",
                    param="outputs",
                )
        return list(dict.fromkeys(outputs))

    # -- text generation --------------------------------------------------------------

    async def generate(
        self, name: str, request: GenerateRequest, *, version: str | None = None
    ) -> TokenStream:
        """Admit a generation and return its token stream (not yet started).

        Raises before anything is streamed when the request is invalid or the model busy, so
        transports can still answer with an error status.
        """
        if version is None and self.canary is not None:
            canary, to_canary = self.canary.route(name)
            if canary is not None:
                return await canary_generate(self, self.canary, canary, to_canary, request)
        return await self.generate_version(name, request, version=version)

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
        return TokenStream(self, handle, runtime, request, ticket, observer)

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
        text = request.prompt if request.prompt is not None else "\n".join(
            m.content for m in request.messages or ()
        )
        tokens = runtime.count_tokens(text)
        if tokens >= context:
            raise RequestError(
                f"the prompt is {tokens} tokens, longer than the model's context length "
                f"{context}",
                param="prompt" if request.prompt is not None else "messages",
            )

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
            for i, text in enumerate(texts):
                tokens = runtime.count_tokens(text)
                if tokens > context:
                    raise RequestError(
                        f"input[{i}] is {tokens} tokens, longer than the model's context "
                        f"length {context}",
                        param="input",
                    )
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
        if self._closing:
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
        core: Core,
        handle: ModelHandle,
        runtime: Runtime,
        request: GenerateRequest,
        ticket: Ticket,
        observer: GenerationObserver | None = None,
    ) -> None:
        self._core = core
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
        metrics = self._core.metrics
        name = self._handle.name
        async with self._ticket:
            started = first_at = time.perf_counter()
            first = True
            chunks = self._runtime.generate(self.request)
            try:
                async for chunk in chunks:
                    if first:
                        first_at = time.perf_counter()
                        metrics.time_to_first_token.labels(name).observe(first_at - started)
                        first = False
                    if chunk.finish_reason is not None:
                        metrics.prompt_tokens.labels(name).inc(chunk.prompt_tokens)
                        if self._observer is not None:
                            self._observer(True, _per_token(started, first_at,
                                                            chunk.completion_tokens))
                    elif chunk.text:
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
                close: Callable[[], Any] | None = getattr(chunks, "aclose", None)
                if close is not None:
                    await close()
                metrics.inference_seconds(name).observe(time.perf_counter() - started)
                self.finished.set()


def _per_token(started: float, first_at: float, tokens: int) -> float:
    """Seconds per generated token after the first (the decode pace), else the whole time."""
    now = time.perf_counter()
    return (now - first_at) / (tokens - 1) if tokens >= 2 else now - started


async def _prepend(first: TokenChunk, rest: AsyncIterator[TokenChunk]
                   ) -> AsyncIterator[TokenChunk]:
    yield first
    async for chunk in rest:
        yield chunk


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("-1 (any)" if d == -1 else str(d) for d in shape) + "]"


__all__ = ["DATATYPES", "Core", "TokenStream"]
