"""API keys: generated, hashed, stored, checked.

Keys are 256 random bits (``apk_`` + 43 URL-safe characters), so they are stored as a plain
SHA-256 digest: a slow password hash (scrypt, PBKDF2) protects *guessable* secrets, and
would cost tens of milliseconds per request on a Pi, i.e. hand every client a cheap way to
burn the CPU. Nobody can search a 2^256 key space, whatever the hash's speed. A presented
key is hashed once and compared with *every* stored digest through
:func:`hmac.compare_digest`, without stopping at a match, so neither the comparison nor the
loop tells an attacker how close a guess came or which key matched.

Keys come from the configuration (``[[security.keys]]``), a key file (``keys_file`` and the
systemd credential ``api-keys``), and, when the port serves the LAN with no key configured,
a generated admin key in the state directory (:func:`bootstrap_key`). Client certificates
named in ``[[security.client_certs]]`` are identities of the same kind, looked up by the
common name of a certificate the TLS handshake has already verified. All of it is read
again on SIGHUP (:meth:`appliance.security.access.AccessPolicy.reload_keys`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from appliance.config import AccessConfig, ClientCertEntry, Scope
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "apk_"
SCOPES: tuple[str, ...] = get_args(Scope)
CREDENTIAL = "api-keys"  # $CREDENTIALS_DIRECTORY/api-keys
BOOTSTRAP_FILE = "api-key"  # in the state directory
BOOTSTRAP_NAME = "generated"
CERT_PREFIX = "cert:"  # names of certificate identities, in logs and rate limits
MIN_KEY_LENGTH = 24  # for keys people bring themselves (`appliance keys hash`)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ApiKey:
    """A configured key: its name, what it may do, and the digest of its value."""

    name: str
    scopes: frozenset[str]
    digest: bytes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def new_key() -> str:
    """A fresh API key (256 bits of randomness)."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of ``key``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The keys (and client certificate identities) a daemon accepts; :meth:`verify` is
    constant-time over all keys."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys: list[ApiKey] = list(keys)
        self.certs: dict[str, ApiKey] = {}  # by the certificate's common name

    def __len__(self) -> int:
        return len(self.keys) + len(self.certs)

    def add(self, key: ApiKey) -> None:
        if any(k.name == key.name for k in self.keys):
            raise ConfigError(f"API key name {key.name!r} is configured twice")
        self.keys.append(key)

    def add_certificate(self, common_name: str, scopes: Iterable[str]) -> None:
        self.certs[common_name] = ApiKey(CERT_PREFIX + common_name, frozenset(scopes), b"")

    def for_certificate(self, common_name: str) -> ApiKey | None:
        """The identity of a verified client certificate with this CN, or None."""
        return self.certs.get(common_name)

    def summary(self) -> dict[str, tuple[frozenset[str], bytes]]:
        """Name → (scopes, digest) of every identity: what a reload compares."""
        return {k.name: (k.scopes, k.digest) for k in [*self.keys, *self.certs.values()]}

    def verify(self, presented: str) -> ApiKey | None:
        """The key whose value is ``presented``, or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKey | None = None
        for key in self.keys:  # no early exit: every digest is compared
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def _entry(name: str, scopes: Sequence[str], stored: str, where: str) -> ApiKey:
    if not _NAME.match(name):
        raise ConfigError(
            f"{where}: key name {name!r} is not valid (letters, digits, '_', '.', '-', at most 64)"
        )
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ConfigError(
            f"{where}: key {name!r} scopes {','.join(scopes)!r}: allowed "
            f"scopes are {', '.join(SCOPES)}"
        )
    if not _DIGEST.match(stored):
        raise ConfigError(
            f"{where}: key {name!r}: expected 'sha256:<64 hex digits>' (from "
            "`appliance keys create`), not the key itself"
        )
    return ApiKey(name, frozenset(scopes), bytes.fromhex(stored.removeprefix("sha256:")))


def parse_key_file(text: str, where: str) -> list[ApiKey]:
    """``NAME SCOPE[,SCOPE] sha256:HEX`` per line; blank lines and ``#`` comments ignored."""
    keys: list[ApiKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"{where} line {number}: expected 'NAME SCOPE[,SCOPE] sha256:HEX'")
        name, scopes, stored = parts
        keys.append(_entry(name, scopes.split(","), stored, f"{where} line {number}"))
    return keys


def load_store(
    config: AccessConfig, env: Mapping[str, str], certs: Iterable[ClientCertEntry] = ()
) -> KeyStore:
    """Every configured key: the config's, the key file's and the systemd credential's;
    and the client certificate identities ``certs``. Blocking (reads files); raises
    :class:`ConfigError` naming the file and line of a malformed entry."""
    store = KeyStore()
    for entry in config.keys:
        store.add(_entry(entry.name, entry.scopes, entry.hash, "security.keys"))
    for cert in certs:
        store.add_certificate(cert.name, cert.scopes)
    files: list[tuple[Path, str]] = []
    if config.keys_file is not None:
        # Not "keys_file = PATH": log redaction hides values of names like that.
        files.append((config.keys_file, f"security.keys_file {str(config.keys_file)!r}"))
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL).is_file():
        files.append((Path(creds) / CREDENTIAL, f"credential {CREDENTIAL!r}"))
    for path, where in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
        for key in parse_key_file(text, where):
            store.add(key)
    return store


def bootstrap_key(path: Path) -> tuple[ApiKey, Path]:
    """The generated admin key of a box serving the LAN with no key configured.

    Made once, kept in ``path`` (``<state>/api-key``, mode 0600: the operator reads it
    there, as k3s keeps its node token), so restarts keep it and clients keep working.
    """
    state_dir = path.parent
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        value = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the generated API key {path}: {exc}") from None
    if not value:
        value = new_key()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(value + "\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot write a generated API key to {path}: "
                f"{exc.strerror or exc}; configure [[security.keys]]"
            ) from None
    digest = hashlib.sha256(value.encode()).digest()
    return ApiKey(BOOTSTRAP_NAME, frozenset({"admin"}), digest), path


__all__ = [
    "CERT_PREFIX",
    "PREFIX",
    "SCOPES",
    "ApiKey",
    "KeyStore",
    "bootstrap_key",
    "hash_key",
    "load_store",
    "new_key",
    "parse_key_file",
]
