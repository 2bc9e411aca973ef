"""Real Mosquitto brokers and real MQTT clients for the MQTT transport tests.

Every test gets its own ``mosquitto`` on a free loopback port with its own config file in
``tmp_path`` (plain, password or TLS); clients are paho-mqtt (3.1.1 and 5) and Debian's
``mosquitto_pub``/``mosquitto_sub``/``mosquitto_rr``. Waits are bounded, never timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.server import Server
from tests.conftest import make_config, serving

WAIT = 20.0  # seconds any single expected event may take before the test fails


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TlsFiles:
    ca: Path
    cert: Path  # the broker's
    key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> TlsFiles:
    """A test CA, a broker certificate for 127.0.0.1/localhost and a client certificate,
    made with the openssl command line tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed")
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=Appliance test CA",
    )
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            *ext,
        )
    return TlsFiles(
        directory / "ca.crt",
        directory / "server.crt",
        directory / "server.key",
        directory / "client.crt",
        directory / "client.key",
    )


class Broker:
    """One ``mosquitto`` process with its own config; restartable on the same port."""

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path,
        *,
        users: dict[str, str] | None = None,
        tls: TlsFiles | None = None,
        client_certificates: bool = False,
        persistence: bool = True,
    ) -> None:
        if shutil.which("mosquitto") is None or shutil.which("mosquitto_rr") is None:
            pytest.skip("mosquitto and mosquitto-clients are not installed (scripts/setup test)")
        self.directory = directory
        self.port = free_port()
        self.users = users
        self.tls = tls
        self.client_certificates = client_certificates
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.users else 'true'}",
            # Sessions, subscriptions and queued messages survive a restart, even a kill -9
            # (the database is saved after every change).
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            "autosave_on_changes true",
            "max_queued_messages 10000",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # else mosquitto drops to a user that cannot write here
        if self.users:
            password_file = self.directory / "passwords"
            password_file.touch()
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.append(f"password_file {password_file}")
        if self.tls:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if self.client_certificates else 'false'}",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{self.read_log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, tool: str, *args: str) -> list[str]:
        """Command line of a mosquitto client tool against this broker."""
        return [tool, "-h", self.host, "-p", str(self.port), *args]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def stories_repo(tmp_path: Path, stories_gguf: Path) -> Path:
    """A model repository serving the TinyStories GGUF model as ``stories`` with a 256-token
    context, so an unbounded generation still ends quickly."""
    model_dir = tmp_path / "models" / "stories"
    model_dir.mkdir(parents=True)
    shutil.copyfile(stories_gguf, model_dir / "stories.gguf")
    (model_dir / "manifest.toml").write_text(
        'name = "stories"\nruntime = "gguf"\nfile = "stories.gguf"\nversion = "1"\n'
        "[options]\nn_ctx = 256\n"
    )
    return model_dir.parent


def device_id() -> str:
    return "t-" + uuid.uuid4().hex[:10]


def mqtt_sections(broker: Broker, device: str, **mqtt: Any) -> dict[str, dict[str, Any]]:
    """Config sections for a daemon that talks to ``broker`` and retries quickly."""
    values: dict[str, Any] = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
        "stats_interval": 0,
        "timeout": 5,
    }
    values.update(mqtt)
    return {"device": {"id": device, "name": "Test box"}, "mqtt": values}


@asynccontextmanager
async def appliance(
    broker: Broker,
    *,
    device: str | None = None,
    connected: bool = True,
    models: dict[str, Any] | None = None,
    mqtt: dict[str, Any] | None = None,
    **sections: Any,
) -> AsyncIterator[Server]:
    """An in-process daemon using ``broker``; waits until it is subscribed and announced."""
    merged = mqtt_sections(broker, device or device_id(), **(mqtt or {}))
    if models:
        merged["models"] = models
    merged.update(sections)
    async with serving(make_config(**merged)) as server:
        if connected:
            await until(lambda: mqtt_state(server) == "connected")
        yield server


def mqtt_state(server: Server) -> str:
    assert server.core is not None
    return str(server.core.unit_status()["mqtt"]["state"])


async def until(
    predicate: Callable[[], bool], timeout: float = WAIT, what: str | Callable[[], str] = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"not reached in {timeout}s: {text or predicate}")
        await asyncio.sleep(0.02)


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any

    def json(self) -> Any:
        return json.loads(self.payload)


