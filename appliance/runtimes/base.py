"""The one interface every model runtime implements.

A runtime owns one loaded model. Its methods are coroutines or async iterators so the core
never blocks: blocking work (loading, inference, token generation) runs on the runtime's own
small thread pool. Heavy libraries (onnxruntime, llama_cpp) are imported inside ``load`` so
that importing the package stays cheap and a missing optional backend only fails the models
that need it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.core.types import (
    Array,
    Capability,
    EmbeddingResult,
    GenerateRequest,
    Signature,
    TokenChunk,
)
from appliance.errors import UnsupportedOperation

T = TypeVar("T")


# Upper bounds of the batch-size histogram buckets (requests or sequences per model run).
BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


class RuntimeStats:
    """Counters a runtime keeps about its own work; the core exports them to /metrics.

    Written by the runtime's threads, read when /metrics is scraped. Plain integer updates
    under the GIL are enough: a scrape may see a batch counted in ``count`` a moment before
    its bucket, never a torn number.
    """

    def __init__(self) -> None:
        self.batch_buckets = [0] * (len(BATCH_BUCKETS) + 1)  # the last one is +Inf
        self.batch_count = 0
        self.batch_sum = 0
        self.cached_prompt_tokens = 0

    def observe_batch(self, size: int) -> None:
        """One model run (an ONNX ``run``, a ``llama_decode`` step) over ``size`` requests."""
        for i, bound in enumerate(BATCH_BUCKETS):
            if size <= bound:
                self.batch_buckets[i] += 1
                break
        else:
            self.batch_buckets[-1] += 1
        self.batch_count += 1
        self.batch_sum += size


class RuntimeOptions(BaseModel):
    """Options every runtime accepts in a manifest's ``[options]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parallel: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Requests run at once (default: [models].parallel, else the runtime's own).",
    )
    queue_size: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="Requests that may wait beyond those running (default: [models].queue_size).",
    )
    threads: int | None = Field(
        default=None, ge=1, le=256, description="Compute threads (default: the runtime's own)."
    )
    cache: bool = Field(
        default=False,
        description="Answer repeated identical requests from the result cache (tensor "
        "inference, and greedy generation); see the [cache] section of the daemon config.",
    )
    cache_ttl: float | None = Field(
        default=None,
        gt=0,
        le=30 * 86_400,
        allow_inf_nan=False,
        description="Seconds a cached result of this model stays valid (default: [cache].ttl).",
    )


class Runtime(ABC):
    """A loaded model. Subclasses set ``kind``, ``options_model`` and the capabilities."""

    kind: ClassVar[str]
    options_model: ClassVar[type[RuntimeOptions]] = RuntimeOptions
    # Most requests one instance can serve at once; None means no limit of its own.
    max_parallel: ClassVar[int | None] = None

    @classmethod
    def default_parallel(cls) -> int:
        """Requests run at once when neither the model nor ``[models]`` sets ``parallel``."""
        return 1

    def __init__(self, name: str, path: Path, options: RuntimeOptions, workers: int) -> None:
        self.name = name
        self.path = path
        self.options = options
        self.stats = RuntimeStats()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix=f"appliance-{name}"
        )
        # Loading and closing never overlap: with several workers, a close (an unload,
        # or start-up giving up) would otherwise free what a load still builds on.
        self._lifecycle = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------

    async def load(self) -> None:
        """Load the model off the event loop."""
        await self.run_blocking(self._locked, self.load_blocking)

    @abstractmethod
    def load_blocking(self) -> None:
        """Load the model; runs in a worker thread. Raise on any failure."""

    async def close(self) -> None:
        """Release the model and the worker threads."""
        await self.run_blocking(self._locked, self.close_blocking)
        # Joining the worker threads waits: on a thread of its own, never on the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def _locked(self, step: Callable[[], None]) -> None:
        with self._lifecycle:
            step()

    def close_blocking(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release native resources; runs in a worker thread."""

    # -- description ------------------------------------------------------------------

    @property
    @abstractmethod
    def capabilities(self) -> frozenset[Capability]:
        """What this model can do."""

    @property
    def signature(self) -> Signature:
        """Input and output tensors (tensor models only)."""
        return Signature()

    @property
    def context_length(self) -> int | None:
        """Context window in tokens (language models only)."""
        return None

    @property
    def details(self) -> Mapping[str, str]:
        """What the model file says of itself, for listings (GGUF: family, parameter_size,
        quantization_level); empty where it says nothing."""
        return {}

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` encodes to (language models only)."""
        raise UnsupportedOperation(f"model {self.name!r} does not work on text")

    # -- work -------------------------------------------------------------------------

    async def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        """Run a tensor model. ``inputs`` were validated against :attr:`signature`."""
        raise UnsupportedOperation(f"model {self.name!r} does not take tensors")

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Stream generated text; the last chunk carries ``finish_reason`` and usage.

        The runtime checks that the prompt fits its context (counted exactly as it will
        run, off the loop) and raises :class:`RequestError` before the first chunk; the
        core does not count it again. Closing the iterator early stops generation promptly.
        """
        raise UnsupportedOperation(f"model {self.name!r} does not generate text")

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        """Embed each text."""
        raise UnsupportedOperation(f"model {self.name!r} does not compute embeddings")

    # -- helpers ----------------------------------------------------------------------

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this model's worker threads."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self._executor, call)

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._executor
