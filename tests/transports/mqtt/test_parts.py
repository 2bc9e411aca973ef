"""The MQTT transport's pieces on their own: backoff, outbox, reply cache, windows, reading
parsing, topic layout, the envelope's error mapping and the TLS context."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from appliance.config import MqttConfig
from appliance.core.metrics import Metrics
from appliance.errors import (
    ConfigError,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    ShuttingDown,
)
from appliance.transports.mqtt import envelope
from appliance.transports.mqtt.broker import read_password, tls_context
from appliance.transports.mqtt.connection import Backoff
from appliance.transports.mqtt.envelope import Format
from appliance.transports.mqtt.metrics import MqttMetrics
from appliance.transports.mqtt.outbox import Outgoing, PublishQueue, ReplyCache
from appliance.transports.mqtt.rules import Window, parse_reading, render
from appliance.transports.mqtt.topics import RequestTopic, Topics


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    low = Backoff(1.0, 8.0, rng=lambda: 0.0)
    assert [low.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(1.0, 8.0, rng=lambda: 1.0)
    assert [high.next() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    high.reset()
    assert high.next() == 1.0
    assert Backoff(0.1, 60).next() <= 0.1


def message(n: int, key: str | None = None, kind: str = "reply") -> Outgoing:
    return Outgoing(f"t/{n}", b"%d" % n, kind, key=key)


async def test_outbox_is_bounded_drops_the_oldest_and_counts() -> None:
    metrics = Metrics()
    outbox = PublishQueue(3, metrics.unit(MqttMetrics))
    for n in range(5):
        outbox.put(message(n))
    assert len(outbox) == 3
    assert (
        metrics.registry.get_sample_value(
            "appliance_mqtt_messages_dropped_total", {"kind": "reply"}
        )
        == 2
    )
    first = await outbox.next()
    assert first.topic == "t/2"
    outbox.done(first)
    assert (await outbox.next()).topic == "t/3"


async def test_outbox_state_documents_replace_each_other_and_streams_merge() -> None:
    outbox = PublishQueue(10, Metrics().unit(MqttMetrics))
    outbox.put(message(1, key="stats"))
    reply = message(2)
    outbox.put(reply)
    outbox.put(message(3, key="stats"))
    assert [m.topic for m in outbox._items] == ["t/3", "t/2"]
    assert outbox.unsent() == 1
    # A waiting message may be replaced; one handed to the publisher never again.
    assert outbox.replace(reply, message(4))
    head = await outbox.next()
    assert not outbox.replace(head, message(5))
    outbox.drop_state()
    assert [m.topic for m in outbox._items] == ["t/4"]
    drained = asyncio.create_task(outbox.drained())
    await asyncio.sleep(0)
    assert not drained.done()
    outbox.done(outbox._items[0])
    await asyncio.wait_for(drained, 5)


async def test_outbox_tells_who_queued_a_message_whether_it_went_out() -> None:
    metrics = Metrics()
    outbox = PublishQueue(2, metrics.unit(MqttMetrics))
    sent: list[str] = []
    dropped: list[str] = []
    first, second, third = message(1), message(2), message(3)
    outbox.put(first, on_drop=lambda: dropped.append("1"))
    outbox.put(second, on_drop=lambda: dropped.append("2"))
    outbox.when_sent(second, lambda: sent.append("2"))
    head = await outbox.next()  # first is being published: it may reach the broker ...
    outbox.put(third)  # ... so the overflow drops the next oldest
    assert dropped == ["2"] and [m.topic for m in outbox._items] == ["t/1", "t/3"]
    outbox.when_sent(head, lambda: sent.append("1"))
    outbox.done(head)
    assert sent == ["1"]  # the dropped one is never reported sent
    outbox.when_sent(head, lambda: sent.append("late"))  # gone already: at once
    assert sent == ["1", "late"]
    # Refused by the broker: dropped and counted, not published.
    refused = await outbox.next()
    outbox.put(message(4), on_drop=lambda: dropped.append("4"))
    outbox.done(refused, delivered=False)
    assert (
        metrics.registry.get_sample_value(
            "appliance_mqtt_messages_dropped_total", {"kind": "reply"}
        )
        == 2
    )
    assert (
        metrics.registry.get_sample_value(
            "appliance_mqtt_messages_published_total", {"kind": "reply"}
        )
        == 1
    )


async def test_outbox_hands_out_several_in_order_and_again_after_a_reconnect() -> None:
    outbox = PublishQueue(3, Metrics().unit(MqttMetrics))
    first, second, third = message(1), message(2), message(3)
    for item in (first, second):
        outbox.put(item)
    assert [await outbox.next(), await outbox.next()] == [first, second]
    waiting = asyncio.create_task(outbox.next())  # both are out: nothing left to hand
    await asyncio.sleep(0)
    assert not waiting.done()
    outbox.put(third)
    assert await asyncio.wait_for(waiting, 5) is third
    # Full, every message handed out: the overflow drops the oldest, which may then still
    # reach the broker (as with one message out).
    outbox.put(message(4))
    assert [m.topic for m in outbox._items] == ["t/2", "t/3", "t/4"]
    assert not outbox.replace(second, message(5))  # handed out: never replaced
    outbox.done(third)  # acknowledged out of order: it alone leaves
    assert [m.topic for m in outbox._items] == ["t/2", "t/4"]
    outbox.rewind()  # a new connection: what is left goes again, in order
    assert [(await outbox.next()).topic, (await outbox.next()).topic] == ["t/2", "t/4"]


def test_reply_cache_acknowledges_copies_with_the_original() -> None:
    cache = ReplyCache(ttl=10, size=10)
    acks: list[str] = []
    assert cache.begin("a", waiter=lambda: acks.append("copy")) is True
    assert cache.begin("a", waiter=lambda: acks.append("copy")) is False
    waiters = cache.finish("a", [message(1)])
    assert len(waiters) == 1 and acks == []
    assert cache.begin("b") is True
    cache.begin("b", waiter=lambda: None)
    assert len(cache.forget("b")) == 1


def test_reply_cache_remembers_for_a_while_and_a_bounded_number() -> None:
    now = [0.0]
    cache = ReplyCache(ttl=10, size=2, clock=lambda: now[0])
    assert cache.begin("a") is True
    assert cache.begin("a") is False  # still running
    cache.finish("a", [message(1)])
    assert cache.begin("a") == [message(1)]
    now[0] = 11
    assert cache.begin("a") is True  # expired
    cache.begin("b")
    cache.begin("c")
    assert cache.begin("a") is True  # pushed out by size
    cache.forget("c")
    assert cache.begin("c") is True
    assert ReplyCache(ttl=0, size=5).begin("x") is True


def test_windows_tumble_by_default_and_slide_with_a_hop() -> None:
    tumbling = Window(3, 0)
    due = [tumbling.add((float(n),)) for n in range(7)]
    assert [d is not None for d in due] == [False, False, True, False, False, True, False]
    assert due[5] == [(3.0,), (4.0,), (5.0,)]
    sliding = Window(4, 2)
    runs = [r for r in (sliding.add((float(n),)) for n in range(8)) if r is not None]
    assert [[row[0] for row in r] for r in runs] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]


def test_readings_are_numbers_or_named_json_fields() -> None:
    assert parse_reading(b" 21.5\n", []) == (21.5,)
    assert parse_reading(b'{"env": {"t": 20}, "h": 40.5}', ["env.t", "h"]) == (20.0, 40.5)
    for payload, fields, reason in [
        (b"warm", [], "expected a number"),
        (b"nan", [], "not a finite number"),
        (b"\xff", [], "expected a number"),
        (b"[1, 2]", ["t"], "expected a JSON object"),
        (b"{bad", ["t"], "expected a JSON object"),
        (b'{"h": 1}', ["t"], "field 't' is missing"),
        (b'{"t": true}', ["t"], "field 't' is not a number"),
        (b'{"t": "20"}', ["t"], "field 't' is not a number"),
        (b'{"t": 1e999}', ["t"], "not a finite number"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_reading(payload, fields)


def test_output_topic_templates() -> None:
    names = {"base": "appliance/box", "rule": "env", "device_id": "box", "model": "m"}
    assert (
        render("{base}/rules/{rule}/{source}", "sensors/a/t", **names)
        == "appliance/box/rules/env/sensors/a/t"
    )
    assert render("out/{1}/{model}", "sensors/a/t", **names) == "out/a/m"
    with pytest.raises(IndexError):
        render("out/{7}", "sensors/a/t", **names)


def test_topic_layout_and_request_topics() -> None:
    topics = Topics("appliance/box", "fleet", "workers", "homeassistant")
    assert topics.requests == "appliance/box/infer/#"
    assert topics.shared_requests == "$share/workers/fleet/infer/#"
    assert topics.parse_request("appliance/box/infer/m") == RequestTopic("m", None, False)
    assert topics.parse_request("appliance/box/infer/m/msgpack") == RequestTopic(
        "m", Format.MSGPACK, False
    )
    assert topics.parse_request("fleet/infer/m") == RequestTopic("m", None, True)
    assert topics.parse_request("appliance/box/infer/m/x/y") == RequestTopic("", None, False)
    assert topics.parse_request("appliance/box/stats") is None
    assert topics.is_request_space("fleet/infer/m")
    alone = Topics("appliance/box", "fleet", "", None)
    assert alone.parse_request("fleet/infer/m") is None
    assert alone.shared_requests is None and alone.homeassistant_status is None


def test_content_types() -> None:
    assert Format.from_content_type("application/msgpack") is Format.MSGPACK
    assert Format.from_content_type("application/x-msgpack; v=1") is Format.MSGPACK
    assert Format.from_content_type("application/json") is Format.JSON
    assert Format.from_content_type("text/plain") is None
    assert envelope.decode(envelope.encode({"a": b"\x00"}, Format.MSGPACK), Format.MSGPACK) == {
        "a": b"\x00"
    }
    assert envelope.decode(b"Once upon a time", Format.JSON, allow_text=True) == "Once upon a time"
    with pytest.raises(RequestError, match="invalid JSON"):
        envelope.decode(b'{"a": ', Format.JSON, allow_text=True)


def test_errors_map_to_reply_codes_in_one_place(caplog: pytest.LogCaptureFixture) -> None:
    cases = [
        (PayloadTooLarge("big", param="payload"), "too_large", None),
        (RequestError("bad", param="x"), "bad_request", None),
        (ModelNotFound("m"), "not_found", None),
        (Overloaded("m", 2.0), "busy", 2.0),
        (ModelUnavailable("m", "loading"), "unavailable", envelope.UNAVAILABLE_RETRY_AFTER),
        (ShuttingDown("stopping"), "unavailable", envelope.UNAVAILABLE_RETRY_AFTER),
        (KeyError("secret detail"), "internal", None),
    ]
    for exc, code, retry in cases:
        body = envelope.error_body(exc)
        assert body["code"] == code
        assert body.get("retry_after") == retry
    assert "secret detail" not in envelope.error_body(KeyError("secret detail"))["message"]
    assert "unhandled error" in caplog.text


def test_tls_context_and_password_sources(tmp_path: Path) -> None:
    context = tls_context(MqttConfig(tls=True, tls_min_version="1.3", tls_insecure=True))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert context.check_hostname is False
    assert tls_context(MqttConfig(tls=True)).minimum_version is ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match=r"mqtt\.tls_ca_file"):
        tls_context(MqttConfig(tls=True, tls_ca_file=tmp_path / "missing.pem"))
    (tmp_path / "mqtt-password").write_text("from-credential\n")
    assert (
        read_password(MqttConfig(), {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "from-credential"
    )
    inline = MqttConfig.model_validate({"password": "inline"})
    assert read_password(inline, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "inline"
    assert read_password(MqttConfig(), {}) is None
