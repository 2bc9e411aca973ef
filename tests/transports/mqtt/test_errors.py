"""Bad input and overload over MQTT: every mistake gets an error reply naming it (on the
reply topic, or on ``<base>/error`` when there is none), and nothing stops the MQTT loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from tests.transports.mqtt.conftest import (
    Broker,
    PahoClient,
    appliance,
    run_tool,
    until,
    window,
)

Clients = Callable[..., PahoClient]
MODEL = "sensor-anomaly"
LIMIT = 4096


async def test_bad_requests_get_error_replies_and_the_loop_survives(
    broker: Broker, paho_clients: Clients
) -> None:
    client = paho_clients(broker)
    client.subscribe("replies/bad/#")
    client.subscribe("appliance/bad-box/error")
    base = "appliance/bad-box/infer"
    cases: list[tuple[str, str, bytes, str, str]] = [
        # (name, topic, payload, expected code, text the message must contain)
        ("json", f"{base}/{MODEL}", b'{"data": [1, 2', "bad_request", "invalid JSON"),
        ("model", f"{base}/no-such-model", b'{"data": [1]}', "not_found", "no-such-model"),
        (
            "shape",
            f"{base}/{MODEL}",
            json.dumps({"data": window()[:31]}).encode(),
            "bad_request",
            "shape [1, 31, 3]",
        ),
        (
            "oip",
            f"{base}/{MODEL}",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "datatype": "FP32",
                            "shape": [1, 32, 2],
                            "data": [0.0] * 64,
                        }
                    ]
                }
            ).encode(),
            "bad_request",
            "expected [-1 (any), 32, 3]",
        ),
        (
            "type",
            f"{base}/{MODEL}",
            b'{"data": [["a", "b", "c"]]}',
            "bad_request",
            "must be numbers",
        ),
        (
            "nan",
            f"{base}/{MODEL}",
            json.dumps({"data": [[float("nan"), 1, 1]] * 32}).encode(),
            "bad_request",
            "NaN",
        ),
        (
            "text",
            f"{base}/{MODEL}",
            b"Once upon a time",
            "bad_request",
            "does not support text generation",
        ),
        ("form", f"{base}/{MODEL}", b'{"hello": 1}', "bad_request", "needs 'inputs'"),
        (
            "sampling",
            f"{base}/{MODEL}",
            b'{"prompt": "x", "temperature": 9}',
            "bad_request",
            "temperature",
        ),
        ("big", f"{base}/{MODEL}", b"[" + b"1," * LIMIT + b"1]", "too_large", str(LIMIT)),
        ("topic", f"{base}/{MODEL}/extra/levels", b"{}", "bad_request", "request topics"),
        ("msgpack", f"{base}/{MODEL}/msgpack", b"\xc1\xc1", "bad_request", "MessagePack"),
        (
            "mp-tensor",
            f"{base}/{MODEL}/msgpack",
            msgpack.packb(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "datatype": "FP32",
                            "shape": [1, 32, 3],
                            "data": b"\x00" * 8,
                        }
                    ]
                }
            ),
            "bad_request",
            "needs 384 bytes",
        ),
        ("id", f"{base}/{MODEL}", b'{"id": {"x": 1}, "data": [1]}', "bad_request", "'id'"),
    ]
    async with appliance(broker, device="bad-box", mqtt={"max_payload_bytes": LIMIT}) as server:
        for name, topic, payload, _, _ in cases:
            client.publish(
                topic, payload, response_topic=f"replies/bad/{name}", correlation=name.encode()
            )
        for name, _, _, code, text in cases:
            reply = (await client.wait(f"replies/bad/{name}"))[0]
            # Replies speak the request's format, even when its payload was unreadable.
            body = (
                msgpack.unpackb(reply.payload) if name in ("msgpack", "mp-tensor") else reply.json()
            )
            assert reply.properties.CorrelationData == name.encode()
            assert body["status"] == "error", (name, body)
            assert body["error"]["code"] == code, (name, body)
            assert text in body["error"]["message"], (name, body)
        # Without a reply topic (MQTT 3.1.1, payload unreadable): the error topic.
        plain = paho_clients(broker, v5=False)
        plain.publish(f"{base}/{MODEL}", b"{not json")
        plain.publish(
            f"{base}/{MODEL}",
            json.dumps({"id": "loop", "reply_to": f"{base}/{MODEL}", "data": window()}),
        )
        errors = [m.json() for m in await client.wait("appliance/bad-box/error", 2)]
        # Still serving.
        client.publish(
            f"{base}/{MODEL}",
            json.dumps({"data": window()}),
            response_topic="replies/bad/after",
            correlation=b"ok",
        )
        after = (await client.wait("replies/bad/after"))[0].json()
        assert server.core is not None
        assert server.core.unit_status()["mqtt"]["state"] == "connected"
        rejected = server.metrics.registry.get_sample_value(
            "appliance_requests_total",
            {"transport": "mqtt", "route": "infer", "model": "", "status": "bad_request"},
        )
    assert after["status"] == "ok"
    by_topic = {e["topic"]: e for e in errors}
    assert all(e["status"] == "error" and e["error"]["code"] == "bad_request" for e in errors)
    assert "invalid JSON" in errors[0]["error"]["message"]
    loop = next(e for e in errors if e.get("id") == "loop")
    assert "would loop" in loop["error"]["message"]
    assert f"{base}/{MODEL}" in by_topic
    assert rejected and rejected >= 3


async def test_retained_requests_are_ignored(broker: Broker, paho_clients: Clients) -> None:
    client = paho_clients(broker, v5=False)
    client.subscribe("replies/retained")
    client.publish(
        f"appliance/ret-box/infer/{MODEL}",
        json.dumps({"reply_to": "replies/retained", "data": window()}),
        retain=True,
    )
    async with appliance(broker, device="ret-box") as server:
        await until(
            lambda: (
                (
                    server.metrics.registry.get_sample_value(
                        "appliance_mqtt_rejected_messages_total", {"reason": "retained"}
                    )
                    or 0
                )
                >= 1
            )
        )
        client.publish(
            f"appliance/ret-box/infer/{MODEL}",
            json.dumps({"reply_to": "replies/retained", "id": 1, "data": window()}),
        )
        replies = await client.wait("replies/retained")
    assert [r.json()["id"] for r in client.on("replies/retained")] == [1]
    assert replies[0].json()["status"] == "ok"


async def test_a_full_queue_answers_busy_with_a_retry_hint(
    broker: Broker, paho_clients: Clients, stories_repo: Path
) -> None:
    client = paho_clients(broker)
    client.subscribe("replies/busy/#")
    models: dict[str, Any] = {
        "dir": str(stories_repo),
        "queue_size": 0,
        "parallel": 1,
        "retry_after": 2.5,
    }
    async with appliance(broker, device="busy-box", models=models):
        for n in range(5):
            client.publish(
                "appliance/busy-box/infer/stories",
                json.dumps({"prompt": "Once upon a time", "max_tokens": 200}),
                response_topic=f"replies/busy/{n}",
            )
        replies = [r.json() for r in await client.wait("replies/busy/#", 5)]
        # mosquitto_rr sees the same refusal while the model is still busy.
        rc, out, _ = await run_tool(
            *broker.cli(
                "mosquitto_rr",
                "-t",
                "appliance/busy-box/infer/nope",
                "-e",
                "replies/busy/rr",
                "-q",
                "1",
                "-W",
                "10",
                "-m",
                "{}",
            )
        )
    busy = [r for r in replies if r["status"] == "error"]
    assert any(r["status"] == "ok" for r in replies)
    assert busy, replies
    for reply in busy:
        assert reply["error"]["code"] == "busy"
        assert reply["error"]["retry_after"] == 2.5
        assert "busy" in reply["error"]["message"]
    assert rc == 0
    assert json.loads(out)["error"]["code"] == "not_found"


async def test_an_integer_longer_than_pythons_limit_is_a_bad_request(
    broker: Broker, paho_clients: Clients
) -> None:
    """Python refuses to parse integers of more than 4,300 digits (a ValueError from
    json.loads that is not a JSONDecodeError): the client made the mistake, not the box."""
    client = paho_clients(broker)
    client.subscribe("replies/bigint")
    huge = b"1" + b"0" * 5000
    async with appliance(broker, device="bigint-box"):
        for payload in (
            b'{"data": [' + huge + b"]}",
            b'{"prompt": "hi", "max_tokens": ' + huge + b"}",
        ):
            client.publish(
                f"appliance/bigint-box/infer/{MODEL}",
                payload,
                response_topic="replies/bigint",
                correlation=b"1",
            )
        for reply in await client.wait("replies/bigint", 2):
            body = reply.json()
            assert body["status"] == "error", body
            assert body["error"]["code"] == "bad_request", body
            assert "4300 digits" in body["error"]["message"], body
