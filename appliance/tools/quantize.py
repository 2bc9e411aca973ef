"""Model quantization: ONNX FP32 → INT8 (onnxruntime) and GGUF re-quantization (llama.cpp).

Each run measures the model before and after on the same data and reports the file size,
the speed and the accuracy: for ONNX the largest output difference from FP32 (and the share
of equal discrete outputs), for GGUF the perplexity on a text. Blocking throughout; these
are tools run from the command line, never inside the daemon.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import queue
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from appliance.core.types import Array
from appliance.tools import GGUF_TYPES

OnnxMode = Literal["dynamic", "static"]
T = TypeVar("T")


@dataclass(frozen=True)
class Measure:
    """One model's numbers."""

    path: str
    size_bytes: int
    speed: float  # ONNX: inferences/s of the evaluation batch; GGUF: prompt tokens/s
    speed_unit: str
    perplexity: float | None = None  # GGUF only


@dataclass(frozen=True)
class Report:
    """Before and after, and how far the quantized model's answers moved."""

    kind: str  # "onnx-dynamic" | "onnx-static" | "gguf-<type>"
    before: Measure
    after: Measure
    accuracy: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        b, a = self.before, self.after
        lines = [
            f"{self.kind}: {b.path} -> {a.path}",
            f"  size   {b.size_bytes:>12,} B -> {a.size_bytes:>12,} B "
            f"({a.size_bytes / max(1, b.size_bytes):.2f}x)",
            f"  speed  {b.speed:>12.1f} -> {a.speed:>12.1f} {a.speed_unit} "
            f"({a.speed / b.speed if b.speed else 0:.2f}x)",
        ]
        if b.perplexity is not None and a.perplexity is not None:
            lines.append(f"  perplexity {b.perplexity:.4f} -> {a.perplexity:.4f}")
        for key, value in self.accuracy.items():
            lines.append(f"  {key} {value:.6g}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- ONNX


def load_samples(path: Path) -> dict[str, Array]:
    """Calibration or evaluation inputs from an ``.npz``: one array per input, samples first."""
    with np.load(path, allow_pickle=False) as data:
        return {name: np.asarray(data[name]) for name in data.files}


def quantize_onnx(
    src: Path,
    dst: Path,
    mode: OnnxMode,
    *,
    calibration: Mapping[str, Array] | None = None,
    evaluation: Mapping[str, Array] | None = None,
    per_channel: bool = False,
) -> Report:
    """FP32 → INT8: ``dynamic`` (weights only) or ``static`` (QDQ, activations calibrated).

    ``calibration`` (arrays per input name, first axis = samples) is required for static.
    ``evaluation`` defaults to the calibration data, else random data shaped like the inputs.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "static":
        if not calibration:
            raise ValueError("static quantization needs calibration data (--calibration)")
        quantize_static(
            str(src),
            str(dst),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
        )
    else:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    inputs = dict(evaluation or calibration or _random_inputs(src))
    before, out_before = _run_onnx(src, inputs)
    after, out_after = _run_onnx(dst, inputs)
    return Report(f"onnx-{mode}", before, after, compare_outputs(out_before, out_after))


def compare_outputs(reference: Mapping[str, Array], other: Mapping[str, Array]) -> dict[str, float]:
    """Largest absolute and relative float differences; agreement of discrete outputs."""
    out: dict[str, float] = {}
    for name, ref in reference.items():
        got = other[name]
        if ref.dtype.kind == "f":
            finite = np.isfinite(ref) & np.isfinite(got)
            diff = np.abs(ref[finite].astype(np.float64) - got[finite])
            scale = np.maximum(np.abs(ref[finite]), 1e-6)
            out[f"{name}.max_abs_error"] = float(diff.max()) if diff.size else 0.0
            out[f"{name}.mean_abs_error"] = float(diff.mean()) if diff.size else 0.0
            out[f"{name}.max_rel_error"] = float((diff / scale).max()) if diff.size else 0.0
        else:
            out[f"{name}.agreement"] = float(np.mean(ref == got)) if ref.size else 1.0
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over in-memory arrays."""

    def __init__(self, data: Mapping[str, Array]) -> None:
        self._data = data
        self._iter: Iterator[dict[str, Array]] = self._samples()

    def _samples(self) -> Iterator[dict[str, Array]]:
        count = min(len(v) for v in self._data.values())
        for i in range(count):
            yield {name: value[i : i + 1] for name, value in self._data.items()}

    def get_next(self) -> dict[str, Array] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._samples()


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _random_inputs(path: Path) -> dict[str, Array]:
    rng = np.random.default_rng(0)
    out: dict[str, Array] = {}
    for node in _session(path).get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 16 for d in node.shape]
        out[node.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _run_onnx(path: Path, inputs: Mapping[str, Array]) -> tuple[Measure, dict[str, Array]]:
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    feed = dict(inputs)
    results = session.run(names, feed)  # warm-up, and the answers compared
    batch = min(len(v) for v in inputs.values()) or 1
    runs, started = 0, time.perf_counter()
    while runs < 5 or time.perf_counter() - started < 0.3:
        session.run(names, feed)
        runs += 1
    speed = runs * batch / (time.perf_counter() - started)
    measure = Measure(str(path), path.stat().st_size, round(speed, 1), "inferences/s")
    return measure, dict(zip(names, (np.asarray(r) for r in results), strict=True))


# ------------------------------------------------------------------------------- GGUF


Progress = Callable[[int, int], None]


def quantize_gguf(
    src: Path,
    dst: Path,
    qtype: str,
    *,
    eval_text: str | None = None,
    threads: int = 2,
    allow_requantize: bool = True,
    cpu_repack: bool = True,
    progress: Progress | None = None,
) -> Report:
    """Re-quantize a GGUF file (e.g. F32/F16 → Q8_0, Q4_K_M) with llama.cpp's quantize API.

    Tensors whose rows do not fit the type's block size are kept in a type that does, as
    llama.cpp decides. ``eval_text`` is scored before and after (perplexity), with CPU
    weight repacking as ``cpu_repack`` says (the model option of the same name).
    ``progress(done, total)`` hears of each tensor as llama.cpp converts it; llama.cpp's
    own line per tensor is not printed.
    """
    key = qtype.lower()
    if key not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}; allowed: {', '.join(GGUF_TYPES)}")
    # Each llama.cpp step runs in a fresh child process: a model loaded in a process that
    # has already quantized or loaded another crashes now and then in decode
    # (llama-cpp-python 0.3.x), and a native crash must not take the caller along.
    ctx = multiprocessing.get_context("spawn")
    text = eval_text or _DEFAULT_TEXT

    def child(fn: Callable[..., T], *args: Any) -> T:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            return pool.submit(fn, *args).result()

    events: Any = ctx.Queue()
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_report_to, initargs=(events,)) as pool:
        job = pool.submit(_quantize_child, str(src), str(dst), key, threads, allow_requantize)
        while not job.done() or not events.empty():
            try:
                done, total = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if progress is not None:
                progress(done, total)
        code, problems = job.result()
    events.close()
    if code != 0 or not dst.is_file():
        detail = f": {' '.join(problems)[-500:]}" if problems else ""
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype} (code {code}){detail}")
    before = child(_measure_gguf, src, text, threads, cpu_repack)
    after = child(_measure_gguf, dst, text, threads, cpu_repack)
    return Report(f"gguf-{key}", before, after)


