"""The connection itself: state documents, last will, a broker that is away, credentials and
TLS, the persistent session, MQTT 3.1.1 and fleet scale-out through a shared subscription."""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgpack
import pytest

from tests.conftest import base_url, daemon
from tests.transports.mqtt.conftest import (
    Broker,
    PahoClient,
    appliance,
    make_certificates,
    mqtt_state,
    run_tool,
    until,
    window,
)

Clients = Callable[..., PahoClient]
MODEL = "sensor-anomaly"


async def test_retained_state_documents_and_a_graceful_goodbye(
    broker: Broker, paho_clients: Clients
) -> None:
    async with appliance(broker, device="doc-box", mqtt={"stats_interval": 0.1}) as server:
        late = paho_clients(broker)  # joins after the announcement: retained copies
        late.subscribe("appliance/doc-box/#")
        availability = (await late.wait("appliance/doc-box/availability"))[0]
        await until(
            lambda: any(
                m.json()["models"][MODEL]["state"] == "ready"
                for m in late.on("appliance/doc-box/info")
            )
        )
        await late.wait("appliance/doc-box/stats", 3)  # periodic
        http_url = server.http_url
    await late.wait("appliance/doc-box/availability", 2)
    assert availability.retain and availability.payload == b"online"
    assert late.on("appliance/doc-box/availability")[-1].payload == b"offline"
    info = late.on("appliance/doc-box/info")[-1].json()
    assert info["device"] == {"id": "doc-box", "name": "Test box"}
    assert info["http_url"] == http_url
    assert info["models"][MODEL]["capabilities"] == ["infer"]
    assert info["topics"]["requests"] == "appliance/doc-box/infer/<model>"
    stats = late.on("appliance/doc-box/stats")[-1].json()
    assert stats["models"][MODEL]["state"] == "ready"
    assert stats["mqtt"]["state"] == "connected"
    assert set(stats["system"]) >= {"cpu_percent", "memory_percent", "max_temperature_c"}
    # A new subscriber still learns the appliance is gone.
    after = paho_clients(broker)
    after.subscribe("appliance/doc-box/availability")
    assert (await after.wait("appliance/doc-box/availability"))[0].payload == b"offline"


async def test_last_will_marks_a_killed_daemon_offline(
    broker: Broker, paho_clients: Clients
) -> None:
    watcher = paho_clients(broker, v5=False)
    watcher.subscribe("appliance/will-box/availability")
    env = {
        "APPLIANCE_MQTT__ENABLED": "true",
        "APPLIANCE_MQTT__HOST": broker.host,
        "APPLIANCE_MQTT__PORT": str(broker.port),
        "APPLIANCE_DEVICE__ID": "will-box",
        "APPLIANCE_MQTT__KEEPALIVE": "5",
    }
    with daemon(env=env) as proc:
        await watcher.wait("appliance/will-box/availability")
        assert watcher.on("appliance/will-box/availability")[0].payload == b"online"
        # The state change is in the journal too.
        await until(lambda: any("MQTT connected to" in line for line in proc.log))
        proc.stop(signal.SIGKILL)
        seen = await watcher.wait("appliance/will-box/availability", 2)
    assert seen[1].payload == b"offline"


