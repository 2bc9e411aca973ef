"""The hub's HTTP API on a real hub process, backed by SQLite and by PostgreSQL."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from tests.hub.conftest import enroll, enroll_direct, fresh_database, get_json, hub, hub_cli

pytestmark = pytest.mark.timeout(60)

STREAM = "0123456789abcdef" * 2


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DaemonProcess, str]]:
    """One hub per backend for the module; tests use device ids of their own."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('hub') / 'hub.db'}"
        with hub(url) as proc:
            yield proc, url
        return
    with fresh_database(request.getfixturevalue("postgres_server")) as url, hub(url) as proc:
        yield proc, url


def call(
    url: str, body: Any = None, token: str | None = None, method: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def batch(device: str, *seqs: int, stream: str = STREAM) -> dict[str, Any]:
    return {
        "device": device,
        "name": device.upper(),
        "version": "1.2.3",
        "stream": stream,
        "dropped": {"size": 0, "age": 0},
        "records": [
            {
                "seq": s,
                "kind": "heartbeat",
                "time": 1000.0 + s,
                "body": {
                    "system": {"cpu_percent": 10.0 + s, "memory_percent": 50.0},
                    "requests_per_s": 1.0,
                    "models": {},
                },
            }
            for s in seqs
        ],
    }


def test_ingest_authentication(running: tuple[DaemonProcess, str]) -> None:
    proc, storage = running
    ingest = proc.url + "/api/v1/ingest"
    token_a = enroll(storage, "auth-a")  # through the real CLI
    token_b = enroll_direct(storage, "auth-b")

    code, body, headers = call(ingest, batch("auth-a", 1))
    assert code == 401 and "Bearer" in headers["WWW-Authenticate"]
    assert "device token is required" in body["error"]
    code, body, _ = call(ingest, batch("auth-a", 1), token="aph_not-a-real-token")
    assert (code, body["error"]) == (401, "unknown or revoked device token")
    code, body, _ = call(ingest, batch("auth-a", 1), token=token_b)
    assert code == 403 and "'auth-b', not 'auth-a'" in body["error"]

    assert call(ingest, batch("auth-a", 1), token=token_a)[0] == 200
    result = hub_cli(storage, "revoke", "auth-a")  # while the hub runs
    assert result.returncode == 0, result.stderr
    code, body, _ = call(ingest, batch("auth-a", 2), token=token_a)
    assert (code, body["error"]) == (401, "unknown or revoked device token")
    # Re-enrolment issues a new token; the revoked one stays dead.
    token_a2 = enroll_direct(storage, "auth-a")
    assert call(ingest, batch("auth-a", 2), token=token_a)[0] == 401
    assert call(ingest, batch("auth-a", 2), token=token_a2)[0] == 200


def test_ingest_is_idempotent_over_http(running: tuple[DaemonProcess, str]) -> None:
    proc, storage = running
    token = enroll_direct(storage, "idem-a")
    ingest = proc.url + "/api/v1/ingest"
    code, body, _ = call(ingest, batch("idem-a", 1, 2, 3), token=token)
    assert (code, body) == (200, {"acked": 3, "accepted": 3, "duplicates": 0})
    code, body, _ = call(ingest, batch("idem-a", 2, 3, 4), token=token)
    assert (code, body) == (200, {"acked": 4, "accepted": 1, "duplicates": 2})
    code, body, _ = call(ingest, batch("idem-a"), token=token)  # an empty batch is fine
    assert (code, body) == (200, {"acked": 4, "accepted": 0, "duplicates": 0})
    records = get_json(proc.url + "/api/v1/devices/idem-a/records")["records"]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    points = get_json(proc.url + "/api/v1/devices/idem-a/heartbeats?since=0")["points"]
    assert [p["cpu"] for p in points] == [11.0, 12.0, 13.0, 14.0]
    devices = {d["id"]: d for d in get_json(proc.url + "/api/v1/devices")["devices"]}
    assert (devices["idem-a"]["status"], devices["idem-a"]["last_seq"]) == ("online", 4)
    metrics = urllib.request.urlopen(proc.url + "/metrics").read().decode()
    duplicates = next(
        line
        for line in metrics.splitlines()
        if line.startswith('appliance_hub_ingest_records_total{result="duplicate"}')
    )
    assert float(duplicates.split()[-1]) >= 2


BAD_BATCHES: list[tuple[Any, str]] = [
    (lambda b: b.pop("stream"), "stream: Field required"),
    (lambda b: b.update(stream="NOT HEX"), "stream: String should match"),
    (lambda b: b["records"][0].update(seq=0), "records.0.seq: Input should be greater"),
    (lambda b: b["records"][0].update(kind="Bad Kind"), "records.0.kind"),
    (lambda b: b["records"][0].pop("body"), "records.0.body: Field required"),
    (lambda b: b.update(records="x"), "records: Input should be a valid list"),
]


def test_bad_batches_get_400_naming_the_field(running: tuple[DaemonProcess, str]) -> None:
    proc, storage = running
    token = enroll_direct(storage, "bad-a")
    for mutate, expected in BAD_BATCHES:
        body = batch("bad-a", 1)
        mutate(body)
        code, answer, _ = call(proc.url + "/api/v1/ingest", body, token=token)
        assert code == 400 and expected in answer["error"], answer
    code, answer, _ = call(proc.url + "/api/v1/ingest", b"{not json", token=token)
    assert code == 400 and "not JSON" in answer["error"]


def test_fleet_api_errors_and_ops_routes(running: tuple[DaemonProcess, str]) -> None:
    proc, storage = running
    assert call(proc.url + "/api/v1/devices/nobody")[0] == 404
    assert call(proc.url + "/api/v1/devices/nobody/heartbeats")[0] == 404
    code, body, _ = call(proc.url + "/api/v1/alerts?state=maybe")
    assert code == 400 and "state" in body["error"]
    enroll_direct(storage, "ops-a")
    code, body, _ = call(proc.url + "/api/v1/devices/ops-a/heartbeats?limit=zero")
    assert code == 400 and "limit" in body["error"]
    assert call(proc.url + "/nowhere")[0] == 404
    assert call(proc.url + "/api/v1/ingest")[0] == 405
    code, body, _ = call(proc.url + "/health")
    assert code == 200 and body["status"] == "ok"
    assert body["storage"] == ("sqlite" if storage.startswith("sqlite") else "postgresql")
    metrics = urllib.request.urlopen(proc.url + "/metrics").read().decode()
    assert 'appliance_hub_http_requests_total{route="/health",status="200"}' in metrics
    # The dashboard is one self-contained page: nothing is fetched from elsewhere.
    with urllib.request.urlopen(proc.url + "/") as resp:
        page = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
    assert "<title>Appliance fleet</title>" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


def test_cli_enroll_list_revoke_and_config(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    enroll(storage, "dev-a", "Shed")
    listed = hub_cli(storage, "devices", "--json")
    assert listed.returncode == 0
    (device,) = json.loads(listed.stdout)
    assert (device["id"], device["name"], device["status"]) == ("dev-a", "Shed", "never seen")
    assert "token" not in listed.stdout.lower()
    assert hub_cli(storage, "revoke", "nobody").returncode == 1
    bad = hub_cli(storage, "enroll", "Not Valid")
    assert bad.returncode == 2 and "not valid" in bad.stderr
    assert hub_cli(storage, "revoke", "dev-a").returncode == 0
    assert "revoked" in hub_cli(storage, "devices").stdout
    wrong = hub_cli("mysql://nope", "devices")
    assert wrong.returncode == 2 and "storage.url" in wrong.stderr
    shown = hub_cli(storage, "config")
    assert shown.returncode == 0 and json.loads(shown.stdout)["storage"]["url"] == storage