_DEFAULT_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "sunshine. One day, she saw a big, red ball in the park. She ran to the ball and kicked "
    "it high into the sky. The ball came down and bounced next to a small dog."
)

# llama.cpp logs "[  12/  57]  blk.1.attn_q.weight - [...], type = f32, ..." per tensor.
_TENSOR_LINE = re.compile(rb"^\[\s*(\d+)/\s*(\d+)\]")
_events: Any = None  # the child's queue to the parent (set by _report_to)


def _report_to(events: Any) -> None:
    global _events
    _events = events


def _quantize_child(
    src: str, dst: str, key: str, threads: int, requantize: bool
) -> tuple[int, list[str]]:
    """Quantize in this (child) process; llama.cpp's log becomes progress events, and its
    warnings and errors are returned for the caller's message."""
    import ctypes

    import llama_cpp

    problems: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        match = _TENSOR_LINE.match(text)
        if match and _events is not None:
            _events.put((int(match.group(1)), int(match.group(2))))
        elif level in (2, 3):  # GGML_LOG_LEVEL_WARN, _ERROR
            problems.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + key.upper())
    params.nthread = threads
    params.allow_requantize = requantize
    code = int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
    return code, problems


_CTX = 256


def _measure_gguf(path: Path, text: str, threads: int, cpu_repack: bool = True) -> Measure:
    """Perplexity of ``text`` (one context window at most) and prompt tokens per second."""
    import llama_cpp

    from appliance.runtimes.llama_open import open_llama

    # Logits of every position come from one token at a time: logits_all=True crashes
    # now and then in decode (llama-cpp-python 0.3.x). Speed is a separate batched pass.
    llm: Any = open_llama(
        cpu_repack=cpu_repack, model_path=str(path), n_ctx=_CTX, n_threads=threads, verbose=False
    )
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)[:_CTX]
        rows = []
        for token in tokens:
            llm.eval([token])
            pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            rows.append(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64))
        logits = np.stack(rows)
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        elapsed = time.perf_counter() - started
    finally:
        llm.close()
    # Perplexity: exp of the mean negative log-likelihood of each next token.
    shifted = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = -logprobs[np.arange(len(tokens) - 1), tokens[1:]]
    return Measure(
        str(path),
        path.stat().st_size,
        round(len(tokens) / elapsed, 1),
        "prompt tokens/s",
        perplexity=round(math.exp(float(nll.mean())), 4),
    )


def report_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)


__all__ = [
    "GGUF_TYPES",
    "Measure",
    "Progress",
    "Report",
    "compare_outputs",
    "load_samples",
    "quantize_gguf",
    "quantize_onnx",
    "report_json",
]
