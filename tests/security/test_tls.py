"""TLS: the certs command, HTTPS with a minimum version, the hub, and MQTT with the same
certificates."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from appliance.errors import ConfigError
from appliance.security import tls
from tests.conftest import ROOT, make_config, serving


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a device certificate for 127.0.0.1/localhost, made by the real command."""
    directory = tmp_path_factory.mktemp("pki")
    made = _cli("certs", "init", "--dir", str(directory))
    assert made.returncode == 0, made.stderr
    issued = _cli("certs", "device", "--dir", str(directory), "localhost", "127.0.0.1")
    assert issued.returncode == 0, issued.stderr
    assert (directory / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (directory / "device-key.pem").stat().st_mode & 0o777 == 0o600
    again = _cli("certs", "init", "--dir", str(directory))
    assert again.returncode == 1 and "--force" in again.stderr  # never overwritten silently
    return directory


def _handshake(port: int, ca: Path, *, maximum: ssl.TLSVersion | None = None) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = maximum
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        version = sock.version()
        assert version is not None
        return version


@pytest.mark.parametrize("minimum", ["1.2", "1.3"])
async def test_https_negotiates_and_refuses_older_versions(
    pki: Path, default_models: Path, minimum: str
) -> None:
    config = make_config(
        models={"dir": str(default_models)},
        http={
            "tls_cert_file": str(pki / "device.pem"),
            "tls_key_file": str(pki / "device-key.pem"),
            "tls_min_version": minimum,
        },
    )
    async with serving(config) as server:
        assert server.http_url.startswith("https://")
        ca = pki / tls.CA_CERT
        assert await asyncio.to_thread(_handshake, server.port, ca) == "TLSv1.3"
        if minimum == "1.3":
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(_handshake, server.port, ca, maximum=ssl.TLSVersion.TLSv1_2)
        else:
            assert (
                await asyncio.to_thread(_handshake, server.port, ca, maximum=ssl.TLSVersion.TLSv1_2)
                == "TLSv1.2"
            )
        context = ssl.create_default_context(cafile=str(ca))
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"https://localhost:{server.port}/health", ssl=context) as response,
        ):
            assert response.status == 200


def test_bad_certificate_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"http\.tls_cert_file"):
        tls.server_context(tmp_path / "bad.pem", None, "1.2")


def test_hub_serves_tls_with_a_minimum_version(pki: Path, tmp_path: Path) -> None:
    from tests.hub.conftest import hub

    env = {
        "APPLIANCE_HUB_HTTP__TLS_CERT_FILE": str(pki / "device.pem"),
        "APPLIANCE_HUB_HTTP__TLS_KEY_FILE": str(pki / "device-key.pem"),
        "APPLIANCE_HUB_HTTP__TLS_MIN_VERSION": "1.3",
    }
    with hub(f"sqlite:///{tmp_path / 'hub.db'}", env=env) as process:
        port = int(process.url.rsplit(":", 1)[1])
        assert process.url.startswith("https://")
        assert _handshake(port, pki / tls.CA_CERT) == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            _handshake(port, pki / tls.CA_CERT, maximum=ssl.TLSVersion.TLSv1_2)


async def test_mqtt_tls_uses_the_same_material(pki: Path, tmp_path: Path) -> None:
    """A Mosquitto broker with a certificate from the same CA, requiring client
    certificates: the appliance connects with its device certificate."""
    from tests.transports.mqtt.conftest import Broker, TlsFiles, appliance, mqtt_state

    broker_cert = _cli(
        "certs", "device", "--dir", str(pki), "--name", "broker", "localhost", "127.0.0.1"
    )
    assert broker_cert.returncode == 0, broker_cert.stderr
    files = TlsFiles(
        pki / tls.CA_CERT,
        pki / "broker.pem",
        pki / "broker-key.pem",
        pki / "device.pem",
        pki / "device-key.pem",
    )
    broker = Broker(tmp_path, tls=files, client_certificates=True)
    broker.start()
    try:
        async with appliance(
            broker,
            mqtt={
                "tls": True,
                "tls_ca_file": str(files.ca),
                "tls_cert_file": str(files.client_cert),
                "tls_key_file": str(files.client_key),
            },
        ) as server:
            assert mqtt_state(server) == "connected"
    finally:
        broker.stop()