async def test_http_serves_while_the_broker_is_away_and_mqtt_reconnects(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.transports.mqtt")
    broker = Broker(tmp_path)  # not started yet
    async with appliance(broker, device="away-box", connected=False) as server:
        registry = server.metrics.registry
        await until(
            lambda: (registry.get_sample_value("appliance_mqtt_connect_failures_total") or 0) >= 4
        )
        async with http.get(base_url(server) + "/health") as resp:
            health = await resp.json()
            assert resp.status == 200
        async with http.get(base_url(server) + "/metrics") as resp:
            metrics = await resp.text()
        broker.start()
        try:
            await until(lambda: mqtt_state(server) == "connected")
            async with http.get(base_url(server) + "/health") as resp:
                connected = (await resp.json())["units"]["mqtt"]
        finally:
            broker.stop()
    mqtt = health["units"]["mqtt"]
    assert mqtt["state"] in ("connecting", "disconnected")
    assert "refused" in mqtt["last_error"].lower()
    assert mqtt["broker"] == f"mqtt://{broker.host}:{broker.port}"
    assert "appliance_mqtt_connected 0.0" in metrics
    assert connected["state"] == "connected" and connected["connects"] == 1
    unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(unavailable) == 1  # once per state change, however many retries
    assert any("MQTT connected" in r.getMessage() for r in caplog.records)


async def test_username_and_password(tmp_path: Path, paho_clients: Clients) -> None:
    broker = Broker(tmp_path, users={"appliance": "s3cret pass", "client": "c"})
    broker.start()
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret pass\n")
    try:
        async with appliance(
            broker, device="pw-box", mqtt={"username": "appliance", "password_file": str(secret)}
        ):
            rc, out, err = await run_tool(
                *broker.cli(
                    "mosquitto_rr",
                    "-u",
                    "client",
                    "-P",
                    "c",
                    "-q",
                    "1",
                    "-W",
                    "10",
                    "-t",
                    f"appliance/pw-box/infer/{MODEL}",
                    "-e",
                    "replies/pw",
                    "-m",
                    json.dumps({"data": window()}),
                )
            )
            assert rc == 0, err
            assert json.loads(out)["status"] == "ok"
        async with appliance(
            broker,
            device="pw-box",
            connected=False,
            mqtt={"username": "appliance", "password": "wrong"},
        ) as server:
            assert server.core is not None
            await until(
                lambda: (
                    server.core is not None
                    and bool(server.core.unit_status()["mqtt"]["last_error"])
                )
            )
            status = server.core.unit_status()["mqtt"]
    finally:
        broker.stop()
    assert status["state"] != "connected"
    assert "not authori" in status["last_error"].lower()


# paho-mqtt does not close the socket when a TLS handshake fails (the daemon's refused
# attempt below); the garbage collector does, with a ResourceWarning.
@pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)
async def test_tls_with_our_ca_and_a_client_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    broker = Broker(tmp_path, tls=certs, client_certificates=True)
    broker.start()
    tls = {
        "tls": True,
        "tls_ca_file": str(certs.ca),
        "tls_cert_file": str(certs.client_cert),
        "tls_key_file": str(certs.client_key),
    }
    try:
        async with appliance(broker, device="tls-box", mqtt=tls) as server:
            rc, out, err = await run_tool(
                *broker.cli(
                    "mosquitto_rr",
                    "--cafile",
                    str(certs.ca),
                    "--cert",
                    str(certs.client_cert),
                    "--key",
                    str(certs.client_key),
                    "-q",
                    "1",
                    "-W",
                    "10",
                    "-t",
                    f"appliance/tls-box/infer/{MODEL}",
                    "-e",
                    "replies/tls",
                    "-m",
                    json.dumps({"data": window()}),
                )
            )
            assert rc == 0, err
            assert json.loads(out)["status"] == "ok"
            assert server.core is not None
            assert server.core.unit_status()["mqtt"]["broker"].startswith("mqtts://")
        # Without our CA the broker's certificate cannot be verified: no connection.
        untrusted = {**tls, "tls_ca_file": None}
        async with appliance(broker, device="tls-box", connected=False, mqtt=untrusted) as server:
            await until(
                lambda: bool(server.core and server.core.unit_status()["mqtt"]["last_error"])
            )
            refused = server.core.unit_status()["mqtt"] if server.core else {}
    finally:
        broker.stop()
    assert refused["state"] != "connected"
    assert "certificate verify failed" in refused["last_error"]


async def test_requests_published_while_the_appliance_is_down_are_served(
    broker: Broker, paho_clients: Clients
) -> None:
    async with appliance(broker, device="away"):
        pass  # the broker now holds the appliance's persistent session
    v5 = paho_clients(broker)
    v5.subscribe("replies/later")
    v311 = paho_clients(broker, v5=False)
    v311.subscribe("replies/later311")
    v5.publish(
        f"appliance/away/infer/{MODEL}",
        json.dumps({"data": window()}),
        response_topic="replies/later",
        correlation=b"queued",
    )
    v311.publish(
        f"appliance/away/infer/{MODEL}",
        json.dumps({"id": 9, "reply_to": "replies/later311", "data": window()}),
    )
    async with appliance(broker, device="away"):
        first = (await v5.wait("replies/later"))[0]
        second = (await v311.wait("replies/later311"))[0]
    assert first.properties.CorrelationData == b"queued"
    assert first.json()["status"] == "ok"
    assert second.json()["id"] == 9


async def test_appliance_speaking_mqtt311(broker: Broker, paho_clients: Clients) -> None:
    client = paho_clients(broker, v5=False)
    client.subscribe("replies/old")
    client.subscribe("appliance/old-box/availability")
    async with appliance(broker, device="old-box", mqtt={"protocol": "3.1.1"}):
        client.publish(
            f"appliance/old-box/infer/{MODEL}/msgpack",
            msgpack.packb({"id": "o", "reply_to": "replies/old", "data": window(anomalous=True)}),
        )
        reply = (await client.wait("replies/old"))[0]
    body = msgpack.unpackb(reply.payload)
    assert body["id"] == "o" and body["data"]["outputs"]["is_anomaly"] is True
    assert [m.payload for m in client.on("appliance/old-box/availability")] == [
        b"online",
        b"offline",
    ]
    # 3.1.1 with a persistent session; the id carries the test's state directory's suffix
    assert re.search(r"as appliance-old-box(-[0-9a-f]{8})? \(p2, c0", broker.read_log())


async def test_fleet_requests_are_spread_over_a_shared_subscription(
    broker: Broker, paho_clients: Clients
) -> None:
    client = paho_clients(broker)
    client.subscribe("replies/fleet")
    fleet = {"shared_group": "sensors", "fleet_topic": "fleet/site-1"}
    async with (
        appliance(broker, device="node-a", mqtt=fleet),
        appliance(broker, device="node-b", mqtt=fleet),
    ):
        for n in range(12):
            client.publish(
                f"fleet/site-1/infer/{MODEL}",
                json.dumps({"data": window()}),
                response_topic="replies/fleet",
                correlation=b"%d" % n,
            )
        replies = await client.wait("replies/fleet", 12)
    correlations = sorted(int(r.properties.CorrelationData) for r in replies)
    assert correlations == list(range(12))  # each request answered exactly once
    devices = {r.json()["device"] for r in replies}
    assert devices == {"node-a", "node-b"}  # and the broker spread them
