"""Rotation without a restart, on real processes with real SIGHUP and real TLS handshakes:
the daemon and the hub read their TLS certificate again (new connections get the new one,
a broken renewal keeps the old); the hub re-reads its API keys; and the hub asks for client
certificates when ``http.tls_client_ca`` is set, as the daemon does."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance.security import tls
from appliance.security.keys import hash_key, new_key
from tests.conftest import DaemonProcess, daemon
from tests.hub.conftest import enroll_direct, hub
from tests.security.test_key_reload import _hangup
from tests.security.test_mtls import _cli


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, two server certificates for localhost (old, new) and a client certificate."""
    root = tmp_path_factory.mktemp("rotation")
    _cli("certs", "init", "--dir", str(root))
    for name in ("old", "new"):
        _cli("certs", "device", "--dir", str(root), "--name", name, "localhost", "127.0.0.1")
    _cli("certs", "client", "reader", "--dir", str(root))
    return root


def _serial(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> int:
    """The serial number of the certificate a new TLS handshake with ``port`` sees."""
    from cryptography import x509

    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def _cert_serial(path: Path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def _port(proc: DaemonProcess) -> int:
    return int(proc.url.rsplit(":", 1)[1])


def _install(pki: Path, live: Path, name: str) -> None:
    """Put certificate ``name`` where the server reads its certificate (as a renewal does)."""
    live.mkdir(exist_ok=True)
    (live / "cert.pem").write_bytes((pki / f"{name}.pem").read_bytes())
    (live / "key.pem").write_bytes((pki / f"{name}-key.pem").read_bytes())


def _rotate_and_check(
    proc: DaemonProcess, pki: Path, live: Path, client: tuple[Path, Path] | None = None
) -> None:
    ca, port = pki / tls.CA_CERT, _port(proc)
    old, new = _cert_serial(pki / "old.pem"), _cert_serial(pki / "new.pem")
    assert _serial(port, ca, client) == old
    # A connection opened before the renewal keeps working on its certificate.
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as early:
        _install(pki, live, "new")
        line = _hangup(proc, "TLS certificate reloaded")
        assert str(live / "cert.pem") in line
        assert _serial(port, ca, client) == new  # new connections: the new certificate
        early.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert early.recv(12).startswith(b"HTTP/1.1 ")
    # A renewal caught half-written: the error says so and the certificate in use stays.
    (live / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    line = _hangup(proc, "TLS certificate NOT reloaded")
    assert "ERROR" in line and "tls_cert_file" in line
    assert _serial(port, ca, client) == new
    # A key that belongs to another certificate: refused the same way.
    (live / "cert.pem").write_bytes((pki / "old.pem").read_bytes())
    line = _hangup(proc, "TLS certificate NOT reloaded")
    assert _serial(port, ca, client) == new
    assert proc.proc.poll() is None


def test_daemon_reloads_its_certificate_on_sighup(
    pki: Path, tmp_path: Path, default_models: Path
) -> None:
    live = tmp_path / "live"
    _install(pki, live, "old")
    env = {
        "APPLIANCE_HTTP__TLS_CERT_FILE": str(live / "cert.pem"),
        "APPLIANCE_HTTP__TLS_KEY_FILE": str(live / "key.pem"),
    }
    with daemon("--models-dir", str(default_models), env=env, ready=False) as proc:
        assert proc.url.startswith("https://")
        _rotate_and_check(proc, pki, live)


def _hub_get(
    url: str,
    ca: Path,
    path: str,
    headers: dict[str, str] | None = None,
    client: tuple[Path, Path] | None = None,
) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    request = urllib.request.Request(
        url.replace("127.0.0.1", "localhost") + path, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_hub_reloads_its_certificate_and_keys_on_sighup(pki: Path, tmp_path: Path) -> None:
    live, keys = tmp_path / "live", tmp_path / "keys"
    _install(pki, live, "old")
    before, after = new_key(), new_key()
    keys.write_text(f"dashboard read {hash_key(before)}\n")
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    env = {
        "APPLIANCE_HUB_HTTP__TLS_CERT_FILE": str(live / "cert.pem"),
        "APPLIANCE_HUB_HTTP__TLS_KEY_FILE": str(live / "key.pem"),
        "APPLIANCE_HUB_SECURITY__AUTH": "on",
        "APPLIANCE_HUB_SECURITY__KEYS_FILE": str(keys),
    }
    ca = pki / tls.CA_CERT
    with hub(storage, env=env) as process:
        assert process.url.startswith("https://")
        assert _hub_get(process.url, ca, "/api/v1/devices", {"X-API-Key": before}) == 200
        assert _hub_get(process.url, ca, "/api/v1/devices", {"X-API-Key": after}) == 401
        keys.write_text(f"dashboard read {hash_key(after)}\n")
        line = _hangup(process, "API keys reloaded")
        assert "added: dashboard" not in line and "changed: dashboard" in line
        assert _hub_get(process.url, ca, "/api/v1/devices", {"X-API-Key": before}) == 401
        assert _hub_get(process.url, ca, "/api/v1/devices", {"X-API-Key": after}) == 200
        keys.write_text("not a key line\n")  # broken: the keys in use stay
        line = _hangup(process, "API keys NOT reloaded")
        assert str(keys) in line
        assert _hub_get(process.url, ca, "/api/v1/devices", {"X-API-Key": after}) == 200
        keys.write_text(f"dashboard read {hash_key(after)}\n")

        _rotate_and_check(process, pki, live)
        assert not [line for line in process.log if "Traceback" in line]


def test_hub_asks_for_client_certificates(pki: Path, tmp_path: Path) -> None:
    """http.tls_client_ca on the hub: a client without a certificate fails the handshake,
    one with a certificate of that CA gets in, and security.client_certs lets its CN stand
    in for an API key; device uploads still need their device token."""
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "box-1")
    ca = pki / tls.CA_CERT
    client = (pki / "reader.pem", pki / "reader-key.pem")
    env = _mtls_hub_env(pki)
    with hub(storage, env=env) as process:
        port = _port(process)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _hub_get(process.url, ca, "/health")  # no certificate: no handshake
        assert _serial(port, ca, client) == _cert_serial(pki / "old.pem")
        assert _hub_get(process.url, ca, "/api/v1/devices", client=client) == 200
        # An upload over mutual TLS still authenticates with the device token.
        body = json.dumps({"device": "box-1", "stream": "00112233", "records": []}).encode()
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(client[0]), str(client[1]))
        request = urllib.request.Request(
            process.url.replace("127.0.0.1", "localhost") + "/api/v1/ingest",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            assert response.status == 200


def test_a_device_uploads_to_a_hub_that_requires_client_certificates(
    pki: Path, tmp_path: Path
) -> None:
    """hub.tls_cert_file: the appliance shows its certificate to a hub whose
    tls_client_auth is required; without it, nothing arrives."""
    from tests.hub.test_sync import appliance_env, poll

    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "box-2")
    ca = pki / tls.CA_CERT
    client = (pki / "reader.pem", pki / "reader-key.pem")
    env = _mtls_hub_env(pki)
    (tmp_path / "models").mkdir()
    with hub(storage, env=env) as process:
        url = process.url.replace("127.0.0.1", "localhost")
        device_url = url + "/api/v1/devices/box-2"

        def seen() -> bool:
            context = ssl.create_default_context(cafile=str(ca))
            context.load_cert_chain(str(client[0]), str(client[1]))
            with urllib.request.urlopen(device_url, timeout=5, context=context) as response:
                return bool(json.loads(response.read()).get("last_seen"))

        device_env = appliance_env(
            url,
            token,
            "box-2",
            tmp_path / "outbox.db",
            APPLIANCE_HUB__TLS_CA_FILE=str(ca),
            APPLIANCE_HUB__TLS_CERT_FILE=str(pki / "new.pem"),
            APPLIANCE_HUB__TLS_KEY_FILE=str(pki / "new-key.pem"),
        )
        with daemon("--models-dir", str(tmp_path / "models"), env=device_env):
            poll("a heartbeat over mutual TLS", seen)


def _mtls_hub_env(pki: Path) -> dict[str, str]:
    """A hub on the old certificate that requires client certificates of our CA and lets
    the reader certificate's CN stand in for a read key."""
    return {
        "APPLIANCE_HUB_HTTP__TLS_CERT_FILE": str(pki / "old.pem"),
        "APPLIANCE_HUB_HTTP__TLS_KEY_FILE": str(pki / "old-key.pem"),
        "APPLIANCE_HUB_HTTP__TLS_CLIENT_CA": str(pki / tls.CA_CERT),
        "APPLIANCE_HUB_SECURITY__AUTH": "on",
        "APPLIANCE_HUB_SECURITY__CLIENT_CERTS": "reader:read",
    }
