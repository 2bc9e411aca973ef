"""ONNX models through onnxruntime.

Execution providers are chosen from the manifest and what the installed onnxruntime offers:
``auto`` prefers TensorRT, then CUDA (Jetson-class boxes), then XNNPACK (Arm CPUs), then
the CPU. Providers that are asked for but not installed are skipped with a warning, so one
manifest works on a Pi and on a Jetson.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from appliance.core.types import DATATYPES, Array, Capability, Signature, TensorSpec
from appliance.errors import ModelLoadError
from appliance.runtimes.base import Runtime, RuntimeOptions
from appliance.runtimes.batcher import Batcher
from appliance.runtimes.inline import InlinePolicy

log = logging.getLogger(__name__)

_AUTO_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)

# onnxruntime's type strings ("tensor(float)") -> Open Inference Protocol datatypes.
_ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OnnxOptions(RuntimeOptions):
    """``[options]`` of an ONNX model manifest."""

    execution_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="Providers in order of preference, or ['auto'] for the best installed.",
    )
    inter_op_threads: int | None = Field(default=None, ge=1, le=256)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    memory_arena: bool = Field(
        default=True, description="onnxruntime's CPU memory arena (off saves RSS on a Pi)."
    )
    batching: bool = Field(
        default=False,
        description="Stack concurrent requests into one run (only for models whose first "
        "input and output dimension is dynamic). Unless parallel is set, it becomes "
        "2 × max_batch so the next batch gathers while one runs.",
    )
    max_batch: int = Field(
        default=32, ge=1, le=4096, description="Most rows (summed batch sizes) in one run."
    )
    batch_delay_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description="Milliseconds a run waits for more requests to fill its batch; 0 runs "
        "what is waiting at once.",
    )
    inline_max_ms: float = Field(
        default=0.2,
        ge=0,
        le=5,
        allow_inf_nan=False,
        description="Unbatched runs measured faster than this many milliseconds run on the "
        "event loop instead of a worker thread, whose hop costs more; 0 never does.",
    )

    @model_validator(mode="before")
    @classmethod
    def _batching_parallel(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("batching") is True and data.get("parallel") is None:
            max_batch = data.get("max_batch", 32)
            if isinstance(max_batch, int) and max_batch >= 1:
                data = {**data, "parallel": min(64, 2 * max_batch)}
        return data


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The providers to use, in order, from those wanted and those installed."""
    if list(wanted) == ["auto"]:
        wanted = _AUTO_ORDER
    chosen = [p for p in wanted if p in available]
    for missing in (p for p in wanted if p not in available):
        if missing != "XnnpackExecutionProvider" or list(wanted) != list(_AUTO_ORDER):
            log.warning("execution provider %s is not installed; skipping it", missing)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # always a fallback for unsupported nodes
    return chosen


