"""Open Inference Protocol v2 routes spoken by hand: JSON tensors and the binary extension.

An in-process daemon serves a repository with the default ONNX model and one model that
cannot load; results are compared with onnxruntime run directly on the same file.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from appliance import __version__
from appliance.server import Server
from tests.conftest import DEFAULT_MODELS, base_url, make_config, serving

MODEL = "sensor-anomaly"
MODEL_FILE = DEFAULT_MODELS / MODEL / "model.onnx"
HEADER = "Inference-Header-Content-Length"

Json = dict[str, Any]


def sensor_windows(count: int, seed: int = 11) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``count`` realistic windows [count, 32, 3] from the default model's own simulator."""
    name = "_appliance_build_sensor_anomaly"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            name, DEFAULT_MODELS / "build_sensor_anomaly.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    data = module.generate_dataset(seed, n_devices=2, days=0.5, anomaly_fraction=0.3)
    return np.ascontiguousarray(data.windows[:count], dtype=np.float32)


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(MODEL_FILE), options, providers=["CPUExecutionProvider"])


def expected(session: ort.InferenceSession, windows: np.ndarray[Any, Any]) -> dict[str, Any]:
    return dict(
        zip(
            ["score", "is_anomaly"],
            session.run(["score", "is_anomaly"], {"window": windows}),
            strict=True,
        )
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    repo = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS / MODEL, repo / MODEL)
    (repo / "broken").mkdir()
    (repo / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "missing.onnx"\n', encoding="utf-8"
    )
    async with serving(make_config(models={"dir": repo})) as srv:
        yield srv


@pytest.fixture
def url(server: Server) -> str:
    return base_url(server)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Json]:
    async with http.get(url) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def post_json(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Json]:
    async with http.post(url, json=body) as resp:
        assert resp.content_type == "application/json"
        assert HEADER not in resp.headers
        return resp.status, await resp.json()


def json_input(windows: np.ndarray[Any, Any], *, flat: bool = False) -> Json:
    data = windows.reshape(-1).tolist() if flat else windows.tolist()
    return {"name": "window", "datatype": "FP32", "shape": list(windows.shape), "data": data}


async def client_error(
    http: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str] | None = None
) -> str:
    """POST raw bytes; assert an OIP 400 and return its message."""
    async with http.post(url, data=data, headers=headers or {}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    return str(body["error"])


# ------------------------------------------------------------------------ server routes


async def test_server_metadata(http: aiohttp.ClientSession, url: str) -> None:
    status, body = await get(http, url + "/v2")
    assert status == 200
    assert body["name"] == "appliance"
    assert body["version"] == __version__
    assert "binary_tensor_data" in body["extensions"]


async def test_live_and_ready(http: aiohttp.ClientSession, url: str) -> None:
    assert await get(http, url + "/v2/health/live") == (200, {"live": True})
    # One model failed, the other serves: the server is ready.
    assert await get(http, url + "/v2/health/ready") == (200, {"ready": True})


# ------------------------------------------------------------------------- model routes


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"])
async def test_metadata_of_a_ready_model(http: aiohttp.ClientSession, url: str, path: str) -> None:
    status, body = await get(http, url + path)
    assert status == 200
    assert body == {
        "name": MODEL,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "window", "datatype": "FP32", "shape": [-1, 32, 3]}],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "is_anomaly", "datatype": "BOOL", "shape": [-1]},
        ],
        "state": "ready",
    }


async def test_metadata_of_a_failed_model(http: aiohttp.ClientSession, url: str) -> None:
    status, body = await get(http, url + "/v2/models/broken")
    assert status == 200
    assert body["state"] == "failed"
    assert "missing.onnx" in body["error"]
    assert "does not exist" in body["error"]
    assert body["inputs"] == []
    assert body["outputs"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        f"/v2/models/{MODEL}/versions/2",
        f"/v2/models/{MODEL}/versions/2/ready",
    ],
)
async def test_unknown_model_or_version_is_404(
    http: aiohttp.ClientSession, url: str, path: str
) -> None:
    status, body = await get(http, url + path)
    assert status == 404
    assert set(body) == {"error"}
    assert "not found" in body["error"]


