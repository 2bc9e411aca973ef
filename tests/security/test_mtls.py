"""Mutual TLS: client certificates made by ``appliance certs client``, checked in real
handshakes by the HTTPS listener (and gRPC); a verified certificate standing in for an API
key through ``security.client_certs``."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance import config as config_mod
from appliance.errors import ConfigError
from appliance.security import tls
from appliance.security.access import daemon_policy
from tests.conftest import ROOT, make_config, serving
from tests.security.conftest import bearer, key_entries


def _cli(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with the box's certificate and two client certificates (sensor-1, reader);
    another CA with a client certificate of the same name (other/sensor-1)."""
    root = tmp_path_factory.mktemp("mtls")
    ca, other = root / "ca", root / "other"
    _cli("certs", "init", "--dir", str(ca))
    _cli("certs", "device", "--dir", str(ca), "localhost", "127.0.0.1")
    _cli("certs", "client", "sensor-1", "--dir", str(ca))
    _cli("certs", "client", "reader", "--dir", str(ca))
    _cli("certs", "init", "--dir", str(other))
    _cli("certs", "client", "sensor-1", "--dir", str(other))
    assert (ca / "sensor-1-key.pem").stat().st_mode & 0o777 == 0o600
    return root


def _client_context(
    pki: Path, client: str | None, *, ca_dir: str = "ca", maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca" / tls.CA_CERT))
    if client is not None:
        context.load_cert_chain(
            str(pki / ca_dir / f"{client}.pem"), str(pki / ca_dir / f"{client}-key.pem")
        )
    if maximum is not None:
        context.maximum_version = maximum
    return context


def _get(port: int, context: ssl.SSLContext) -> bytes:
    """GET /health over a real TLS connection: the server's answer, b"" if the connection
    was refused. (A refused TLS 1.2 client sees its handshake fail; a TLS 1.3 client's
    handshake ends before the server has checked its certificate, so it sees the
    connection closed at its first read. The server's asyncio transport drops the alert.)"""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data
    except (ssl.SSLError, ConnectionError):
        return b""


def _https(
    pki: Path, mode: str, default_models: Path, **sections: dict[str, Any]
) -> config_mod.Config:
    http = {
        "tls_cert_file": str(pki / "ca" / "device.pem"),
        "tls_key_file": str(pki / "ca" / "device-key.pem"),
        "tls_client_ca": str(pki / "ca" / tls.CA_CERT),
        "tls_client_auth": mode,
    }
    return make_config(models={"dir": str(default_models)}, http=http, **sections)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_required_refuses_clients_without_a_certificate_of_the_ca(
    pki: Path, default_models: Path, version: ssl.TLSVersion
) -> None:
    async with serving(_https(pki, "required", default_models)) as server:
        port = server.port
        # The same request, the same client context but for its certificate: none, or one
        # of the same name from another CA, gets no answer; ours gets one.
        refused = await asyncio.to_thread(_get, port, _client_context(pki, None, maximum=version))
        assert refused == b""
        stranger = await asyncio.to_thread(
            _get, port, _client_context(pki, "sensor-1", ca_dir="other", maximum=version)
        )
        assert stranger == b""
        answer = await asyncio.to_thread(
            _get, port, _client_context(pki, "sensor-1", maximum=version)
        )
        assert answer.startswith(b"HTTP/1.1 200")
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"https://localhost:{port}/v2", ssl=_client_context(pki, "reader")
            ) as response,
        ):
            assert response.status == 200  # loopback, no keys configured: none needed


async def test_a_mapped_certificate_stands_in_for_an_api_key(
    pki: Path, default_models: Path
) -> None:
    config = _https(
        pki,
        "optional",
        default_models,
        security={
            "auth": "on",
            "keys": key_entries(),
            "client_certs": [{"name": "sensor-1", "scopes": ["infer", "read"]}],
        },
    )
    async with serving(config) as server, aiohttp.ClientSession() as http:
        url = f"https://localhost:{server.port}"
        no_cert = _client_context(pki, None)
        sensor, reader = _client_context(pki, "sensor-1"), _client_context(pki, "reader")

        async def status(
            context: ssl.SSLContext, method: str, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, str]:
            async with http.request(method, url + path, ssl=context, headers=headers) as resp:
                return resp.status, await resp.text()

        # optional: no certificate gets in, and needs a key as usual.
        assert (await status(no_cert, "GET", "/v2"))[0] == 401
        assert (await status(no_cert, "GET", "/v2", bearer("read")))[0] == 200
        # The mapped certificate needs no key, and has only its scopes.
        assert (await status(sensor, "GET", "/v2"))[0] == 200
        code, text = await status(sensor, "POST", "/v2/repository/index")
        assert code == 403 and "cert:sensor-1" in text
        assert (await status(sensor, "POST", "/v2/repository/index", bearer("admin")))[0] == 200
        # A key sent along is checked, and wins: a wrong one is refused.
        code, _ = await status(sensor, "GET", "/v2", {"Authorization": "Bearer apk_wrong"})
        assert code == 401
        # A valid certificate that is not mapped is no credential.
        code, text = await status(reader, "GET", "/v2")
        assert code == 401 and "'reader' is not in security.client_certs" in text
        # A certificate the CA did not sign fails the handshake even in optional mode.
        with pytest.raises(aiohttp.ClientError):
            await status(_client_context(pki, "sensor-1", ca_dir="other"), "GET", "/v2")


