"""The hub's Ed25519 signing key, and the signed statements devices act on.

The key lives in the hub's state directory (``hub-signing-key``, PEM, mode 0600) and is
made on first use. Its public half is printed by ``appliance hub enroll`` and
``appliance hub public-key``; a device takes it as ``hub.public_key`` and acts only on
statements the key signed that name the device itself. A statement is canonical JSON
(sorted keys, no spaces); the signature covers exactly those bytes.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "hub-signing-key"
PREFIX = "ed25519:"


class SignatureError(ValueError):
    """A statement that is unsigned, tampered with, or signed by another key."""


def canonical(statement: dict[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``; a new one is written there (0600, atomically) when missing."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


def public_text(key: Ed25519PrivateKey) -> str:
    """``ed25519:<base64 of the raw 32 bytes>``: what ``hub.public_key`` takes."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public(text: str) -> Ed25519PublicKey:
    if not text.startswith(PREFIX):
        raise ValueError(f"expected {PREFIX}<base64>, got {text[:20]!r}")
    try:
        raw = base64.b64decode(text.removeprefix(PREFIX), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from None


def sign(key: Ed25519PrivateKey, statement: dict[str, Any]) -> dict[str, Any]:
    """The statement with its signature, as devices receive it."""
    signature = key.sign(canonical(statement))
    return {"statement": statement, "signature": base64.b64encode(signature).decode("ascii")}


def verify(public: Ed25519PublicKey, signed: Any) -> dict[str, Any]:
    """The statement of ``signed`` if ``public`` signed it; else :class:`SignatureError`."""
    if not isinstance(signed, dict) or not isinstance(signed.get("statement"), dict):
        raise SignatureError("no statement")
    signature = signed.get("signature")
    if not isinstance(signature, str) or not signature:
        raise SignatureError("the statement is not signed")
    try:
        public.verify(base64.b64decode(signature, validate=True), canonical(signed["statement"]))
    except (InvalidSignature, ValueError):
        raise SignatureError("the signature does not match the hub's key") from None
    statement: dict[str, Any] = signed["statement"]
    return statement
