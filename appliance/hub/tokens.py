"""Device tokens: random, shown once at enrolment, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "aph_"


def new_token() -> str:
    """A fresh device token (256 bits of randomness)."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # A fast hash is right here: tokens are random, not guessable passwords.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
