"""Real appliance and hub processes: outages, offline detection, a full outbox.

Heartbeats come every 100 ms; every wait is bounded and waits for a state (records
queued, records arrived), never for a length of time.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, daemon
from tests.hub.conftest import enroll, enroll_direct, free_port, get_json, hub, start_hub

pytestmark = pytest.mark.timeout(120)


def appliance_env(
    hub_url: str, token: str, device: str, outbox: Path, **extra: str
) -> dict[str, str]:
    env = {
        "APPLIANCE_DEVICE__ID": device,
        "APPLIANCE_HUB__URL": hub_url,
        "APPLIANCE_HUB__TOKEN": token,
        "APPLIANCE_HUB__OUTBOX_PATH": str(outbox),
        "APPLIANCE_HUB__HEARTBEAT_INTERVAL": "0.1",
        "APPLIANCE_HUB__BACKOFF_INITIAL": "0.1",
        "APPLIANCE_HUB__BACKOFF_MAX": "0.5",
        "APPLIANCE_HEALTH__INTERVAL": "0.1",
    }
    env.update(extra)
    return env


def poll(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, urllib.error.URLError, KeyError) as exc:
            last = exc  # not up yet, or the hub-sync unit not started yet
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not reached in time (last: {last!r})")


def hub_sync_status(proc: DaemonProcess) -> dict[str, Any]:
    try:
        body = get_json(proc.url + "/health")
    except urllib.error.HTTPError as exc:  # 503 while loading still has the document
        import json

        body = json.loads(exc.read())
    status = body["units"]["hub"]
    assert isinstance(status, dict)
    return status


def hub_records(hub_url: str, device: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = get_json(f"{hub_url}/api/v1/devices/{device}/records?after={after}&limit=500")
        out += page["records"]
        if not page["records"]:
            return out
        after = page["next"]


def test_hub_outage_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll(storage, "dev-a", "Greenhouse A")
    port = free_port()
    hub_url = f"http://127.0.0.1:{port}"
    outbox = tmp_path / "outbox.db"
    (tmp_path / "models").mkdir()
    first = start_hub(storage, port=port)
    first.wait_listening(30)
    try:
        with daemon(
            "--models-dir",
            str(tmp_path / "models"),
            env=appliance_env(hub_url, token, "dev-a", outbox),
        ) as appliance:
            poll(
                "first records at the hub",
                lambda: get_json(f"{hub_url}/api/v1/devices/dev-a")["last_seq"] >= 5,
            )
            outage_started = time.time()
            assert first.stop() == 0  # SIGTERM: a graceful stop
            # The appliance keeps producing; everything waits in its outbox.
            poll(
                "records queued during the outage",
                lambda: (s := hub_sync_status(appliance))["failures"] >= 2 and s["queued"] >= 20,
            )
            outage_ended = time.time()
            queued_seq = hub_sync_status(appliance)["last_seq"]
            second = start_hub(storage, port=port)
            try:
                second.wait_listening(30)
                poll(
                    "the backlog delivered",
                    lambda: get_json(f"{hub_url}/api/v1/devices/dev-a")["last_seq"] >= queued_seq,
                )
                # The hub may store a batch before the appliance has read the answer.
                poll(
                    "the appliance sees the hub again",
                    lambda: (
                        (s := hub_sync_status(appliance))["failures"] == 0
                        and s["last_error"] is None
                    ),
                )
            except BaseException:
                second.stop()
                raise
        # The appliance stopped gracefully: what it could not hand over is still queued.
        with sqlite3.connect(outbox) as conn:
            left = [r[0] for r in conn.execute("SELECT seq FROM records ORDER BY seq")]
            (last,) = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'records'"
            ).fetchone()
        records = hub_records(hub_url, "dev-a")
        seqs = [r["seq"] for r in records]
        assert seqs == list(range(1, len(seqs) + 1)), "in order, no gaps, no duplicates"
        assert seqs + left == list(range(1, last + 1)), "every record arrived or is queued"
        assert len({r["stream"] for r in records}) == 1
        assert records[0]["kind"] == "event" and records[0]["body"]["type"] == "started"
        beats = [r for r in records if r["kind"] == "heartbeat"]
        times = [r["time"] for r in beats]
        assert times == sorted(times)
        during = [t for t in times if outage_started < t < outage_ended]
        assert len(during) >= 15, "heartbeats made while the hub was away arrived"
        # Those records were received after the hub came back, in one catch-up.
        assert all(r["received"] >= outage_ended - 1 for r in beats if r["time"] in during)
        device = get_json(f"{hub_url}/api/v1/devices/dev-a")
        assert device["last_seq"] == seqs[-1] and device["status"] == "online"
        assert device["name"] == "Greenhouse A"
        # The restarted hub's own count matches what it stored.
        after_restart = len([r for r in records if r["received"] > outage_started])
        metrics = urllib.request.urlopen(hub_url + "/metrics").read().decode()
        assert (
            f'appliance_hub_ingest_records_total{{result="accepted"}} {after_restart}.0' in metrics
        )
        assert second.stop() == 0
    finally:
        first.stop()


def test_a_silent_device_goes_offline_and_comes_back(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "dev-b")
    (tmp_path / "models").mkdir()
    hub_env = {
        "APPLIANCE_HUB_FLEET__OFFLINE_AFTER": "3.0",  # well above a loaded box's heartbeat gaps
        "APPLIANCE_HUB_FLEET__CHECK_INTERVAL": "0.1",
    }
    with hub(storage, env=hub_env) as h:
        env = appliance_env(h.url, token, "dev-b", tmp_path / "outbox.db")
        device_url = f"{h.url}/api/v1/devices/dev-b"
        with daemon("--models-dir", str(tmp_path / "models"), env=env) as appliance:
            poll("online", lambda: get_json(device_url)["status"] == "online")
            import signal

            appliance.stop(signal.SIGKILL)  # a power cut: no goodbye
        poll("offline", lambda: get_json(device_url)["status"] == "offline")
        (alert,) = get_json(f"{h.url}/api/v1/alerts?state=firing&device=dev-b")["alerts"]
        assert alert["rule"] == "device_offline" and alert["severity"] == "critical"
        with daemon("--models-dir", str(tmp_path / "models"), env=env):
            poll("back online", lambda: get_json(device_url)["status"] == "online")
        assert get_json(f"{h.url}/api/v1/alerts?state=firing&device=dev-b")["alerts"] == []
        (resolved,) = get_json(f"{h.url}/api/v1/alerts?state=resolved&device=dev-b")["alerts"]
        assert resolved["rule"] == "device_offline" and resolved["resolved_at"]
        metrics = urllib.request.urlopen(h.url + "/metrics").read().decode()
        assert "appliance_hub_devices_marked_offline_total 1.0" in metrics


def test_a_full_outbox_drops_oldest_heartbeats_and_counts_them(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "dev-c")
    port = free_port()
    (tmp_path / "models").mkdir()
    env = appliance_env(
        f"http://127.0.0.1:{port}",
        token,
        "dev-c",
        tmp_path / "outbox.db",
        APPLIANCE_HUB__OUTBOX_MAX_RECORDS="10",
        APPLIANCE_HUB__HEARTBEAT_INTERVAL="0.05",
        APPLIANCE_HEALTH__INTERVAL="0.05",
    )
    with daemon("--models-dir", str(tmp_path / "models"), env=env) as appliance:
        status = poll(
            "the outbox past its bound",
            lambda: (s := hub_sync_status(appliance))["dropped"]["size"] >= 10 and s,
        )
        assert status["queued"] == 10  # the bound holds
        # Read the status before the metrics: heartbeats keep coming, so the counter
        # scraped second can only have grown.
        dropped = hub_sync_status(appliance)["dropped"]["size"]
        metrics = urllib.request.urlopen(appliance.url + "/metrics").read().decode()
        line = next(
            x
            for x in metrics.splitlines()
            if x.startswith('appliance_outbox_dropped_total{reason="size"}')
        )
        assert float(line.split()[-1]) >= dropped >= 10
        assert "appliance_outbox_records 10.0" in metrics
        with hub(storage, port=port):
            poll(
                "the rest delivered",
                lambda: (
                    hub_sync_status(appliance)["queued"] <= 2
                    and hub_sync_status(appliance)["failures"] == 0
                ),
            )
            records = hub_records(f"http://127.0.0.1:{port}", "dev-c")
            device = get_json(f"http://127.0.0.1:{port}/api/v1/devices/dev-c")
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # The start-up event outlived the heartbeats queued after it: heartbeats go first.
    assert records[0]["seq"] == 1 and records[0]["kind"] == "event"
    assert seqs[1] > 2, "the oldest heartbeats were dropped"
    assert device["dropped"]["size"] >= 10  # the device's drop counter reaches the hub


def test_a_corrupt_outbox_is_moved_aside_and_reported_to_the_hub(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "dev-d")
    (tmp_path / "models").mkdir()
    outbox = tmp_path / "state" / "outbox.db"
    outbox.parent.mkdir()
    outbox.write_bytes(b"\x00garbage, as after a bad sector" * 300)
    with hub(storage) as h:
        env = appliance_env(h.url, token, "dev-d", outbox)
        with daemon("--models-dir", str(tmp_path / "models"), env=env) as appliance:
            records = poll(
                "the report at the hub",
                lambda: [
                    r
                    for r in hub_records(h.url, "dev-d")
                    if r["kind"] == "event" and r["body"].get("type") == "outbox_corrupt"
                ],
            )
        moved = Path(records[0]["body"]["moved_to"])
        assert moved.parent == outbox.parent and moved.name.startswith("outbox.db.corrupt-")
        assert moved.read_bytes().startswith(b"\x00garbage")  # kept for inspection
        assert any("is corrupt" in line and "moved it to" in line for line in appliance.log)


def test_tls_between_appliance_and_hub(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    cert, key = tmp_path / "hub.pem", tmp_path / "hub.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "dev-t")
    (tmp_path / "models").mkdir()
    hub_env = {
        "APPLIANCE_HUB_HTTP__TLS_CERT_FILE": str(cert),
        "APPLIANCE_HUB_HTTP__TLS_KEY_FILE": str(key),
    }
    with hub(storage, env=hub_env) as h:
        https = h.url
        assert https.startswith("https://127.0.0.1:")
        env = appliance_env(
            https, token, "dev-t", tmp_path / "outbox.db", APPLIANCE_HUB__TLS_CA_FILE=str(cert)
        )
        untrusting = appliance_env(https, token, "dev-t", tmp_path / "other.db")
        import ssl

        context = ssl.create_default_context(cafile=str(cert))

        def hub_last_seq() -> int:
            with urllib.request.urlopen(f"{https}/api/v1/devices/dev-t", context=context) as resp:
                import json

                return int(json.loads(resp.read())["last_seq"])

        with daemon("--models-dir", str(tmp_path / "models"), env=untrusting) as appliance:
            status = poll(
                "a refused certificate",
                lambda: (s := hub_sync_status(appliance))["failures"] >= 1 and s,
            )
            assert "certificate" in status["last_error"].lower()
        assert hub_last_seq() == 0
        with daemon("--models-dir", str(tmp_path / "models"), env=env):
            poll("records over TLS", lambda: hub_last_seq() >= 3)
