"""Benchmark 4: MQTT request → reply round trip through a local Mosquitto.

The appliance's MQTT transport (docs/mqtt.md) answers MQTT 5 requests on
``appliance/<device>/infer/sensor-anomaly`` at the response topic with the correlation data.
One paho-mqtt client sends requests one at a time (round-trip p50/p99), then keeps
``in_flight`` requests outstanding for ``seconds`` (messages/s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Daemon, free_port, pct, stop

REQUESTS = 300


def run(work: Path, threads: int, seconds: float = 3.0, in_flight: int = 16) -> dict[str, Any]:
    if shutil.which("mosquitto") is None:
        return {"skipped": "mosquitto is not installed"}
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    port = free_port()
    conf = work / "mosquitto.conf"
    # set_tcp_nodelay: Mosquitto leaves Nagle's algorithm on by default, which holds small
    # replies back for the peer's delayed ACK (~40 ms on Linux) — set it on any broker
    # serving request/response traffic.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\n"
    )
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    daemon = None
    try:
        time.sleep(0.3)
        daemon = Daemon(
            env={
                "APPLIANCE_MQTT__ENABLED": "true",
                "APPLIANCE_MQTT__HOST": "127.0.0.1",
                "APPLIANCE_MQTT__PORT": str(port),
                "APPLIANCE_DEVICE__ID": "bench",
                "APPLIANCE_MODELS__QUEUE_SIZE": "64",
            }
        )
        topic = "appliance/bench/infer/sensor-anomaly"
        reply_topic = "bench/replies"
        payload = json.dumps({"data": [[21.5, 45.0, 0.6]] * 32}).encode()
        pending: dict[bytes, float] = {}
        done: dict[bytes, float] = {}
        lock = threading.Condition()
        connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

        def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            c.subscribe(reply_topic, qos=0)

        def on_subscribe(*args: Any) -> None:
            connected.set()

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            cid = getattr(msg.properties, "CorrelationData", None)
            now = time.perf_counter()
            with lock:
                if cid in pending:
                    done[cid] = now - pending.pop(cid)
                    lock.notify_all()

        client.on_connect, client.on_subscribe, client.on_message = (
            on_connect,
            on_subscribe,
            on_message,
        )
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("cannot subscribe on the broker")
        time.sleep(0.5)  # the appliance subscribes to its request topics after connecting
        counter = 0

        def send() -> bytes:
            nonlocal counter
            counter += 1
            cid = str(counter).encode()
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = reply_topic, cid
            with lock:
                pending[cid] = time.perf_counter()
            client.publish(topic, payload, qos=0, properties=props)
            return cid

        for _ in range(20):  # warm up
            cid = send()
            with lock:
                lock.wait_for(lambda c=cid: c in done, timeout=10)
        done.clear()
        for _ in range(REQUESTS):
            cid = send()
            with lock:
                if not lock.wait_for(lambda c=cid: c in done, timeout=10):
                    raise RuntimeError("no MQTT reply within 10 s")
        round_trips = list(done.values())
        done.clear()
        started = time.perf_counter()
        for _ in range(in_flight):
            send()
        while time.perf_counter() - started < seconds:
            with lock:
                lock.wait_for(lambda: len(pending) < in_flight, timeout=10)
                missing = in_flight - len(pending)
            for _ in range(missing):
                send()
        wall = time.perf_counter() - started
        answered = len(done)
        client.loop_stop()
        client.disconnect()
        return {
            "requests": REQUESTS,
            "p50_ms": pct(round_trips, 50) * 1000,
            "p99_ms": pct(round_trips, 99) * 1000,
            "in_flight": in_flight,
            "messages_per_s": answered / wall,
        }
    finally:
        if daemon is not None:
            daemon.stop()
        stop(broker)