def test_mtls_configuration_is_checked(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http\.tls_client_ca.*needs tls_cert_file"):
        config_mod.load(env={}, overrides={"http": {"tls_client_ca": str(pki / "ca" / "ca.pem")}})
    with pytest.raises(ConfigError, match=r"http\.tls_client_auth"):
        config_mod.load(env={}, overrides={"http": {"tls_client_auth": "sometimes"}})
    lonely = make_config(security={"client_certs": [{"name": "sensor-1", "scopes": ["read"]}]})
    with pytest.raises(ConfigError, match=r"security\.client_certs.*http\.tls_client_ca"):
        daemon_policy(lonely, env={})
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"http\.tls_client_ca"):
        tls.server_context(
            pki / "ca" / "device.pem",
            pki / "ca" / "device-key.pem",
            "1.2",
            client_ca=tmp_path / "ca.pem",
        )
    env = config_mod.load(
        env={
            "APPLIANCE_HTTP__TLS_CERT_FILE": str(pki / "ca" / "device.pem"),
            "APPLIANCE_HTTP__TLS_CLIENT_CA": str(pki / "ca" / "ca.pem"),
            "APPLIANCE_HTTP__TLS_CLIENT_AUTH": "optional",
        }
    )
    assert env.http.tls_client_auth == "optional"
    listed = config_mod.load(
        env={"APPLIANCE_SECURITY__CLIENT_CERTS": "sensor-1:infer+read,ha:read"}
    )
    assert [(c.name, c.scopes) for c in listed.security.client_certs] == [
        ("sensor-1", ["infer", "read"]),
        ("ha", ["read"]),
    ]
    with pytest.raises(ConfigError, match=r"security\.client_certs\.0.*NAME:SCOPE"):
        config_mod.load(env={"APPLIANCE_SECURITY__CLIENT_CERTS": "sensor-1"})


def test_client_names_are_checked(pki: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "certs", "client", "../evil", "--dir", str(pki / "ca")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 1 and "not valid" in done.stderr
    assert not (pki / "evil.pem").exists()


def test_grpc_requires_the_same_client_certificates(
    pki: Path, default_models: Path, tmp_path: Path
) -> None:
    """gRPC in a daemon subprocess (see test_auth.py for why), with tritonclient's stubs."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    from tests.conftest import daemon
    from tests.hub.conftest import free_port
    from tests.transports.grpc.test_grpc import grpc_port

    ca = pki / "ca"
    (tmp_path / "appliance.toml").write_text(
        '[[security.client_certs]]\nname = "sensor-1"\nscopes = ["read"]\n'
    )
    port = free_port()
    env = {
        "APPLIANCE_SECURITY__AUTH": "on",
        "APPLIANCE_GRPC__ENABLED": "true",
        "APPLIANCE_GRPC__HOST": "127.0.0.1",
        "APPLIANCE_GRPC__PORT": str(port),
        "APPLIANCE_HTTP__TLS_CERT_FILE": str(ca / "device.pem"),
        "APPLIANCE_HTTP__TLS_KEY_FILE": str(ca / "device-key.pem"),
        "APPLIANCE_HTTP__TLS_CLIENT_CA": str(ca / tls.CA_CERT),
    }
    root = (ca / tls.CA_CERT).read_bytes()

    def channel(client: str | None) -> Any:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=(ca / f"{client}-key.pem").read_bytes() if client else None,
            certificate_chain=(ca / f"{client}.pem").read_bytes() if client else None,
        )
        return grpc.secure_channel(f"localhost:{port}", credentials)

    with daemon(
        "--config",
        str(tmp_path / "appliance.toml"),
        "--models-dir",
        str(default_models),
        env=env,
        ready=False,
    ) as proc:
        assert proc.url.startswith("https://")
        grpc_port(proc)  # gRPC starts once the models are loaded
        with channel(None) as bare:
            with pytest.raises(grpc.RpcError) as refused:
                rpc.GRPCInferenceServiceStub(bare).ServerLive(pb.ServerLiveRequest(), timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        with channel("sensor-1") as mapped:
            stub = rpc.GRPCInferenceServiceStub(mapped)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name == "appliance"
            with pytest.raises(grpc.RpcError) as scope:
                stub.ModelInfer(pb.ModelInferRequest(model_name="sensor-anomaly"), timeout=10)
            assert scope.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with channel("reader") as unmapped, pytest.raises(grpc.RpcError) as missing:
            rpc.GRPCInferenceServiceStub(unmapped).ServerMetadata(
                pb.ServerMetadataRequest(), timeout=10
            )
        assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
