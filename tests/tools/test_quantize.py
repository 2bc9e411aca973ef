"""``appliance models quantize``: ONNX FP32 → INT8 (dynamic, static with calibration) and GGUF
re-quantization, each with a before/after report.

Stated tolerance for the INT8 ONNX models, on held-out inputs, relative to the range
(max − min) of the FP32 outputs: mean absolute error ≤ 1 %, and max absolute error ≤ 5 %
(dynamic) or 20 % (static: activations are quantized too, with a calibrated range).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.tools.quantize import quantize_gguf, quantize_onnx
from tests.conftest import ROOT

MEAN_TOLERANCE = 0.01
MAX_TOLERANCE = {"dynamic": 0.05, "static": 0.20}


def mlp(path: Path, seed: int = 3) -> Path:
    """A small FP32 classifier-like network: 32 → 64 → 64 → 8 with ReLU."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = [32, 64, 64, 8]
    nodes, init = [], []
    current = "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
        bias = rng.normal(0, 0.1, b).astype(np.float32)
        init += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        out = "y" if i == len(sizes) - 2 else f"a{i}"
        add = f"z{i}" if out != "y" else "y"
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [add]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [add], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_onnx_int8_stays_within_tolerance(tmp_path: Path, mode: str) -> None:
    src = mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(11)
    calibration = {"x": rng.normal(size=(256, 32)).astype(np.float32)}
    evaluation = {"x": rng.normal(size=(256, 32)).astype(np.float32)}
    report = quantize_onnx(
        src, tmp_path / f"mlp-{mode}.onnx", mode, calibration=calibration, evaluation=evaluation
    )
    import onnxruntime as ort

    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, evaluation)[
        0
    ]
    spread = float(ref.max() - ref.min())
    assert report.accuracy["y.mean_abs_error"] <= MEAN_TOLERANCE * spread, report.text()
    assert report.accuracy["y.max_abs_error"] <= MAX_TOLERANCE[mode] * spread, report.text()
    assert report.after.size_bytes < report.before.size_bytes
    assert report.before.speed > 0 and report.after.speed > 0


def test_static_needs_calibration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(mlp(tmp_path / "m.onnx"), tmp_path / "o.onnx", "static")


def test_cli_quantizes_onnx_and_reports_json(tmp_path: Path) -> None:
    src = mlp(tmp_path / "mlp.onnx")
    np.savez(
        tmp_path / "cal.npz", x=np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32)
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "models",
            "quantize",
            str(src),
            str(tmp_path / "q.onnx"),
            "--scheme",
            "static",
            "--calibration",
            str(tmp_path / "cal.npz"),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["kind"] == "onnx-static" and "y.max_abs_error" in report["accuracy"]


def test_gguf_requantization_of_an_f32_model(stories_gguf: Path, tmp_path: Path) -> None:
    # stories260K's ffn rows (172) fit no 32-element block: llama.cpp keeps them F16, so the
    # whole-model F16 is the type it supports fully.
    report = quantize_gguf(stories_gguf, tmp_path / "stories-f16.gguf", "f16")
    assert report.after.size_bytes < 0.6 * report.before.size_bytes
    assert report.before.perplexity is not None and report.after.perplexity is not None
    assert abs(report.after.perplexity - report.before.perplexity) < 0.05 * (
        report.before.perplexity
    )
    from llama_cpp import Llama

    llm = Llama(model_path=str(tmp_path / "stories-f16.gguf"), n_ctx=128, verbose=False)
    try:
        text = llm.create_completion("Once upon a time", max_tokens=8, temperature=0)
        assert text["choices"][0]["text"]
    finally:
        llm.close()


def test_gguf_requantization_measures_without_cpu_repacking(tmp_path: Path) -> None:
    """The project's own Q8_0 model to Q4_0, measured as a ``cpu_repack = false`` model runs
    (tiny models' rows crash llama.cpp's repacked layouts on AMX processors)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    source = ROOT / "models" / "home-intent" / "home-intent-q8_0.gguf"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "models",
            "quantize",
            str(source),
            str(tmp_path / "q4.gguf"),
            "--type",
            "q4_0",
            "--threads",
            "1",
            "--no-cpu-repack",
            "--as-json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["kind"] == "gguf-q4_0"
    assert report["after"]["size_bytes"] < report["before"]["size_bytes"]
    assert report["before"]["perplexity"] and report["after"]["perplexity"]
