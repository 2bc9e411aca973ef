"""Security fixtures: keys of every scope, and daemons that require them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.security.keys import hash_key
from appliance.server import Server
from tests.conftest import make_config, serving

# Fixed test keys (high-entropy, like `appliance keys create` makes), one per scope.
KEYS = {
    "read": "apk_test-read-0123456789abcdefghijklmnopqrstuv",
    "infer": "apk_test-infer-0123456789abcdefghijklmnopqrstu",
    "admin": "apk_test-admin-0123456789abcdefghijklmnopqrstu",
}


def key_entries() -> list[dict[str, Any]]:
    return [
        {"name": f"{scope}-key", "scopes": [scope], "hash": hash_key(value)}
        for scope, value in KEYS.items()
    ]


def bearer(scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[scope]}"}


def keys_toml() -> str:
    """The test keys as appliance.toml tables."""
    out = []
    for entry in key_entries():
        out.append(
            f'[[security.keys]]\nname = "{entry["name"]}"\n'
            f'scopes = ["{entry["scopes"][0]}"]\nhash = "{entry["hash"]}"\n'
        )
    return "\n".join(out)


def secured_config(default_models: Path, **sections: dict[str, Any]) -> Any:
    security = {"auth": "on", "keys": key_entries(), **sections.pop("security", {})}
    return make_config(models={"dir": str(default_models)}, security=security, **sections)


@pytest.fixture
async def secured(default_models: Path) -> AsyncIterator[Server]:
    """A daemon on loopback that requires keys (security.auth = on)."""
    async with serving(secured_config(default_models)) as server:
        yield server
