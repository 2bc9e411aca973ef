"""TLS: server contexts for HTTPS (appliance and hub) and gRPC, and a small LAN PKI.

``appliance certs init`` makes a local certificate authority (an EC P-256 key and a
self-signed CA certificate, ten years); ``appliance certs device`` signs a certificate for
this box's names and addresses with it (two years, ``serverAuth`` and ``clientAuth``, so the
same certificate serves HTTPS and authenticates the box to a TLS MQTT broker);
``appliance certs client NAME`` signs a client certificate (``clientAuth`` only, common name
NAME) for mutual TLS (``http.tls_client_ca``). Clients trust the CA file once; devices can
be re-issued without touching them. Private keys are written with mode 0600 and never
overwritten without ``--force``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.x509 import Certificate, ExtendedKeyUsage, GeneralName

log = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def server_context(
    cert_file: Path,
    key_file: Path | None,
    min_version: str,
    *,
    key: str = "http",
    client_ca: Path | None = None,
    client_auth: str = "required",
) -> ssl.SSLContext:
    """A server-side context with the certificate loaded and old protocol versions off.

    With ``client_ca``, clients are asked for a certificate signed by it (and nothing
    else: the system's CAs are never trusted for clients); ``client_auth`` "required"
    fails the handshake of a client without one, "optional" lets it in. ``key`` names the
    configuration section in error messages.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME
    try:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{key}.tls_cert_file = {str(cert_file)!r}: cannot load the certificate and key: {exc}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{key}.tls_client_ca = {str(client_ca)!r}: cannot load the CA certificate: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    return context


def reload_certificate(
    context: ssl.SSLContext,
    cert_file: Path,
    key_file: Path | None,
    min_version: str,
    *,
    key: str = "http",
) -> None:
    """Read the certificate and key files again into the serving ``context`` (SIGHUP).

    New TLS connections get the new certificate; open ones keep theirs (OpenSSL copies the
    certificate into each connection when it starts). The files are tried in a fresh
    context first, so a renewal caught half-written or a key that does not match raises
    :class:`ConfigError` and leaves the certificate in use untouched. Blocking (reads
    files): call it off the loop.
    """
    server_context(cert_file, key_file, min_version, key=key)  # raises before any change
    try:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError) as exc:  # the files changed again in between
        raise ConfigError(
            f"{key}.tls_cert_file = {str(cert_file)!r}: cannot load the certificate and key: {exc}"
        ) from None


async def async_reload_certificate(
    context: ssl.SSLContext | None, cert_file: Path | None, key_file: Path | None, min_version: str
) -> None:
    """SIGHUP for a TLS-serving process: :func:`reload_certificate` off the loop, logged. A
    process serving plain HTTP (no context or no certificate) has nothing to do; files that
    do not load leave the certificate in use and log why."""
    if context is None or cert_file is None:
        return
    try:
        await asyncio.to_thread(reload_certificate, context, cert_file, key_file, min_version)
    except ConfigError as exc:
        log.error("TLS certificate NOT reloaded, the previous one stays in use: %s", exc)
        return
    log.info("TLS certificate reloaded from %s", cert_file)


def common_name(peercert: Mapping[str, Any] | None) -> str | None:
    """The subject CN of a certificate as :meth:`ssl.SSLSocket.getpeercert` gives it: only
    a certificate the handshake verified is there at all (an empty dict otherwise)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and isinstance(value, str):
                return value
    return None


# ------------------------------------------------------------------------ the LAN PKI


@dataclass(frozen=True)
class Issued:
    """Files written by :func:`init_ca` or :func:`issue`."""

    cert: Path
    key: Path


CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"


def init_ca(
    directory: Path, *, name: str = "Appliance local CA", days: int = 3650, force: bool = False
) -> Issued:
    """Create a CA key and self-signed certificate in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path, key_path)


def issue(
    ca_dir: Path,
    out_dir: Path,
    *,
    name: str,
    hosts: list[str],
    days: int = 730,
    force: bool = False,
) -> Issued:
    """A certificate for ``hosts`` (DNS names and IP addresses) signed by the CA in
    ``ca_dir``; written as ``<name>.pem`` and ``<name>-key.pem`` in ``out_dir``."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not hosts:
        raise ConfigError("a certificate needs at least one host name or address")
    alt: list[GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    usage = x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    return _sign(
        ca_dir, out_dir, stem=name, subject=hosts[0], alt=alt, usage=usage, days=days, force=force
    )


def issue_client(
    ca_dir: Path, out_dir: Path, *, name: str, days: int = 730, force: bool = False
) -> Issued:
    """A client certificate with common name ``name`` (``clientAuth`` only, so it cannot
    serve HTTPS), signed by the CA in ``ca_dir``; ``<name>.pem``, ``<name>-key.pem``."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not CLIENT_NAME.match(name):
        raise ConfigError(
            f"client name {name!r} is not valid: letters, digits, '_', '.', "
            "'@', '-', at most 64 (it becomes the certificate's CN and the "
            "file name)"
        )
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    return _sign(
        ca_dir, out_dir, stem=name, subject=name, alt=[], usage=usage, days=days, force=force
    )


def _sign(
    ca_dir: Path,
    out_dir: Path,
    *,
    stem: str,
    subject: str,
    alt: list[GeneralName],
    usage: ExtendedKeyUsage,
    days: int,
    force: bool,
) -> Issued:
    """A fresh key and a certificate for it signed by the CA in ``ca_dir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the CA in {ca_dir} ({CA_CERT}, {CA_KEY}): {exc}; "
            "create it with 'appliance certs init'"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY} is not an EC key made by 'appliance certs init'")
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}-key.pem"
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return Issued(cert_path, key_path)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exist(s); pass --force to replace")


def _write_key(path: Path, key: EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_cert(path: Path, cert: Certificate) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


__all__ = [
    "CA_CERT",
    "CA_KEY",
    "Issued",
    "common_name",
    "init_ca",
    "issue",
    "issue_client",
    "reload_certificate",
    "server_context",
]
