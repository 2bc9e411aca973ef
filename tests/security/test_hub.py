"""The hub applies the same checks: keys for the fleet API, Host guard, device tokens for
ingest untouched."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance.security.keys import hash_key
from tests.hub.conftest import enroll_direct, hub
from tests.security.conftest import KEYS


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_hub_fleet_api_needs_a_key(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    enroll_direct(storage, "box-1")
    (tmp_path / "keys").write_text(
        f"dashboard read {hash_key(KEYS['read'])}\nci infer {hash_key(KEYS['infer'])}\n"
    )
    env = {
        "APPLIANCE_HUB_SECURITY__AUTH": "on",
        "APPLIANCE_HUB_SECURITY__KEYS_FILE": str(tmp_path / "keys"),
    }
    with hub(storage, env=env) as process:
        url = process.url
        assert _get(url + "/health")[0] == 200  # public
        status, body = _get(url + "/api/v1/devices")
        assert status == 401 and "API key" in str(body["error"])
        assert _get(url + "/api/v1/devices", {"Authorization": "Bearer nope"})[0] == 401
        assert _get(url + "/api/v1/devices", {"X-API-Key": KEYS["infer"]})[0] == 403
        status, body = _get(url + "/api/v1/devices", {"X-API-Key": KEYS["read"]})
        assert status == 200 and body["devices"]
        assert (
            _get(url + "/api/v1/devices", {"X-API-Key": KEYS["read"], "Host": "evil.example"})[0]
            == 403
        )
        # Ingest keeps its own device tokens: an API key is no device token.
        request = urllib.request.Request(
            url + "/api/v1/ingest",
            data=b"{}",
            method="POST",
            headers={"Authorization": f"Bearer {KEYS['read']}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
        assert "device token" in json.loads(refused.value.read())["error"]