class OnnxRuntime(Runtime):
    """A tensor model run by an onnxruntime ``InferenceSession``."""

    kind: ClassVar[str] = "onnx"
    options_model: ClassVar[type[RuntimeOptions]] = OnnxOptions

    _session: Any = None
    _signature: Signature = Signature()
    _batcher: Batcher | None = None

    def __init__(self, name: str, path: Path, options: RuntimeOptions, workers: int) -> None:
        super().__init__(name, path, options, workers)
        assert isinstance(options, OnnxOptions)
        self.inline_policy = InlinePolicy(options.inline_max_ms / 1000)
        # What a threaded run is timed with for the inline policy (set once loaded, see
        # _computes_alone).
        self._clock: Callable[[], float] = time.perf_counter

    def load_blocking(self) -> None:
        import onnxruntime as ort

        options = self.options
        assert isinstance(options, OnnxOptions)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads or 0
        if options.inter_op_threads:
            so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.graph_optimization]
        so.enable_cpu_mem_arena = options.memory_arena
        so.log_severity_level = 3  # warnings from onnxruntime go to stderr otherwise
        providers = choose_providers(options.execution_providers, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ModelLoadError(f"onnxruntime cannot load {self.path.name}: {exc}") from exc
        self._signature = Signature(
            inputs=tuple(_spec(arg) for arg in self._session.get_inputs()),
            outputs=tuple(_spec(arg) for arg in self._session.get_outputs()),
        )
        log.info("model %s: onnxruntime providers %s", self.name, self._session.get_providers())
        alone = _computes_alone(options, self._session.get_providers())
        self._clock = time.thread_time if alone else time.perf_counter
        self.inline_policy.alone = alone

    async def load(self) -> None:
        await super().load()
        options = self.options
        assert isinstance(options, OnnxOptions)
        if not options.batching:
            return
        tensors = self._signature.inputs + self._signature.outputs
        if not all(spec.shape and spec.shape[0] == -1 for spec in tensors):
            log.warning(
                "model %s: batching is on but its first dimension is not dynamic for "
                "every tensor; running requests one by one",
                self.name,
            )
            return
        self._batcher = Batcher(
            self.name,
            self._infer_one,
            max_batch=options.max_batch,
            delay=options.batch_delay_ms / 1000,
            stats=self.stats,
        )
        log.info(
            "model %s: dynamic batching up to %d rows, %.1f ms delay",
            self.name,
            options.max_batch,
            options.batch_delay_ms,
        )

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        await super().close()

    def close_blocking(self) -> None:
        self._session = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.INFER})

    @property
    def signature(self) -> Signature:
        return self._signature

    async def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        if self._batcher is not None:
            return await self._batcher.infer(inputs, outputs)
        self.stats.observe_batch(1)
        feed, wanted = dict(inputs), list(outputs)
        # Strings' run time follows their length, which nbytes does not see: never inline.
        size = -1 if any(v.dtype == np.object_ for v in feed.values()) else _nbytes(feed)
        policy = self.inline_policy
        if policy.inline(size):
            # Wall time: what the loop loses (and a cheap clock, unlike thread CPU time).
            started = time.perf_counter()
            try:
                return self._run(feed, wanted)
            finally:
                policy.observe(size, time.perf_counter() - started, threaded=False)
        policy.threaded()
        took: list[float] = []
        try:
            return await self.run_blocking(self._timed_run, feed, wanted, took)
        finally:
            # Timed on the thread: the run itself, not the hop or the wait for a worker.
            policy.observe(size, took[0] if took else None, threaded=True)

    def _timed_run(
        self, inputs: dict[str, Array], outputs: list[str], took: list[float]
    ) -> dict[str, Array]:
        clock = self._clock
        started = clock()
        try:
            return self._run(inputs, outputs)
        finally:
            took.append(clock() - started)

    async def _infer_one(self, inputs: dict[str, Array], outputs: list[str]) -> dict[str, Array]:
        return await self.run_blocking(self._run, inputs, outputs)

    def _run(self, inputs: dict[str, Array], outputs: list[str]) -> dict[str, Array]:
        feed = {
            name: (value.astype(np.str_) if value.dtype == np.object_ else value)
            for name, value in inputs.items()
        }
        results = self._session.run(outputs, feed)
        return {name: np.asarray(value) for name, value in zip(outputs, results, strict=True)}


def _computes_alone(options: OnnxOptions, providers: Sequence[str]) -> bool:
    """Whether each run computes on the thread that calls it and nowhere else: a session
    of one thread on the CPU alone. Then concurrent runs share nothing (an inline run
    may go while threaded ones are in flight, see ``runtimes/inline.py``), and a worker
    thread's CPU time is its run's work, so the inline policy times threaded runs by it:
    their wall time also counts the wait for the GIL once the run is done, which on a
    busy loop is longer than the run, and one run measured slow that way would keep every
    run on the thread hop. Other sessions (a thread pool, an accelerator) are timed by
    the wall clock."""
    return options.threads == 1 and list(providers) == ["CPUExecutionProvider"]


def _nbytes(feed: Mapping[str, Array]) -> int:
    return sum(value.nbytes for value in feed.values())


def _spec(arg: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None or datatype not in DATATYPES:
        raise ModelLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape)
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)
