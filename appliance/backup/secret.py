"""The secret behind a backup: a passphrase or a key file, and the keys derived from it.

A passphrase goes through scrypt (n=2^15, r=8, p=1: about 32 MiB and a fraction of a
second on a Pi), a key file's bytes through HKDF-SHA256; both with a random salt kept in
the archive's header. Three keys are expanded from the result with HKDF: one encrypts
(AES-256-GCM), one authenticates the manifest (HMAC-SHA256), one makes the key check value
that tells a wrong secret apart from an altered archive. All ``cryptography`` primitives.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_MAX_SCRYPT_N = 2**20  # a crafted header must not make us allocate gigabytes
MIN_PASSPHRASE = 8
MIN_KEY_FILE_BYTES = 16


class BackupError(Exception):
    """A backup or restore cannot go on; the message says why, for the operator."""


@dataclass(frozen=True)
class Secret:
    """A passphrase, or the bytes of a key file (exactly one)."""

    passphrase: str | None = None
    key_file: bytes | None = None

    @classmethod
    def from_key_file(cls, path: Path) -> Secret:
        try:
            data = path.read_bytes().strip()
        except OSError as exc:
            raise BackupError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
        if len(data) < MIN_KEY_FILE_BYTES:
            raise BackupError(
                f"the key file {path} holds {len(data)} bytes; a key file needs at least "
                f"{MIN_KEY_FILE_BYTES} random bytes (`appliance keys data-key` prints one)"
            )
        return cls(key_file=data)

    @classmethod
    def from_passphrase(cls, text: str) -> Secret:
        text = text.rstrip("\r\n")
        if len(text) < MIN_PASSPHRASE:
            raise BackupError(f"a backup passphrase needs at least {MIN_PASSPHRASE} characters")
        return cls(passphrase=text)


@dataclass(frozen=True)
class Keys:
    encrypt: bytes
    mac: bytes
    check: bytes


def kdf_params(secret: Secret) -> dict[str, Any]:
    salt = secrets.token_hex(16)
    if secret.passphrase is not None:
        return {"name": "scrypt", "salt": salt, **_SCRYPT}
    return {"name": "hkdf-sha256", "salt": salt}


def derive(secret: Secret, kdf: Mapping[str, Any]) -> Keys:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    try:
        salt = bytes.fromhex(str(kdf["salt"]))
        name = kdf["name"]
    except (KeyError, ValueError):
        raise BackupError("the archive's header has no valid key derivation parameters") from None
    if name == "scrypt":
        if secret.passphrase is None:
            raise BackupError("this archive was made with a passphrase, not a key file")
        n, r, p = (kdf.get(k) for k in ("n", "r", "p"))
        if not (
            isinstance(n, int)
            and isinstance(r, int)
            and isinstance(p, int)
            and 2 <= n <= _MAX_SCRYPT_N
            and 1 <= r <= 32
            and 1 <= p <= 16
        ):
            raise BackupError("the archive's scrypt parameters are out of range")
        master = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(
            secret.passphrase.encode("utf-8")
        )
    elif name == "hkdf-sha256":
        if secret.key_file is None:
            raise BackupError("this archive was made with a key file, not a passphrase")
        master = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=salt, info=b"appliance backup key file"
        ).derive(secret.key_file)
    else:
        raise BackupError(f"the archive uses an unknown key derivation {name!r}")

    def sub(label: bytes) -> bytes:
        return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=label).derive(master)

    return Keys(sub(b"appliance backup encrypt"), sub(b"appliance backup mac"), sub(b"check"))


def check_value(keys: Keys) -> str:
    return hmac.new(keys.check, b"appliance backup key check", hashlib.sha256).hexdigest()


__all__ = [
    "MIN_KEY_FILE_BYTES",
    "MIN_PASSPHRASE",
    "BackupError",
    "Keys",
    "Secret",
    "check_value",
    "derive",
    "kdf_params",
]
