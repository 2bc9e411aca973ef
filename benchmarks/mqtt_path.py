"""The MQTT request path against its transport's ceiling, interleaved through one broker.

A local Mosquitto (on a free loopback port, ``set_tcp_nodelay`` on, as
:mod:`benchmarks.mqtt_rr` starts it) carries both: the daemon on its defaults answering
``sensor-anomaly`` requests on ``appliance/bench/infer/sensor-anomaly``, and the ceiling
(:mod:`benchmarks.mqtt_echo`: bare aiomqtt parsing the same payload with the same JSON
reader and publishing the appliance's own reply bytes at QoS 1) on
``appliance/echo1/infer/sensor-anomaly``. Both stay connected for the whole run, so each
listens on a topic of its own (the same length and depth; one topic would have both
answer every request). One paho-mqtt MQTT 5 client keeps ``in_flight`` requests
outstanding (a reply sends the next one), with a response topic and correlation data.

Each round measures the ceiling and then the appliance at every in-flight count; medians
over the rounds and their ratios. The CPU time the responding process spends per round
trip (user + system, all threads, from /proc) is reported beside round trips/s, which
moves with a shared box's load; the broker's and the client's CPU are the same for both.

``python -m benchmarks.mqtt_path [--rounds 3] [--seconds 2] [--in-flight 1 8 32]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    ROOT,
    Daemon,
    cpu_seconds,
    fmt,
    free_port,
    median,
    pct,
    stop,
    table,
)

MODEL = "sensor-anomaly"
APPLIANCE_TOPIC = f"appliance/bench/infer/{MODEL}"
CEILING_FILTER = "appliance/echo1/infer/#"
CEILING_TOPIC = f"appliance/echo1/infer/{MODEL}"
REPLY_TOPIC = "bench/replies"


def payload() -> bytes:
    """A 32-sample window of three readings, as a sensor sends it (the simple form)."""
    window = np.random.default_rng(0).normal(20, 5, (32, 3)).astype(np.float32)
    return json.dumps({"data": window.tolist()}).encode()


class Loader:
    """One MQTT 5 client keeping requests in flight; a reply sends the next request."""

    def __init__(self, port: int, name: str = "bench-load", reply_topic: str = REPLY_TOPIC) -> None:
        import paho.mqtt.client as mqtt

        self._lock = threading.Lock()
        self._pending: dict[bytes, float] = {}
        self._ids = itertools.count()
        self._topic = ""
        self._until = 0.0  # send again on a reply received before this
        self._window = (0.0, 0.0)  # replies received inside it are recorded
        self.latencies: list[float] = []
        self.replies: dict[str, bytes] = {}
        self._drained = threading.Event()
        subscribed = threading.Event()
        self._reply_topic = reply_topic
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, *_: c.subscribe(reply_topic, qos=0)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("cannot subscribe on the broker")
        self._client = client
        self._payload = payload()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def _send(self, topic: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        with self._lock:
            cid = str(next(self._ids)).encode()
            self._pending[cid] = time.perf_counter()
        props.ResponseTopic, props.CorrelationData = self._reply_topic, cid
        self._client.publish(topic, self._payload, qos=0, properties=props)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        now = time.perf_counter()
        cid = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            sent = self._pending.pop(cid, None) if cid is not None else None
            if sent is None:
                return
            self.replies[self._topic] = message.payload
            if self._window[0] <= now < self._window[1]:
                self.latencies.append(now - sent)
            again = now < self._until
            if not self._pending and not again:
                self._drained.set()
        if again:
            self._send(self._topic)

    def ask(self, topic: str, timeout: float = 30.0) -> bytes:
        """One request to ``topic``, retried until a reply comes; that reply."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.replies.pop(topic, None)
            point = self.run(topic, 1, 0.0, warmup=0.0, timeout=0.5)
            if point["answered"] and topic in self.replies:
                return self.replies[topic]
        raise RuntimeError(f"no reply on {topic} within {timeout} s")

    def run(
        self,
        topic: str,
        in_flight: int,
        seconds: float,
        *,
        warmup: float = 0.3,
        probe: Any = None,
        timeout: float = 10.0,
    ) -> dict[str, float]:
        """``in_flight`` requests outstanding for ``warmup`` + ``seconds``; the round trips
        answered inside the measured window, and how much ``probe()`` grew over it."""
        self.latencies = []
        self._drained.clear()
        started = time.perf_counter()
        with self._lock:
            self._topic = topic
            self._pending.clear()
            self._window = (started + warmup, started + warmup + seconds)
            self._until = started + warmup + seconds
        for _ in range(in_flight):
            self._send(topic)
        time.sleep(max(0.0, self._window[0] - time.perf_counter()))
        before = probe() if probe is not None else 0.0
        time.sleep(max(0.0, self._window[1] - time.perf_counter()))
        grown = probe() - before if probe is not None else 0.0
        lost = 0
        if not self._drained.wait(timeout):
            with self._lock:
                lost = len(self._pending)
                self._pending.clear()
        answered = len(self.latencies)
        return {
            "answered": answered if seconds else 1 - lost,
            "rps": answered / seconds if seconds else 0.0,
            "p50_ms": pct(self.latencies, 50) * 1000,
            "probe": grown,
            "lost": lost,
        }


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "mosquitto-path.conf"
    # set_tcp_nodelay: see benchmarks/mqtt_rr.py (Nagle holds small replies back ~40 ms).
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\n"
    )
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.3)
    return broker, port