class PahoClient:
    """A paho-mqtt client (MQTT 5 or 3.1.1) on its own network thread, collecting messages."""

    def __init__(
        self,
        broker: Broker,
        *,
        v5: bool = True,
        client_id: str = "",
        clean: bool = True,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.v5 = v5
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or "test-" + uuid.uuid4().hex[:8],
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else clean,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)  # after a broker restart
        if username:
            self.client.username_pw_set(username, password)
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscriptions: list[str] = []
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if clean else 3600
        self.client.connect(
            broker.host,
            broker.port,
            keepalive=30,
            clean_start=clean if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()
        if not self._connected.wait(WAIT):
            self.close()
            raise AssertionError("test client could not connect")

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        for topic in self._subscriptions:  # after a broker restart without our session
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Received(
                    msg.topic,
                    bytes(msg.payload),
                    bool(msg.retain),
                    getattr(msg, "properties", None),
                )
            )

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self._subscriptions.append(topic)
        self.client.subscribe(topic, qos=1)
        assert done.wait(WAIT), "no SUBACK"

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        content_type: str | None = None,
    ) -> None:
        properties = None
        if self.v5 and (response_topic or correlation or content_type):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation:
                properties.CorrelationData = correlation
            if content_type:
                properties.ContentType = content_type
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos and self._connected.is_set() and info.rc == paho.MQTT_ERR_SUCCESS:
            info.wait_for_publish(WAIT)

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if paho.topic_matches_sub(topic, m.topic)]

    async def wait(self, topic: str, count: int = 1, timeout: float = WAIT) -> list[Received]:
        """The first ``count`` messages on ``topic`` (a filter), once that many arrived."""
        await until(
            lambda: len(self.on(topic)) >= count,
            timeout,
            lambda: f"{count} message(s) on {topic}; got {len(self.on(topic))}",
        )
        return self.on(topic)[:count]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho_clients() -> Iterator[Callable[..., PahoClient]]:
    """Factory of connected paho clients; all closed at the end of the test."""
    made: list[PahoClient] = []

    def make(broker: Broker, **kwargs: Any) -> PahoClient:
        client = PahoClient(broker, **kwargs)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


async def run_tool(
    *command: str, stdin: bytes | None = None, timeout: float = WAIT
) -> tuple[int, str, str]:
    """Run a mosquitto client tool; (exit status, stdout, stderr)."""
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=pipe if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{command[0]} did not finish: {command}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# A normal 32-minute window from the model's own simulator (score about 0.31; machine off):
# temperature °C, relative humidity %RH, vibration g.
NORMAL_WINDOW = [
    [24.749, 68.165, 0.02],
    [24.774, 67.321, 0.021],
    [24.644, 67.85, 0.02],
    [24.656, 67.886, 0.02],
    [24.702, 67.593, 0.019],
    [24.655, 67.532, 0.02],
    [24.756, 67.278, 0.021],
    [24.658, 67.203, 0.021],
    [24.743, 66.687, 0.021],
    [24.823, 67.507, 0.021],
    [24.723, 67.353, 0.02],
    [24.764, 67.374, 0.02],
    [24.742, 67.093, 0.02],
    [24.722, 67.121, 0.021],
    [24.694, 67.535, 0.021],
    [24.696, 67.594, 0.021],
    [24.671, 67.767, 0.02],
    [24.639, 67.632, 0.02],
    [24.64, 68.214, 0.02],
    [24.694, 67.478, 0.02],
    [24.6, 67.395, 0.021],
    [24.64, 67.79, 0.019],
    [24.552, 68.505, 0.02],
    [24.547, 68.497, 0.022],
    [24.657, 67.633, 0.02],
    [24.59, 68.345, 0.02],
    [24.516, 68.393, 0.02],
    [24.454, 68.02, 0.021],
    [24.404, 68.229, 0.02],
    [24.32, 68.048, 0.021],
    [24.354, 68.108, 0.02],
    [24.253, 68.22, 0.02],
]


def window(anomalous: bool = False) -> list[list[float]]:
    """A window for sensor-anomaly; ``anomalous`` puts the temperature sensor at an error
    value (85 °C) for the last 8 readings (score about 33)."""
    rows = [list(row) for row in NORMAL_WINDOW]
    if anomalous:
        for row in rows[24:]:
            row[0] = 85.0
    return rows
