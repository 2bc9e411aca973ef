"""The real ``tritonclient.http`` client against a daemon subprocess serving the default models.

Every result is compared with onnxruntime run directly on the same model file, so the
binary tensor extension, the JSON tensor form and the routes are checked end to end.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from appliance import __version__
from tests.conftest import DEFAULT_MODELS, DaemonProcess, daemon

MODEL = "sensor-anomaly"
MODEL_FILE = DEFAULT_MODELS / MODEL / "model.onnx"
BUILD_SCRIPT = DEFAULT_MODELS / "build_sensor_anomaly.py"

# onnxruntime type strings -> Open Inference Protocol datatypes, for the tensors this model has.
_ORT_TO_OIP = {"tensor(float)": "FP32", "tensor(bool)": "BOOL"}


def load_build_script() -> ModuleType:
    """The default model's build script, imported by path for its data generator."""
    name = "_appliance_build_sensor_anomaly"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def sensor_windows(count: int, seed: int = 77) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``count`` realistic windows [count, 32, 3], normal and anomalous mixed."""
    data = load_build_script().generate_dataset(seed, n_devices=2, days=0.5, anomaly_fraction=0.3)
    windows = np.ascontiguousarray(data.windows[:count], dtype=np.float32)
    assert windows.shape == (count, 32, 3)
    return windows


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    """onnxruntime on the very file the daemon serves, with the manifest's thread count."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODEL_FILE), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def served() -> Iterator[DaemonProcess]:
    assert MODEL_FILE.is_file(), f"{MODEL_FILE} is missing; run models/build_sensor_anomaly.py"
    with daemon() as proc:
        yield proc


@pytest.fixture
def client(served: DaemonProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=served.url.removeprefix("http://"))
    try:
        yield c
    finally:
        c.close()


def expected(session: ort.InferenceSession, windows: np.ndarray[Any, Any]) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"window": windows}), strict=True))