@pytest.mark.parametrize(
    "path", [f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"]
)
async def test_ready_model_is_ready(http: aiohttp.ClientSession, url: str, path: str) -> None:
    assert await get(http, url + path) == (200, {"name": MODEL, "ready": True})


@pytest.mark.parametrize("path", ["/v2/models/broken/ready", "/v2/models/broken/versions/1/ready"])
async def test_failed_model_is_not_ready(http: aiohttp.ClientSession, url: str, path: str) -> None:
    # The protocol: 200 when ready, 4xx otherwise; Triton answers 400 (503 would make a
    # load balancer take the whole server out for one model).
    status, body = await get(http, url + path)
    assert status == 400
    assert "'broken'" in body["error"]
    assert "failed" in body["error"]
    assert "missing.onnx" in body["error"]


async def test_infer_on_a_failed_model_is_503(http: aiohttp.ClientSession, url: str) -> None:
    async with http.post(
        url + "/v2/models/broken/infer", json={"inputs": [json_input(sensor_windows(1))]}
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"].isdigit()
        body = await resp.json()
    assert "missing.onnx" in body["error"]


async def test_infer_on_an_unknown_model_is_404(http: aiohttp.ClientSession, url: str) -> None:
    status, body = await post_json(
        http, url + "/v2/models/nope/infer", {"inputs": [json_input(sensor_windows(1))]}
    )
    assert status == 404
    assert body == {"error": "model 'nope' not found"}


async def test_wrong_method_is_405_in_oip_shape(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url + f"/v2/models/{MODEL}/infer") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        body = await resp.json()
    assert set(body) == {"error"}


# ------------------------------------------------------------------------- JSON tensors


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
@pytest.mark.parametrize("batch", [1, 8])
async def test_json_infer_matches_onnxruntime(
    http: aiohttp.ClientSession, url: str, session: ort.InferenceSession, flat: bool, batch: int
) -> None:
    windows = sensor_windows(batch, seed=30 + batch)
    want = expected(session, windows)
    status, body = await post_json(
        http, url + f"/v2/models/{MODEL}/infer", {"inputs": [json_input(windows, flat=flat)]}
    )
    assert status == 200
    assert body["model_name"] == MODEL
    assert body["model_version"] == "1"
    assert "id" not in body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert [o["name"] for o in body["outputs"]] == ["score", "is_anomaly"]
    assert outputs["score"]["datatype"] == "FP32"
    assert outputs["score"]["shape"] == [batch]
    assert outputs["is_anomaly"]["datatype"] == "BOOL"
    assert outputs["is_anomaly"]["shape"] == [batch]
    assert all(isinstance(v, bool) for v in outputs["is_anomaly"]["data"])
    np.testing.assert_allclose(
        np.array(outputs["score"]["data"], dtype=np.float32), want["score"], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(np.array(outputs["is_anomaly"]["data"]), want["is_anomaly"])


async def test_nested_and_flat_agree_exactly(http: aiohttp.ClientSession, url: str) -> None:
    windows = sensor_windows(8)
    answers = []
    for flat in (False, True):
        status, body = await post_json(
            http, url + f"/v2/models/{MODEL}/infer", {"inputs": [json_input(windows, flat=flat)]}
        )
        assert status == 200
        answers.append(body["outputs"])
    assert answers[0] == answers[1]


async def test_json_infer_one_requested_output(
    http: aiohttp.ClientSession, url: str, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(8, seed=3)
    status, body = await post_json(
        http,
        url + f"/v2/models/{MODEL}/versions/1/infer",
        {"inputs": [json_input(windows)], "outputs": [{"name": "is_anomaly"}]},
    )
    assert status == 200
    assert [o["name"] for o in body["outputs"]] == ["is_anomaly"]
    np.testing.assert_array_equal(
        np.array(body["outputs"][0]["data"]), expected(session, windows)["is_anomaly"]
    )


async def test_id_is_echoed(http: aiohttp.ClientSession, url: str) -> None:
    status, body = await post_json(
        http,
        url + f"/v2/models/{MODEL}/infer",
        {"id": "reading-2024-07-01T12:00", "inputs": [json_input(sensor_windows(1))]},
    )
    assert status == 200
    assert body["id"] == "reading-2024-07-01T12:00"


# ----------------------------------------------------------------- binary tensor extension


def binary_request(
    windows: np.ndarray[Any, Any], outputs: list[Json] | None = None, **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """A request in the binary extension: JSON header, then the raw little-endian tensor."""
    raw = windows.astype("<f4").tobytes()
    header: Json = {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(windows.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        **extra,
    }
    if outputs is not None:
        header["outputs"] = outputs
    head = json.dumps(header).encode()
    return head + raw, {HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


async def binary_response(
    resp: aiohttp.ClientResponse,
) -> tuple[Json, dict[str, np.ndarray[Any, Any]]]:
    """Split a binary-extension response into its JSON header and decoded output tensors."""
    assert resp.status == 200
    raw = await resp.read()
    split = int(resp.headers[HEADER])
    header = json.loads(raw[:split])
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    offset = split
    dtypes = {"FP32": np.dtype("<f4"), "BOOL": np.dtype(np.bool_)}
    for out in header["outputs"]:
        if "data" in out:
            arrays[out["name"]] = np.array(out["data"], dtype=dtypes[out["datatype"]])
            continue
        size = out["parameters"]["binary_data_size"]
        chunk = raw[offset : offset + size]
        offset += size
        arrays[out["name"]] = np.frombuffer(chunk, dtype=dtypes[out["datatype"]]).reshape(
            out["shape"]
        )
    assert offset == len(raw), "binary data beyond the declared outputs"
    return header, arrays


@pytest.mark.parametrize("batch", [1, 8])
async def test_binary_in_binary_out(
    http: aiohttp.ClientSession, url: str, session: ort.InferenceSession, batch: int
) -> None:
    windows = sensor_windows(batch, seed=50 + batch)
    want = expected(session, windows)
    body, headers = binary_request(
        windows,
        outputs=[
            {"name": "score", "parameters": {"binary_data": True}},
            {"name": "is_anomaly", "parameters": {"binary_data": True}},
        ],
        id="bin-1",
    )
    async with http.post(url + f"/v2/models/{MODEL}/infer", data=body, headers=headers) as resp:
        assert resp.content_type == "application/octet-stream"
        header, arrays = await binary_response(resp)
    assert header["id"] == "bin-1"
    assert header["model_name"] == MODEL
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in header["outputs"]}
    assert sizes == {"score": 4 * batch, "is_anomaly": batch}
    assert all("data" not in o for o in header["outputs"])
    np.testing.assert_array_equal(arrays["score"], want["score"].astype("<f4"))
    np.testing.assert_array_equal(arrays["is_anomaly"], want["is_anomaly"])


async def test_binary_output_parameter_makes_every_output_binary(
    http: aiohttp.ClientSession, url: str, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(8, seed=4)
    want = expected(session, windows)
    request = {"inputs": [json_input(windows)], "parameters": {"binary_data_output": True}}
    async with http.post(url + f"/v2/models/{MODEL}/infer", json=request) as resp:
        header, arrays = await binary_response(resp)
    assert all("binary_data_size" in o["parameters"] for o in header["outputs"])
    np.testing.assert_array_equal(arrays["score"], want["score"])
    np.testing.assert_array_equal(arrays["is_anomaly"], want["is_anomaly"])


async def test_binary_in_mixed_out(
    http: aiohttp.ClientSession, url: str, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(8, seed=6)
    want = expected(session, windows)
    body, headers = binary_request(
        windows,
        outputs=[
            {"name": "score", "parameters": {"binary_data": False}},
            {"name": "is_anomaly", "parameters": {"binary_data": True}},
        ],
    )
    async with http.post(url + f"/v2/models/{MODEL}/infer", data=body, headers=headers) as resp:
        header, arrays = await binary_response(resp)
    assert "data" in header["outputs"][0]
    assert "id" not in header
    np.testing.assert_allclose(arrays["score"], want["score"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(arrays["is_anomaly"], want["is_anomaly"])


async def test_binary_in_json_out(
    http: aiohttp.ClientSession, url: str, session: ort.InferenceSession
) -> None:
    windows = sensor_windows(2, seed=7)
    body, headers = binary_request(windows)
    async with http.post(url + f"/v2/models/{MODEL}/infer", data=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert HEADER not in resp.headers
        answer = await resp.json()
    flags = answer["outputs"][1]["data"]
    np.testing.assert_array_equal(np.array(flags), expected(session, windows)["is_anomaly"])


# --------------------------------------------------------------------------------- errors


def _json_body(tensor: Json, **extra: Any) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


_WINDOW = {"name": "window", "datatype": "FP32", "shape": [1, 32, 3]}

BAD_JSON_BODIES = {
    "too-few-values": (_json_body({**_WINDOW, "data": [0.5] * 10}), ["'window'", "96"]),
    "string-value": (_json_body({**_WINDOW, "data": ["hot"] * 96}), ["'window'", "hot"]),
    "bool-value": (_json_body({**_WINDOW, "data": [True] * 96}), ["'window'", "FP32"]),
    "unknown-datatype": (
        _json_body({**_WINDOW, "datatype": "FLOAT", "data": [0.0] * 96}),
        ["'window'", "FLOAT"],
    ),
    "negative-dim": (
        _json_body({**_WINDOW, "shape": [-1, 32, 3], "data": [0.0] * 96}),
        ["'window'", "shape"],
    ),
    "no-data": (_json_body(_WINDOW), ["'window'", "data"]),
    "wrong-shape": (
        _json_body({**_WINDOW, "shape": [1, 3, 32], "data": [0.0] * 96}),
        ["'window'", "[1, 3, 32]"],
    ),
    "unknown-input": (
        _json_body({**_WINDOW, "name": "readings", "data": [0.0] * 96}),
        ["'readings'"],
    ),
    "unknown-output": (
        _json_body({**_WINDOW, "data": [0.0] * 96}, outputs=[{"name": "x"}]),
        ["'x'"],
    ),
    "id-not-string": (_json_body({**_WINDOW, "data": [0.0] * 96}, id=7), ["'id'"]),
    "nan-value": (_json_body({**_WINDOW, "data": [float("nan")] * 96}), ["'window'", "NaN"]),
    "bytes-datatype": (
        _json_body({**_WINDOW, "datatype": "BYTES", "data": ["a"] * 96}),
        ["'window'", "BYTES", "FP32"],
    ),
    "absurd-shape": (
        _json_body({**_WINDOW, "shape": [1 << 20, 1 << 20, 3], "data": []}),
        ["'window'", "at most"],
    ),
    "input-twice": (
        json.dumps({"inputs": [{**_WINDOW, "data": [0.0] * 96}] * 2}).encode(),
        ["'window'", "twice"],
    ),
    "input-not-object": (json.dumps({"inputs": [5]}).encode(), ["inputs[0]"]),
    "input-without-name": (
        json.dumps({"inputs": [{"datatype": "FP32"}]}).encode(),
        ["inputs[0]", "name"],
    ),
    "parameters-not-object": (
        _json_body({**_WINDOW, "data": [0.0] * 96}, parameters=[1]),
        ["'parameters'"],
    ),
    "outputs-not-list": (
        _json_body({**_WINDOW, "data": [0.0] * 96}, outputs={"name": "x"}),
        ["'outputs'"],
    ),
    "output-without-name": (
        _json_body({**_WINDOW, "data": [0.0] * 96}, outputs=[{}]),
        ["output", "name"],
    ),
    "negative-binary-size": (
        _json_body({**_WINDOW, "parameters": {"binary_data_size": -4}}),
        ["'window'", "binary_data_size"],
    ),
    "body-not-object": (b"[1, 2, 3]", ["JSON object"]),
    "no-inputs": (json.dumps({"inputs": []}).encode(), ["inputs"]),
    "not-json": (b"{inputs: nope", ["invalid JSON"]),
    "empty": (b"", ["empty"]),
}


@pytest.mark.parametrize("case", list(BAD_JSON_BODIES))
async def test_bad_json_request_is_400_naming_the_problem(
    http: aiohttp.ClientSession, url: str, case: str
) -> None:
    data, fragments = BAD_JSON_BODIES[case]
    message = await client_error(
        http, url + f"/v2/models/{MODEL}/infer", data, {"Content-Type": "application/json"}
    )
    for fragment in fragments:
        assert fragment in message


async def test_binary_size_beyond_body_names_the_tensor(
    http: aiohttp.ClientSession, url: str
) -> None:
    body, headers = binary_request(sensor_windows(2))
    message = await client_error(http, url + f"/v2/models/{MODEL}/infer", body[:-8], headers)
    assert "'window'" in message
    assert "bytes" in message


async def test_binary_size_not_matching_shape_names_the_tensor(
    http: aiohttp.ClientSession, url: str
) -> None:
    windows = sensor_windows(2)
    raw = windows.astype("<f4").tobytes()[:-4]
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "FP32",
                    "shape": [2, 32, 3],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    message = await client_error(
        http, url + f"/v2/models/{MODEL}/infer", head + raw, {HEADER: str(len(head))}
    )
    assert "'window'" in message
    assert "768" in message


async def test_truncated_binary_bytes_tensor_names_it(
    http: aiohttp.ClientSession, url: str
) -> None:
    raw = struct.pack("<I", 10) + b"abc"  # says 10 bytes follow, has 3
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    message = await client_error(
        http, url + f"/v2/models/{MODEL}/infer", head + raw, {HEADER: str(len(head))}
    )
    assert "'window'" in message
    assert "truncated" in message


async def test_binary_bytes_tensor_is_decoded_then_refused_by_type(
    http: aiohttp.ClientSession, url: str
) -> None:
    raw = b"".join(struct.pack("<I", 2) + b"hi" for _ in range(96))
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "BYTES",
                    "shape": [1, 32, 3],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    message = await client_error(
        http, url + f"/v2/models/{MODEL}/infer", head + raw, {HEADER: str(len(head))}
    )
    assert "'window'" in message
    assert "datatype BYTES, expected FP32" in message


async def test_body_over_the_limit_is_413_in_oip_shape(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS / MODEL, repo / MODEL)
    config = make_config(models={"dir": repo}, http={"max_body_bytes": 4096})
    async with serving(config) as srv:
        target = base_url(srv) + f"/v2/models/{MODEL}/infer"
        body, headers = binary_request(sensor_windows(16))  # 6 KiB of tensor data
        async with http.post(target, data=body, headers=headers) as resp:
            assert resp.status == 413
            answer = await resp.json()
        assert set(answer) == {"error"}
        assert "4096" in answer["error"]
        body, headers = binary_request(sensor_windows(4))
        async with http.post(target, data=body, headers=headers) as resp:
            assert resp.status == 200


async def test_extra_binary_data_is_refused(http: aiohttp.ClientSession, url: str) -> None:
    body, headers = binary_request(sensor_windows(1))
    message = await client_error(http, url + f"/v2/models/{MODEL}/infer", body + b"\0" * 4, headers)
    assert "binary" in message


@pytest.mark.parametrize("value", ["ten", "-1", "999999"])
async def test_bad_header_length_is_400(http: aiohttp.ClientSession, url: str, value: str) -> None:
    body, _ = binary_request(sensor_windows(1))
    message = await client_error(http, url + f"/v2/models/{MODEL}/infer", body, {HEADER: value})
    assert HEADER in message


async def test_header_length_splitting_json_is_400(http: aiohttp.ClientSession, url: str) -> None:
    body, headers = binary_request(sensor_windows(1))
    headers[HEADER] = str(int(headers[HEADER]) - 3)
    message = await client_error(http, url + f"/v2/models/{MODEL}/infer", body, headers)
    assert "JSON" in message


async def test_server_still_serves_after_bad_requests(
    http: aiohttp.ClientSession, url: str
) -> None:
    for data, _ in BAD_JSON_BODIES.values():
        async with http.post(url + f"/v2/models/{MODEL}/infer", data=data) as resp:
            assert resp.status == 400
    status, body = await post_json(
        http, url + f"/v2/models/{MODEL}/infer", {"inputs": [json_input(sensor_windows(1))]}
    )
    assert status == 200
    assert len(body["outputs"]) == 2
