"""Model repositories for lifecycle tests: versions of the real sensor-anomaly model, and a
deliberately broken version (NaN scores) built with onnx.helper."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tests.conftest import DEFAULT_MODELS

GOOD = DEFAULT_MODELS / "sensor-anomaly" / "model.onnx"


def nan_model(path: Path) -> Path:
    """Same signature as sensor-anomaly, but every score is NaN (and never an anomaly)."""
    import onnx
    from onnx import TensorProto, helper

    window = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", 32, 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    flag = helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["batch"])
    nodes = [
        helper.make_node("ReduceSum", ["window", "axes"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["sum", "nan"], ["score"]),
        helper.make_node("Greater", ["score", "one"], ["is_anomaly"]),
    ]
    init = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(nodes, "broken", [window], [score, flag], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def add_version(
    repo: Path, name: str, version: str, *, broken: bool = False, corrupt: bool = False
) -> Path:
    """``repo/name/version/`` holding a manifest and a model file."""
    folder = repo / name / version
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    if corrupt:
        target.write_bytes(b"this is not an onnx model")
    elif broken:
        nan_model(target)
    else:
        shutil.copyfile(GOOD, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    (folder / "manifest.toml").write_text(
        f'name = "{name}"\nruntime = "onnx"\nfile = "model.onnx"\nsha256 = "{digest}"\n'
        "[options]\nthreads = 1\n"
    )
    return folder
