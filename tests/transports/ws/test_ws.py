"""The WebSocket endpoint with aiohttp's own client against a real daemon and real models.

Many requests share one connection and their replies interleave; a request can be
cancelled by id; bad input of every kind is answered by an ``error`` message and the
connection keeps serving; an oversized message closes it with 1009.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import pytest_asyncio
from aiohttp import WSMsgType

from appliance.server import Server
from tests.conftest import DEFAULT_MODELS, base_url, make_config, serving, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

LLM = "stories260K"
ONNX = "sensor-anomaly"
GREEDY = ", there was a little girl named Lily."
TERMINAL = {"done", "result", "embeddings", "models", "error", "cancelled", "pong"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(default_models: Path, stories_gguf: Path) -> AsyncIterator[Server]:
    config = make_config(
        models={"dir": default_models, "files": [stories_gguf], "parallel": 1},
        websocket={"max_in_flight": 6},
    )
    async with serving(config) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def ws(server: Server) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(base_url(server) + "/ws") as socket,
    ):
        yield socket


def window(seed: int = 1, batch: int = 1) -> np.ndarray[Any, np.dtype[np.float32]]:
    rng = np.random.default_rng(seed)
    base = np.array([21.0, 45.0, 0.02], dtype=np.float32)
    return (base + rng.normal(0, [0.3, 1.0, 0.005], (batch, 32, 3))).astype(np.float32)


def infer_message(request_id: Any, values: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "type": "infer",
        "id": request_id,
        "model": ONNX,
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(values.shape),
                "data": values.reshape(-1).tolist(),
            }
        ],
    }


async def collect(
    socket: aiohttp.ClientWebSocketResponse, ids: set[Any], timeout: float = 30
) -> dict[Any, list[dict[str, Any]]]:
    """Every message until each id in ``ids`` got its terminal reply."""
    replies: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    open_ids = set(ids)
    deadline = asyncio.get_running_loop().time() + timeout
    while open_ids:
        frame = await socket.receive(timeout=deadline - asyncio.get_running_loop().time())
        if frame.type is WSMsgType.TEXT:
            message = json.loads(frame.data)
        elif frame.type is WSMsgType.BINARY:
            message = msgpack.unpackb(frame.data)
        else:
            raise AssertionError(f"unexpected frame {frame!r}")
        replies[message.get("id")].append(message)
        if message["type"] in TERMINAL:
            open_ids.discard(message.get("id"))
    return replies


async def ask(
    socket: aiohttp.ClientWebSocketResponse, message: dict[str, Any]
) -> list[dict[str, Any]]:
    await socket.send_json(message)
    return (await collect(socket, {message.get("id")}))[message.get("id")]


# ------------------------------------------------------------------------- serving


async def test_interleaved_requests_on_one_connection(
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    session = ort.InferenceSession(str(DEFAULT_MODELS / ONNX / "model.onnx"))
    windows = {f"w{i}": window(seed=i, batch=2) for i in range(3)}
    await ws.send_json(
        {
            "type": "generate",
            "id": 1,
            "model": LLM,
            "prompt": "Once upon a time",
            "max_tokens": 12,
            "temperature": 0,
        }
    )
    for request_id, values in windows.items():
        await ws.send_json(infer_message(request_id, values))
    await ws.send_json(
        {
            "type": "generate",
            "id": "chat",
            "model": LLM,
            "temperature": 0,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hi"}],
        }
    )
    await ws.send_json({"type": "embed", "id": 2, "model": LLM, "input": ["a cat", "a dog"]})
    await ws.send_json({"type": "models", "id": "m"})
    replies = await collect(ws, {1, "chat", 2, "m", *windows})

    tokens = [m for m in replies[1] if m["type"] == "token"]
    assert "".join(t["text"] for t in tokens).startswith(GREEDY)
    done = replies[1][-1]
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["prompt_tokens"] == 5
    assert replies["chat"][-1]["type"] == "done"
    for request_id, values in windows.items():
        (result,) = replies[request_id]
        assert result["type"] == "result" and result["model"] == ONNX
        outputs = {o["name"]: o for o in result["outputs"]}
        score, anomaly = session.run(["score", "is_anomaly"], {"window": values})
        assert outputs["score"]["data"] == pytest.approx(score.tolist(), rel=1e-5)
        assert outputs["is_anomaly"]["data"] == anomaly.tolist()
    (embeddings,) = replies[2]
    assert len(embeddings["data"]) == 2 and embeddings["usage"]["prompt_tokens"] > 0
    names = {m["name"] for m in replies["m"][0]["models"]}
    assert names == {LLM, ONNX, "home-intent"}  # the default models and stories260K


async def test_replies_of_concurrent_requests_interleave(
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    # A long generation holds the language model; tensor inference on the other model
    # answers while it streams, on the same connection.
    await ws.send_json(
        {
            "type": "generate",
            "id": "long",
            "model": LLM,
            "prompt": "Once upon a time",
            "max_tokens": 400,
            "temperature": 0,
        }
    )
    first = json.loads((await ws.receive()).data)
    assert first == {"type": "token", "id": "long", "text": ","}
    await ws.send_json(infer_message("quick", window()))
    order: list[tuple[Any, str]] = []
    while ("long", "done") not in order:
        message = json.loads((await ws.receive(timeout=30)).data)
        order.append((message["id"], message["type"]))
    assert ("quick", "result") in order
    assert order.index(("quick", "result")) < order.index(("long", "done"))


async def test_cancel_stops_a_generation_and_frees_the_model(
    server: Server,
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    assert server.core is not None
    admission = server.core.models.get(LLM).admission
    await ws.send_json(
        {
            "type": "generate",
            "id": "story",
            "model": LLM,
            "prompt": "Once upon a time",
            "max_tokens": 2000,
            "temperature": 0,
        }
    )
    # A second request waits behind it in the model's queue; cancel that one too.
    await ws.send_json(
        {"type": "generate", "id": "queued", "model": LLM, "prompt": "Hi", "max_tokens": 4}
    )
    message = json.loads((await ws.receive()).data)
    assert (message["id"], message["type"]) == ("story", "token")
    await ws.send_json({"type": "cancel", "id": "queued"})
    await ws.send_json({"type": "cancel", "id": "story"})
    replies = await collect(ws, {"story", "queued"}, timeout=10)
    assert replies["story"][-1] == {"type": "cancelled", "id": "story"}
    assert replies["queued"] == [{"type": "cancelled", "id": "queued"}]
    assert all(m["type"] == "token" for m in replies["story"][:-1])
    # The generation thread has stopped and the queue slots are free again.
    await wait_for(lambda: admission.running == 0 and admission.waiting == 0, timeout=5)
    # Cancelling what is no longer running is an error, and the connection still works.
    (gone,) = await ask(ws, {"type": "cancel", "id": "story"})
    assert gone["type"] == "error" and gone["status"] == 404
    again = await ask(
        ws,
        {
            "type": "generate",
            "id": "again",
            "model": LLM,
            "prompt": "Once upon a time",
            "max_tokens": 12,
            "temperature": 0,
        },
    )
    assert "".join(m.get("text", "") for m in again).startswith(GREEDY)


async def test_closing_the_connection_stops_its_requests(server: Server) -> None:
    assert server.core is not None
    admission = server.core.models.get(LLM).admission
    async with aiohttp.ClientSession() as session:
        socket = await session.ws_connect(base_url(server) + "/ws")
        await socket.send_json(
            {"type": "generate", "id": 1, "model": LLM, "prompt": "Once", "max_tokens": 2000}
        )
        assert json.loads((await socket.receive()).data)["type"] == "token"
        await socket.close()
    await wait_for(lambda: admission.running == 0 and admission.waiting == 0, timeout=5)


async def test_ping_pong(ws: aiohttp.ClientWebSocketResponse) -> None:
    assert await ask(ws, {"type": "ping", "id": 7}) == [{"type": "pong", "id": 7}]
    await ws.send_json({"type": "ping"})
    assert json.loads((await ws.receive()).data) == {"type": "pong", "id": None}


async def test_protocol_pings_and_server_heartbeat(default_models: Path) -> None:
    config = make_config(models={"dir": default_models}, websocket={"heartbeat": 0.2})
    async with (
        serving(config) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(base_url(server) + "/ws", autoping=False) as socket,
    ):
        await socket.ping(b"are you there")
        frame = await socket.receive(timeout=5)
        assert frame.type is WSMsgType.PONG and frame.data == b"are you there"
        frame = await socket.receive(timeout=5)  # the server's own keep-alive ping
        assert frame.type is WSMsgType.PING
        await socket.pong(frame.data)


async def test_msgpack_frames_carry_raw_tensors(ws: aiohttp.ClientWebSocketResponse) -> None:
    values = window(seed=3, batch=4)
    request = {
        "type": "infer",
        "id": 9,
        "model": ONNX,
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": [4, 32, 3],
                "data": values.astype("<f4").tobytes(),
            }
        ],
        "outputs": [{"name": "score"}],
    }
    await ws.send_bytes(msgpack.packb(request))
    frame = await ws.receive(timeout=10)
    assert frame.type is WSMsgType.BINARY
    result = msgpack.unpackb(frame.data)
    (score,) = result["outputs"]
    assert score["name"] == "score" and score["shape"] == [4]
    got = np.frombuffer(score["data"], dtype="<f4")
    session = ort.InferenceSession(str(DEFAULT_MODELS / ONNX / "model.onnx"))
    np.testing.assert_allclose(got, session.run(["score"], {"window": values})[0], rtol=1e-5)


async def test_metrics_count_websocket_requests(
    server: Server, ws: aiohttp.ClientWebSocketResponse
) -> None:
    await ask(ws, infer_message("counted", window()))
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + "/metrics") as response,
    ):
        text = await response.text()
    assert (
        'appliance_requests_total{model="sensor-anomaly",route="infer",status="200",transport="ws"}'
    ) in text


# ----------------------------------------------------------------------- bad input

BAD: list[tuple[str, Any, int, str, Any]] = [
    # (case, message (dict, or a raw str/bytes frame), status, text in the error, echoed id)
    ("not-json", "{nope", 400, "invalid JSON", None),
    ("not-an-object", "[1, 2]", 400, "must be an object", None),
    ("no-type", {"id": 1}, 400, "unknown message type None", 1),
    ("unknown-type", {"type": "shutdown", "id": 1}, 400, "unknown message type", 1),
    ("no-id", {"type": "generate", "model": LLM, "prompt": "Hi"}, 400, "id is required", None),
    ("bool-id", {"type": "models", "id": True}, 400, "id", None),
    ("no-model", {"type": "generate", "id": 2, "prompt": "Hi"}, 400, "model is required", 2),
    (
        "unknown-field",
        {"type": "generate", "id": 3, "model": LLM, "prompt": "Hi", "temprature": 0},
        400,
        "temprature",
        3,
    ),
    (
        "prompt-and-messages",
        {
            "type": "generate",
            "id": 4,
            "model": LLM,
            "prompt": "Hi",
            "messages": [{"role": "user", "content": "Hi"}],
        },
        400,
        "either 'prompt' or 'messages'",
        4,
    ),
    (
        "bad-temperature",
        {"type": "generate", "id": 5, "model": LLM, "prompt": "Hi", "temperature": -2},
        400,
        "temperature must be at least 0",
        5,
    ),
    (
        "nan-in-json",
        '{"type": "generate", "id": 6, "model": "stories260K", "prompt": "Hi", "top_p": NaN}',
        400,
        "top_p",
        6,
    ),
    (
        "unknown-model",
        {"type": "generate", "id": 7, "model": "nope", "prompt": "Hi"},
        404,
        "model 'nope' not found",
        7,
    ),
    (
        "chat-on-onnx",
        {"type": "generate", "id": 8, "model": ONNX, "prompt": "Hi"},
        400,
        "does not support text generation",
        8,
    ),
    (
        "infer-on-llm",
        {"type": "infer", "id": 9, "model": LLM, "inputs": []},
        400,
        "'inputs' must be a non-empty list",
        9,
    ),
    (
        "wrong-shape",
        infer_message(10, np.zeros((1, 32, 4), np.float32)),
        400,
        "has shape [1, 32, 4]",
        10,
    ),
    (
        "nan-tensor",
        {
            **infer_message(11, window()),
            "inputs": [{"name": "window", "datatype": "FP32", "shape": [1, 1, 1], "data": [1.0]}],
        },
        400,
        "has shape [1, 1, 1]",
        11,
    ),
    ("bad-msgpack", b"\xc1", 400, "not valid MessagePack", None),
    (
        "msgpack-short-tensor",
        {
            "type": "infer",
            "id": 12,
            "model": ONNX,
            "inputs": [
                {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": b"\0" * 12}
            ],
        },
        400,
        "needs 384 bytes, got 12",
        12,
    ),
    (
        "msgpack-nan",
        {
            "type": "infer",
            "id": 13,
            "model": ONNX,
            "inputs": [
                {
                    "name": "window",
                    "datatype": "FP32",
                    "shape": [1, 32, 3],
                    "data": struct.pack("<f", float("nan")) * 96,
                }
            ],
        },
        400,
        "NaN",
        13,
    ),
    (
        "embed-nothing",
        {"type": "embed", "id": 14, "model": LLM, "input": []},
        400,
        "at least one text",
        14,
    ),
]


@pytest.mark.parametrize(
    ("case", "message", "status", "text", "echo"), BAD, ids=[case[0] for case in BAD]
)
async def test_bad_input_gets_an_error_message_and_the_connection_keeps_working(
    ws: aiohttp.ClientWebSocketResponse,
    case: str,
    message: Any,
    status: int,
    text: str,
    echo: Any,
) -> None:
    binary = isinstance(message, bytes) or case.startswith("msgpack")
    if isinstance(message, dict):
        frame: str | bytes = msgpack.packb(message) if binary else json.dumps(message)
    else:
        frame = message
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)
    reply = await ws.receive(timeout=10)
    assert reply.type is (WSMsgType.BINARY if binary else WSMsgType.TEXT)
    error = msgpack.unpackb(reply.data) if binary else json.loads(reply.data)
    assert error["type"] == "error", error
    assert error["status"] == status, error
    assert text in error["error"], error
    assert error["id"] == echo
    assert await ask(ws, {"type": "ping", "id": "still"}) == [{"type": "pong", "id": "still"}]


async def test_a_huge_integer_is_an_error_and_other_requests_go_on(
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    """An integer past Python's int-string limit (4,300 digits) fails json.loads with a
    plain ValueError: it must be answered like any bad message, not end the connection and
    the requests running on it."""
    await ws.send_json(
        {
            "type": "generate",
            "id": "long",
            "model": LLM,
            "prompt": "Once upon a time",
            "max_tokens": 120,
            "temperature": 0,
        }
    )
    first = json.loads((await ws.receive(timeout=30)).data)
    assert first["id"] == "long" and first["type"] == "token"
    huge = "1" + "0" * 5000
    await ws.send_str(
        f'{{"type": "generate", "id": "huge", "model": "{LLM}", '
        f'"prompt": "Once", "max_tokens": {huge}}}'
    )
    replies = await collect(ws, {None, "long"})
    (error,) = replies[None]
    assert error["type"] == "error" and error["status"] == 400, error
    assert "integer" in error["error"] and "digits" in error["error"], error
    assert replies["long"][-1]["type"] == "done"
    assert replies["long"][-1]["usage"]["completion_tokens"] == 120
    assert await ask(ws, {"type": "ping", "id": "still"}) == [{"type": "pong", "id": "still"}]


async def test_duplicate_ids_and_the_in_flight_limit(ws: aiohttp.ClientWebSocketResponse) -> None:
    long = {"type": "generate", "model": LLM, "prompt": "Once upon a time", "max_tokens": 2000}
    running = "abcdef"  # the fixture's limit is 6
    for request_id in running:
        await ws.send_json({**long, "id": request_id})
    await ws.send_json({**long, "id": "a"})
    await ws.send_json({**long, "id": "g"})
    replies = await collect(ws, {"g"})
    duplicate = next(m for m in replies["a"] if m["type"] == "error")
    assert duplicate["status"] == 400 and "already in flight" in duplicate["error"]
    (limit,) = [m for m in replies["g"] if m["type"] == "error"]
    assert limit["status"] == 429 and "at most 6" in limit["error"]
    assert limit["retry_after"] == 1
    for request_id in running:
        await ws.send_json({"type": "cancel", "id": request_id})
    replies = await collect(ws, set(running))
    assert all(replies[i][-1]["type"] == "cancelled" for i in running)


async def test_oversized_message_closes_with_1009(default_models: Path) -> None:
    config = make_config(models={"dir": default_models}, websocket={"max_message_bytes": 1024})
    async with (
        serving(config) as server,
        aiohttp.ClientSession() as session,
        session.ws_connect(base_url(server) + "/ws") as socket,
    ):
        assert await ask(socket, {"type": "ping", "id": 1}) == [{"type": "pong", "id": 1}]
        await socket.send_str(json.dumps({"type": "ping", "id": "x" * 2000}))
        frame = await socket.receive(timeout=5)
        assert frame.type is WSMsgType.CLOSE
        assert socket.close_code == 1009  # aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_plain_get_is_a_400(server: Server) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + "/ws") as response,
    ):
        assert response.status == 400
        assert "needs a WebSocket upgrade" in (await response.json())["error"]


async def test_shutdown_closes_connections_with_going_away(default_models: Path) -> None:
    config = make_config(models={"dir": default_models})
    async with aiohttp.ClientSession() as session:
        async with serving(config) as server:
            socket = await session.ws_connect(base_url(server) + "/ws")
            assert await ask(socket, {"type": "ping", "id": 1}) == [{"type": "pong", "id": 1}]
        frame = await socket.receive(timeout=5)
        assert frame.type is WSMsgType.CLOSE
        assert frame.data == aiohttp.WSCloseCode.GOING_AWAY
        assert frame.extra == "server shutting down"
        await socket.close()


async def test_websocket_can_be_turned_off(default_models: Path) -> None:
    config = make_config(models={"dir": default_models}, websocket={"enabled": False})
    async with (
        serving(config) as server,
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + "/ws") as response,
    ):
        assert response.status == 404


TURN_OFF = {
    "type": "function",
    "function": {
        "name": "HassTurnOff",
        "description": "Turns off a device or entity",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "area": {"type": "string"},
                "domain": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}


async def test_tool_calls_stream_as_messages_and_come_whole_in_done(
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    await ws.send_json(
        {
            "type": "generate",
            "id": "t1",
            "model": "home-intent",
            "temperature": 0,
            "tools": [TURN_OFF],
            "messages": [{"role": "user", "content": "turn off the porch light"}],
        }
    )
    replies = (await collect(ws, {"t1"}))["t1"]
    pieces = [r for r in replies if r["type"] == "tool_call"]
    assert pieces[0]["index"] == 0 and pieces[0]["name"] == "HassTurnOff"
    assert pieces[0]["call_id"].startswith("call_")
    done = replies[-1]
    assert done["type"] == "done" and done["finish_reason"] == "tool_calls"
    [call] = done["tool_calls"]
    assert call["id"] == pieces[0]["call_id"]
    assert json.loads("".join(p["arguments"] for p in pieces)) == call["arguments"]
    assert call["arguments"] == {"area": "porch", "domain": ["light"]}
    # The same bad input as over HTTP, answered in an error message naming the field.
    await ws.send_json(
        {
            "type": "generate",
            "id": "t2",
            "model": "home-intent",
            "tools": [TURN_OFF],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    error = (await collect(ws, {"t2"}))["t2"][-1]
    assert error["type"] == "error" and error["status"] == 400
    assert error["param"] == "tool_choice"