def window_input(windows: np.ndarray[Any, Any], *, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("window", list(windows.shape), "FP32")
    tensor.set_data_from_numpy(windows, binary_data=binary)
    return tensor


# ---------------------------------------------------------------------------- health


def test_server_live_and_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()


def test_model_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready(MODEL, model_version="2")
    assert not client.is_model_ready("no-such-model")


def test_a_failed_model_is_not_ready(tmp_path: Path) -> None:
    """A model that failed to load answers 400 to .../ready, which the client reads as
    not ready, while the server and the other models stay ready."""
    repo = tmp_path / "models"
    shutil.copytree(MODEL_FILE.parent, repo / MODEL)
    (repo / "broken").mkdir()
    (repo / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "missing.onnx"\n', encoding="utf-8"
    )
    with daemon("--models-dir", str(repo), ready=False) as proc:
        c = triton.InferenceServerClient(url=proc.url.removeprefix("http://"))
        try:
            deadline = time.monotonic() + 60
            while not c.is_model_ready(MODEL):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert not c.is_model_ready("broken")
            assert not c.is_model_ready("broken", model_version="1")
            assert c.is_server_live()
        finally:
            c.close()


# -------------------------------------------------------------------------- metadata


def test_server_metadata(client: triton.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta["name"] == "appliance"
    assert meta["version"] == __version__
    assert "binary_tensor_data" in meta["extensions"]


def test_claimed_extensions_work(client: triton.InferenceServerClient) -> None:
    """A client may call whatever the server says it supports."""
    extensions = set(client.get_server_metadata()["extensions"])
    assert extensions <= {"binary_tensor_data", "model_repository"}
    if "model_repository" in extensions:
        index = client.get_model_repository_index()
        assert MODEL in [entry["name"] for entry in index]


@pytest.mark.parametrize("version", ["", "1"])
def test_model_metadata_matches_onnxruntime(
    client: triton.InferenceServerClient, session: ort.InferenceSession, version: str
) -> None:
    meta = client.get_model_metadata(MODEL, model_version=version)
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"

    def describe(args: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": a.name,
                "datatype": _ORT_TO_OIP[a.type],
                "shape": [d if isinstance(d, int) else -1 for d in a.shape],
            }
            for a in args
        ]

    assert meta["inputs"] == describe(session.get_inputs())
    assert meta["outputs"] == describe(session.get_outputs())
    assert meta["inputs"] == [{"name": "window", "datatype": "FP32", "shape": [-1, 32, 3]}]


# ------------------------------------------------------------------------- inference


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("binary_in", [True, False], ids=["in-binary", "in-json"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["out-binary", "out-json"])
def test_infer_matches_onnxruntime(
    client: triton.InferenceServerClient,
    session: ort.InferenceSession,
    batch: int,
    binary_in: bool,
    binary_out: bool,
) -> None:
    windows = sensor_windows(batch, seed=100 + batch)
    want = expected(session, windows)
    outputs = [
        triton.InferRequestedOutput("score", binary_data=binary_out),
        triton.InferRequestedOutput("is_anomaly", binary_data=binary_out),
    ]
    result = client.infer(MODEL, [window_input(windows, binary=binary_in)], outputs=outputs)

    response = result.get_response()
    assert response["model_name"] == MODEL
    assert response["model_version"] == "1"
    by_name = {o["name"]: o for o in response["outputs"]}
    assert set(by_name) == {"score", "is_anomaly"}
    for out in by_name.values():
        assert ("binary_data_size" in out.get("parameters", {})) is binary_out
        assert ("data" in out) is not binary_out
        assert out["shape"] == [batch]
    assert by_name["score"]["datatype"] == "FP32"
    assert by_name["is_anomaly"]["datatype"] == "BOOL"

    score = result.as_numpy("score")
    flags = result.as_numpy("is_anomaly")
    assert score.dtype == np.float32
    assert flags.dtype == np.bool_
    np.testing.assert_allclose(score, want["score"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(flags, want["is_anomaly"])


def test_batch_mixes_normal_and_anomalous(session: ort.InferenceSession) -> None:
    """Guards the comparison above: the bool output must not be constant on the test data."""
    flags = expected(session, sensor_windows(8, seed=108))["is_anomaly"]
    assert flags.any()
    assert not flags.all()


def test_infer_without_requested_outputs_returns_all(
    client: triton.InferenceServerClient, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(4)
    want = expected(session, windows)
    result = client.infer(MODEL, [window_input(windows)])
    np.testing.assert_allclose(result.as_numpy("score"), want["score"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), want["is_anomaly"])


def test_infer_one_output_mixed_with_json(
    client: triton.InferenceServerClient, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(8, seed=5)
    want = expected(session, windows)
    result = client.infer(
        MODEL,
        [window_input(windows)],
        outputs=[triton.InferRequestedOutput("is_anomaly", binary_data=False)],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["is_anomaly"]
    assert result.as_numpy("score") is None
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), want["is_anomaly"])


def test_versioned_infer(
    client: triton.InferenceServerClient, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(2)
    result = client.infer(MODEL, [window_input(windows)], model_version="1")
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(
        result.as_numpy("score"), expected(session, windows)["score"], rtol=1e-6, atol=1e-6
    )
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [window_input(windows)], model_version="2")
    assert err.value.status() == "404"
    assert "version '2' not found" in str(err.value.message())


def test_request_id_is_echoed(client: triton.InferenceServerClient) -> None:
    result = client.infer(MODEL, [window_input(sensor_windows(1))], request_id="req-42")
    assert result.get_response()["id"] == "req-42"


def test_concurrent_async_infer(served: DaemonProcess, session: ort.InferenceSession) -> None:
    """Several requests in flight at once each get their own answer."""
    batches = [sensor_windows(3, seed=200 + i) for i in range(6)]
    with triton.InferenceServerClient(url=served.url.removeprefix("http://"), concurrency=4) as c:
        pending = [c.async_infer(MODEL, [window_input(w)]) for w in batches]
        results = [p.get_result() for p in pending]
    for windows, result in zip(batches, results, strict=True):
        want = expected(session, windows)
        np.testing.assert_allclose(result.as_numpy("score"), want["score"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("is_anomaly"), want["is_anomaly"])


# ---------------------------------------------------------------------------- errors


def test_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    windows = sensor_windows(1)
    calls: list[Callable[[], object]] = [
        lambda: client.infer("no-such-model", [window_input(windows)]),
        lambda: client.get_model_metadata("no-such-model"),
        lambda: client.get_model_metadata("no-such-model", model_version="1"),
    ]
    for call in calls:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404"
        message = str(err.value.message())
        assert message.startswith("model 'no-such-model'")
        assert message.endswith("not found")


def bad_request(
    client: triton.InferenceServerClient,
    tensor: triton.InferInput,
    outputs: list[triton.InferRequestedOutput] | None = None,
) -> str:
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [tensor], outputs=outputs)
    assert err.value.status() == "400"
    return str(err.value.message())


@pytest.mark.parametrize("binary", [True, False])
def test_wrong_shape_names_the_tensor(client: triton.InferenceServerClient, binary: bool) -> None:
    windows = np.zeros((2, 16, 3), dtype=np.float32)
    message = bad_request(client, window_input(windows, binary=binary))
    assert "'window'" in message
    assert "[2, 16, 3]" in message
    assert "32" in message


def test_wrong_rank_names_the_tensor(client: triton.InferenceServerClient) -> None:
    message = bad_request(client, window_input(np.zeros((32, 3), dtype=np.float32)))
    assert "'window'" in message
    assert "shape" in message


@pytest.mark.parametrize("binary", [True, False])
def test_wrong_datatype_names_the_tensor(
    client: triton.InferenceServerClient, binary: bool
) -> None:
    tensor = triton.InferInput("window", [1, 32, 3], "FP64")
    tensor.set_data_from_numpy(sensor_windows(1).astype(np.float64), binary_data=binary)
    message = bad_request(client, tensor)
    assert "'window'" in message
    assert "FP64" in message
    assert "FP32" in message


def test_unknown_input_names_the_tensor(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("readings", [1, 32, 3], "FP32")
    tensor.set_data_from_numpy(sensor_windows(1))
    message = bad_request(client, tensor)
    assert "'readings'" in message
    assert "window" in message


def test_unknown_output_names_the_tensor(client: triton.InferenceServerClient) -> None:
    message = bad_request(
        client, window_input(sensor_windows(1)), [triton.InferRequestedOutput("verdict")]
    )
    assert "'verdict'" in message
    assert "score" in message


def test_non_finite_input_names_the_tensor(client: triton.InferenceServerClient) -> None:
    windows = sensor_windows(2)
    windows[1, 5, 0] = np.nan
    message = bad_request(client, window_input(windows))
    assert "'window'" in message
    assert "NaN" in message


def test_daemon_still_serves_after_errors(
    client: triton.InferenceServerClient, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(8, seed=9)
    result = client.infer(MODEL, [window_input(windows)])
    np.testing.assert_array_equal(
        result.as_numpy("is_anomaly"), expected(session, windows)["is_anomaly"]
    )
    assert client.is_server_ready()
