"""Encryption at rest for stored request data: AES-256-GCM with a configured data key.

A record is stored as ``enc1:`` + base64(nonce ‖ ciphertext ‖ tag): a fresh 96-bit random
nonce per record (NIST SP 800-38D's limit of 2^32 random nonces per key is far beyond what
a box writes), and associated data binding the ciphertext to where it belongs (the outbox
stream and record kind), so a record cannot be moved between streams or kinds unnoticed.
The key is 32 bytes, given as 64 hex digits in a file (``security.data_key_file`` or the
systemd credential ``data-key``); ``appliance keys data-key`` prints a fresh one.

Where the *name* a value is stored under would say something about it (the result cache's
keys hash the request's inputs: anyone who can read the store could confirm a guessed
input), :meth:`FieldCipher.pseudonym` gives a keyed hash instead (HMAC-SHA256 under a key
derived from the data key, so the two uses never share a key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from appliance.errors import ConfigError

MARK = "enc1:"
CREDENTIAL = "data-key"
_NONCE = 12


class DecryptionError(ValueError):
    """A stored value cannot be decrypted: another key, or tampered with."""


class FieldCipher:
    """Encrypts and decrypts stored text fields with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != 32:
            raise ConfigError(f"a data key is 32 bytes (64 hex digits), not {len(key)}")
        self._aead = AESGCM(key)
        self._names = hmac.new(key, b"appliance pseudonyms v1", hashlib.sha256).digest()

    def pseudonym(self, name: str) -> str:
        """A keyed hash of ``name`` (hex): stable under one key, meaningless without it."""
        return hmac.new(self._names, name.encode("utf-8"), hashlib.sha256).hexdigest()

    def seal(self, data: bytes, context: str) -> bytes:
        """``data`` encrypted: nonce ‖ ciphertext ‖ tag (for binary stores, e.g. a cache)."""
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, data, context.encode("utf-8"))

    def open(self, sealed: bytes, context: str) -> bytes:
        """What :meth:`seal` sealed; :class:`DecryptionError` for another key or tampering."""
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], context.encode("utf-8"))
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError(
                "cannot decrypt a stored value: another data key, or it was altered"
            ) from exc

    def encrypt(self, text: str, context: str) -> str:
        return MARK + base64.b64encode(self.seal(text.encode("utf-8"), context)).decode("ascii")

    def decrypt(self, stored: str, context: str) -> str:
        try:
            raw = base64.b64decode(stored[len(MARK) :], validate=True)
        except ValueError as exc:
            raise DecryptionError("a stored value is not valid base64") from exc
        return self.open(raw, context).decode("utf-8")


def is_encrypted(stored: str) -> bool:
    return stored.startswith(MARK)


def new_data_key() -> str:
    """A fresh data key as 64 hex digits."""
    return secrets.token_hex(32)


def load_cipher(key_file: Path | None, env: Mapping[str, str]) -> FieldCipher | None:
    """The configured cipher: ``key_file``, else the ``data-key`` credential, else None."""
    path, where = key_file, f"security.data_key_file = {str(key_file)!r}"
    if path is None:
        creds = env.get("CREDENTIALS_DIRECTORY")
        if not creds or not (Path(creds) / CREDENTIAL).is_file():
            return None
        path, where = Path(creds) / CREDENTIAL, f"credential {CREDENTIAL!r}"
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read a data key (64 hex digits): {exc}") from None
    try:
        return FieldCipher(key)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


__all__ = ["DecryptionError", "FieldCipher", "is_encrypted", "load_cipher", "new_data_key"]