def run(
    work: Path,
    rounds: int = 3,
    seconds: float = 2.0,
    levels: tuple[int, ...] = (1, 8, 32),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    if shutil.which("mosquitto") is None:
        return {"skipped": "mosquitto is not installed"}
    work.mkdir(parents=True, exist_ok=True)
    broker, port = start_broker(work)
    daemon = echo = loader = None
    try:
        daemon = Daemon(
            env={
                "APPLIANCE_MQTT__ENABLED": "true",
                "APPLIANCE_MQTT__HOST": "127.0.0.1",
                "APPLIANCE_MQTT__PORT": str(port),
                "APPLIANCE_DEVICE__ID": "bench",
                "APPLIANCE_MODELS__QUEUE_SIZE": "128",
                **(env or {}),
            }
        )
        loader = Loader(port)
        answer = loader.ask(APPLIANCE_TOPIC)
        reply_file = work / f"mqtt-reply-{MODEL}.json"
        reply_file.write_bytes(answer)
        echo = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.mqtt_echo", str(port), CEILING_FILTER, reply_file],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if loader.ask(CEILING_TOPIC) != answer:
            raise RuntimeError("the ceiling answers other bytes than the appliance")
        servers = {
            "ceiling": (CEILING_TOPIC, echo.pid),
            "appliance": (APPLIANCE_TOPIC, daemon.proc.pid),
        }
        labels = ("ceiling", "appliance")
        rps: dict[str, dict[int, list[float]]] = {k: {n: [] for n in levels} for k in labels}
        p50 = {k: {n: [] for n in levels} for k in labels}
        cpu = {k: {n: [] for n in levels} for k in labels}
        lost = 0
        for _ in range(rounds):
            for n in levels:
                for label in labels:
                    topic, pid = servers[label]
                    point = loader.run(topic, n, seconds, probe=lambda p=pid: cpu_seconds(p))
                    rps[label][n].append(point["rps"])
                    p50[label][n].append(point["p50_ms"])
                    cpu[label][n].append(point["probe"] / max(1, point["rps"] * seconds) * 1e6)
                    lost += int(point["lost"])
        return {
            "rounds": rounds,
            "seconds": seconds,
            "lost": lost,
            "reply_bytes": len(answer),
            "points": {
                str(n): {
                    "ceiling_rps": median(rps["ceiling"][n]),
                    "appliance_rps": median(rps["appliance"][n]),
                    "ratio": median(rps["appliance"][n]) / median(rps["ceiling"][n]),
                    "ceiling_p50_ms": median(p50["ceiling"][n]),
                    "appliance_p50_ms": median(p50["appliance"][n]),
                    "ceiling_cpu_us": median(cpu["ceiling"][n]),
                    "appliance_cpu_us": median(cpu["appliance"][n]),
                    "cpu_ratio": median(cpu["ceiling"][n]) / median(cpu["appliance"][n]),
                    "ceiling_all": rps["ceiling"][n],
                    "appliance_all": rps["appliance"][n],
                }
                for n in levels
            },
        }
    finally:
        if loader is not None:
            loader.close()
        if echo is not None:
            stop(echo)
        if daemon is not None:
            daemon.stop()
        stop(broker)


def render(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    rows = [
        [
            n,
            p["ceiling_rps"],
            p["appliance_rps"],
            f"{p['ratio']:.2f}×",
            f"{fmt(p['ceiling_p50_ms'], 2)} / {fmt(p['appliance_p50_ms'], 2)}",
            p["ceiling_cpu_us"],
            p["appliance_cpu_us"],
            f"{p['cpu_ratio']:.2f}×",
        ]
        for n, p in result["points"].items()
    ]
    return (
        f"{MODEL} over MQTT 5, medians of {result['rounds']} interleaved rounds of "
        f"{fmt(result['seconds'])} s a point (reply {result['reply_bytes']} bytes; "
        f"lost: {result['lost']}):\n\n"
        + table(
            [
                "in flight",
                "ceiling round trips/s",
                "appliance round trips/s",
                "vs ceiling",
                "p50 ms ceiling / appliance",
                "ceiling CPU µs/req",
                "appliance CPU µs/req",
                "CPU vs ceiling",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mqtt_path", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    result = run(
        ROOT / "benchmarks" / "results" / "work", args.rounds, args.seconds, tuple(args.in_flight)
    )
    print(render(result))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
