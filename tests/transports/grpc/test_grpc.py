"""The gRPC Open Inference Protocol service with the real ``tritonclient[grpc]``.

The daemon runs as a subprocess: its generated stubs register the protocol's own names, as
``tritonclient.grpc``'s do, so the two cannot share this test process (see
``appliance/transports/grpc/__init__.py``). Results are compared with onnxruntime run
directly on the model file; bad input gets a gRPC status code, never a crash.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from appliance import __version__
from tests.conftest import DEFAULT_MODELS, DaemonProcess, daemon, start_daemon
from tests.transports.sensor_data import MODEL_FILE, sensor_windows

MODEL = "sensor-anomaly"
LLM = "stories260K"
MAX_MESSAGE = 64 * 1024
_GRPC_LINE = re.compile(r"gRPC \(Open Inference Protocol v2\) listening on 127\.0\.0\.1:(\d+)")


def grpc_port(proc: DaemonProcess, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.log):
            match = _GRPC_LINE.search(line)
            if match:
                return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError("the daemon did not start gRPC:\n" + "\n".join(proc.log))


def grpc_env(**extra: str) -> dict[str, str]:
    return {
        "APPLIANCE_GRPC__ENABLED": "true",
        "APPLIANCE_GRPC__HOST": "127.0.0.1",
        "APPLIANCE_GRPC__PORT": "0",
        **extra,
    }


@pytest.fixture(scope="module")
def served(stories_gguf: Path) -> Iterator[tuple[DaemonProcess, str]]:
    env = grpc_env(APPLIANCE_GRPC__MAX_MESSAGE_BYTES=str(MAX_MESSAGE))
    with daemon("--models-dir", str(DEFAULT_MODELS), "--model", str(stories_gguf), env=env) as proc:
        yield proc, f"127.0.0.1:{grpc_port(proc)}"


@pytest.fixture(scope="module")
def client(served: tuple[DaemonProcess, str]) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served[1]) as c:
        yield c


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODEL_FILE))


def windows(batch: int, seed: int = 11) -> np.ndarray[Any, np.dtype[np.float32]]:
    return sensor_windows(batch, seed)


def tensor(
    values: np.ndarray[Any, Any], datatype: str = "FP32", name: str = "window"
) -> triton.InferInput:
    item = triton.InferInput(name, list(values.shape), datatype)
    item.set_data_from_numpy(values)
    return item


# ---------------------------------------------------------------- health, metadata


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "appliance" and server["version"] == __version__
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "window", "datatype": "FP32", "shape": ["-1", "32", "3"]}]
    assert [o["name"] for o in meta["outputs"]] == ["score", "is_anomaly"]


# ----------------------------------------------------------------------- inference


def test_infer_matches_onnxruntime(
    client: triton.InferenceServerClient, session: ort.InferenceSession
) -> None:
    values = windows(24)
    result = client.infer(
        MODEL,
        [tensor(values)],
        request_id="batch-24",
        outputs=[triton.InferRequestedOutput("score"), triton.InferRequestedOutput("is_anomaly")],
    )
    score, anomaly = session.run(["score", "is_anomaly"], {"window": values})
    np.testing.assert_allclose(result.as_numpy("score"), score, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), anomaly)
    assert anomaly.any() and not anomaly.all()  # the data holds both kinds
    response = result.get_response()
    assert response.id == "batch-24"
    assert (response.model_name, response.model_version) == (MODEL, "1")


def test_requested_output_subset(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        MODEL, [tensor(windows(2))], outputs=[triton.InferRequestedOutput("is_anomaly")]
    )
    assert [o.name for o in result.get_response().outputs] == ["is_anomaly"]
    assert result.as_numpy("score") is None


def test_typed_contents_instead_of_raw_bytes(
    served: tuple[DaemonProcess, str], session: ort.InferenceSession
) -> None:
    values = windows(3, seed=4)
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    item = request.inputs.add(name="window", datatype="FP32", shape=[3, 32, 3])
    item.contents.fp32_contents.extend(values.reshape(-1).tolist())
    with grpc.insecure_channel(served[1]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "typed"
    score = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
    np.testing.assert_allclose(score, session.run(["score"], {"window": values})[0], rtol=1e-6)


def test_concurrent_calls_from_the_asyncio_client(
    served: tuple[DaemonProcess, str], session: ort.InferenceSession
) -> None:
    # 8 at once fit the model's queue (parallel 1 + queue_size 8); more could get UNAVAILABLE.
    async def run() -> list[Any]:
        async with triton_aio.InferenceServerClient(served[1]) as aio:
            return list(
                await asyncio.gather(
                    *(aio.infer(MODEL, [tensor(windows(2, seed=i))]) for i in range(8))
                )
            )

    for seed, result in enumerate(asyncio.run(run())):
        expected = session.run(["score"], {"window": windows(2, seed=seed)})[0]
        np.testing.assert_allclose(result.as_numpy("score"), expected, rtol=1e-6)


# -------------------------------------------------------------------------- errors


def _raw_request(values: np.ndarray[Any, Any], **fields: Any) -> Any:
    request = service_pb2.ModelInferRequest(model_name=MODEL, **fields)
    request.inputs.add(name="window", datatype="FP32", shape=list(values.shape))
    request.raw_input_contents.append(values.astype("<f4").tobytes())
    return request


BAD: list[tuple[str, Any, str, str]] = [
    (
        "unknown-model",
        lambda c: c.infer("nope", [tensor(windows(1))]),
        "NOT_FOUND",
        "model 'nope' not found",
    ),
    (
        "unknown-version",
        lambda c: c.infer(MODEL, [tensor(windows(1))], model_version="9"),
        "NOT_FOUND",
        "version '9' not found",
    ),
    ("unknown-model-ready", lambda c: c.is_model_ready("nope"), "NOT_FOUND", "not found"),
    (
        "wrong-shape",
        lambda c: c.infer(MODEL, [tensor(np.zeros((1, 32, 4), np.float32))]),
        "INVALID_ARGUMENT",
        "has shape [1, 32, 4], expected [-1 (any), 32, 3]",
    ),
    (
        "wrong-datatype",
        lambda c: c.infer(MODEL, [tensor(windows(1).astype(np.float64), "FP64")]),
        "INVALID_ARGUMENT",
        "has datatype FP64, expected FP32",
    ),
    (
        "nan",
        lambda c: c.infer(MODEL, [tensor(np.full((1, 32, 3), np.nan, np.float32))]),
        "INVALID_ARGUMENT",
        "NaN or infinite",
    ),
    (
        "unknown-input",
        lambda c: c.infer(MODEL, [tensor(windows(1), name="readings")]),
        "INVALID_ARGUMENT",
        "unexpected input tensor 'readings'",
    ),
    (
        "unknown-output",
        lambda c: c.infer(MODEL, [tensor(windows(1))], outputs=[triton.InferRequestedOutput("p")]),
        "INVALID_ARGUMENT",
        "unknown output tensor 'p'",
    ),
    (
        "language-model",
        lambda c: c.infer(LLM, [tensor(windows(1))]),
        "INVALID_ARGUMENT",
        "does not support tensor inference",
    ),
    (
        "too-big",
        lambda c: c.infer(MODEL, [tensor(windows(200))]),
        "RESOURCE_EXHAUSTED",
        "larger than max",
    ),
    ("not-served", lambda c: c.get_model_config(MODEL), "UNIMPLEMENTED", ""),
]


@pytest.mark.parametrize(("case", "call", "code", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_calls_get_grpc_status_codes(
    client: triton.InferenceServerClient, case: str, call: Any, code: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(client)
    assert caught.value.status() == f"StatusCode.{code}"
    assert message in (caught.value.message() or "")
    assert client.infer(MODEL, [tensor(windows(1))]).as_numpy("score") is not None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (service_pb2.ModelInferRequest(model_name=MODEL), "'inputs' must be a non-empty"),
        (
            _raw_request(np.zeros((1, 32, 3), np.float32), raw_input_contents=[b"\0" * 384]),
            "raw_input_contents holds 2 entries for 1 inputs",
        ),
        (_raw_request(np.zeros((1, 32, 3), np.float32)[:, :, :2]), "has shape [1, 32, 2]"),
        (service_pb2.ModelInferRequest(), "a model name is required"),
    ],
    ids=["no-inputs", "raw-count", "bad-shape", "no-model"],
)
def test_malformed_messages_are_invalid_argument(
    served: tuple[DaemonProcess, str], call: Any, message: str
) -> None:
    with grpc.insecure_channel(served[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(call)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


def test_metrics_count_grpc_calls(
    served: tuple[DaemonProcess, str], client: triton.InferenceServerClient
) -> None:
    client.infer(MODEL, [tensor(windows(1))])
    with urllib.request.urlopen(served[0].url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert (
        'appliance_requests_total{model="sensor-anomaly",route="ModelInfer",status="OK",'
        'transport="grpc"}'
    ) in text
    assert 'route="ModelInfer",status="INVALID_ARGUMENT",transport="grpc"' in text


# -------------------------------------------------------------------- lifecycle


def test_grpc_is_off_by_default_and_a_busy_port_stops_start_up() -> None:
    with daemon("--models-dir", str(DEFAULT_MODELS)) as proc:
        assert not any("gRPC" in line for line in proc.log)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start_daemon(
            "--models-dir", str(DEFAULT_MODELS), env=grpc_env(APPLIANCE_GRPC__PORT=str(port))
        )
        code = _wait_exit(proc)
    assert code == 1
    assert any(f"cannot serve gRPC on 127.0.0.1:{port}" in line for line in proc.log), proc.log


def _wait_exit(proc: DaemonProcess, timeout: float = 30) -> int:
    try:
        return proc.proc.wait(timeout=timeout)
    finally:
        proc.stop()
