"""MessagePack on the Open Inference Protocol inference routes, against a real daemon.

Requests and answers carry raw tensor bytes instead of JSON number lists; results are
checked against onnxruntime run directly, and against the same request sent as JSON.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import pytest_asyncio

from appliance.server import Server
from tests.conftest import DEFAULT_MODELS, base_url, make_config, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "sensor-anomaly"
MSGPACK = "application/msgpack"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(default_models: Path, stories_gguf: Path) -> AsyncIterator[Server]:
    config = make_config(models={"dir": default_models, "files": [stories_gguf]})
    async with serving(config) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def url(server: Server) -> AsyncIterator[str]:
    yield f"{base_url(server)}/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(DEFAULT_MODELS / MODEL / "model.onnx"))


def windows(batch: int, seed: int = 5) -> np.ndarray[Any, np.dtype[np.float32]]:
    rng = np.random.default_rng(seed)
    base = np.array([21.0, 45.0, 0.02], dtype=np.float32)
    return (base + rng.normal(0, [0.5, 2.0, 0.01], (batch, 32, 3))).astype(np.float32)


def raw_request(values: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(values.shape),
                "data": values.astype("<f4").tobytes(),
            }
        ],
        **extra,
    }


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(url, data=body, headers=headers) as response,
    ):
        return response.status, response.content_type, await response.read()


async def test_raw_tensor_round_trip_matches_onnxruntime(
    url: str, session: ort.InferenceSession
) -> None:
    values = windows(16)
    status, kind, body = await post(
        url, msgpack.packb(raw_request(values, id="r1")), {"Content-Type": MSGPACK}
    )
    assert (status, kind) == (200, MSGPACK)
    answer = msgpack.unpackb(body)
    assert answer["model_name"] == MODEL and answer["id"] == "r1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    score, anomaly = session.run(["score", "is_anomaly"], {"window": values})
    assert outputs["score"]["datatype"] == "FP32" and outputs["score"]["shape"] == [16]
    np.testing.assert_allclose(np.frombuffer(outputs["score"]["data"], "<f4"), score, rtol=1e-5)
    assert outputs["is_anomaly"]["datatype"] == "BOOL"
    assert np.frombuffer(outputs["is_anomaly"]["data"], np.bool_).tolist() == anomaly.tolist()


async def test_msgpack_and_json_give_the_same_answer(url: str) -> None:
    values = windows(4, seed=9)
    status, _, packed = await post(
        url, msgpack.packb(raw_request(values)), {"Content-Type": MSGPACK}
    )
    assert status == 200
    as_json = {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": [4, 32, 3],
                "data": values.reshape(-1).tolist(),
            }
        ]
    }
    status, kind, text = await post(
        url, json.dumps(as_json).encode(), {"Content-Type": "application/json"}
    )
    assert (status, kind) == (200, "application/json")
    by_json = {o["name"]: o["data"] for o in json.loads(text)["outputs"]}
    by_msgpack = {o["name"]: o["data"] for o in msgpack.unpackb(packed)["outputs"]}
    assert np.frombuffer(by_msgpack["score"], "<f4").tolist() == pytest.approx(by_json["score"])


@pytest.mark.parametrize(
    ("content_type", "accept", "answer"),
    [
        (MSGPACK, None, MSGPACK),
        ("application/x-msgpack", None, MSGPACK),
        (MSGPACK, "application/json", "application/json"),
        (MSGPACK, "application/json;q=0.5, application/msgpack", MSGPACK),
        ("application/json", MSGPACK, MSGPACK),
        ("application/json", "application/msgpack;q=0, */*", "application/json"),
        ("application/json", "*/*", "application/json"),
    ],
)
async def test_content_negotiation(
    url: str, content_type: str, accept: str | None, answer: str
) -> None:
    values = windows(1)
    if content_type == "application/json":
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "window",
                        "datatype": "FP32",
                        "shape": [1, 32, 3],
                        "data": values.reshape(-1).tolist(),
                    }
                ]
            }
        ).encode()
    else:
        body = msgpack.packb(raw_request(values))
    headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
    status, kind, raw = await post(url, body, headers)
    assert (status, kind) == (200, answer)
    decoded = msgpack.unpackb(raw) if kind == MSGPACK else json.loads(raw)
    assert [o["name"] for o in decoded["outputs"]] == ["score", "is_anomaly"]


async def test_number_lists_and_requested_outputs(url: str) -> None:
    values = windows(2)
    request = {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": [2, 32, 3],
                "data": values.reshape(-1).tolist(),
            }
        ],
        "outputs": [{"name": "is_anomaly"}],
    }
    status, _, raw = await post(url, msgpack.packb(request), {"Content-Type": MSGPACK})
    assert status == 200
    (output,) = msgpack.unpackb(raw)["outputs"]
    assert output["name"] == "is_anomaly" and len(output["data"]) == 2


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"\xc1", {}, 400, "not valid MessagePack"),
        (b"", {}, 400, "body is empty"),
        (msgpack.packb([1, 2]), {}, 400, "must be a MessagePack map"),
        (msgpack.packb({"a": 1}) + b"\x00", {}, 400, "data after the MessagePack document"),
        (
            msgpack.packb(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "datatype": "FP32",
                            "shape": [1, 32, 3],
                            "data": b"\0" * 100,
                        }
                    ]
                }
            ),
            {},
            400,
            "needs 384 bytes, got 100",
        ),
        (
            msgpack.packb(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "datatype": "FP32",
                            "shape": [1, 32, 3],
                            "data": struct.pack("<f", float("inf")) * 96,
                        }
                    ]
                }
            ),
            {},
            400,
            "NaN or infinite",
        ),
        (
            msgpack.packb(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "datatype": "FP64",
                            "shape": [1, 32, 3],
                            "data": b"\0" * 768,
                        }
                    ]
                }
            ),
            {},
            400,
            "datatype FP64",
        ),
        (
            msgpack.packb(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "datatype": "FP32",
                            "shape": [1, 32, 3],
                            "data": b"\0" * 384,
                        }
                    ]
                }
            ),
            {"Inference-Header-Content-Length": "3"},
            400,
            "does not apply to a MessagePack body",
        ),
        (b"\x91" * 100_000 + b"\x00", {}, 400, "nested too deeply"),
    ],
    ids=[
        "not-msgpack",
        "empty",
        "not-a-map",
        "trailing-data",
        "short-tensor",
        "infinity",
        "wrong-datatype",
        "binary-header",
        "deep-nesting",
    ],
)
async def test_bad_msgpack_gets_a_msgpack_error(
    url: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, kind, raw = await post(url, body, {"Content-Type": MSGPACK, **headers})
    assert (got, kind) == (status, MSGPACK)
    error = msgpack.unpackb(raw)
    assert set(error) == {"error"}
    assert message in error["error"]


async def test_errors_follow_the_accept_header(server: Server) -> None:
    missing = f"{base_url(server)}/v2/models/nope/infer"
    status, kind, raw = await post(
        missing, msgpack.packb(raw_request(windows(1))), {"Content-Type": MSGPACK}
    )
    assert (status, kind) == (404, MSGPACK)
    assert msgpack.unpackb(raw) == {"error": "model 'nope' not found"}
    status, kind, raw = await post(
        missing,
        msgpack.packb(raw_request(windows(1))),
        {"Content-Type": MSGPACK, "Accept": "application/json"},
    )
    assert (status, kind) == (404, "application/json")
    language_model = f"{base_url(server)}/v2/models/stories260K/infer"
    status, kind, raw = await post(language_model, b"{}", {"Accept": MSGPACK})
    assert (status, kind) == (400, MSGPACK)
    assert "language model" in msgpack.unpackb(raw)["error"]
