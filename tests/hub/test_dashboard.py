"""The dashboard in a real headless Chromium, fed by a real appliance through a real hub.

Fleet: ``greenhouse-3`` is a running appliance with a model that fails to load (its
``model_load_failures`` alert fires), ``barn-1`` uploaded once and went silent (offline),
``cellar-2`` was enrolled and never seen. The page must render all three, the device's
charts from its heartbeats, and the alerts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from appliance.security.keys import hash_key
from tests.browser import browser
from tests.conftest import DEFAULT_MODELS, DaemonProcess, daemon
from tests.hub.conftest import enroll_direct, get_json, hub

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# $TEST_SCREENSHOTS: a directory to keep the screenshots in, for people to look at.
SHOTS = Path(os.environ["TEST_SCREENSHOTS"]) if os.environ.get("TEST_SCREENSHOTS") else None


class Dom(HTMLParser):
    """Elements (tag, attributes) and the text inside each, from Chromium's --dump-dom."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[list[str]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, text))
        if tag not in ("br", "img", "input", "meta", "link", "circle", "line"):
            self._open.append(text)

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for text in self._open:
            text.append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict[str, str], str]]:
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [
            (a, "".join(t))
            for (g, a, t) in self.elements
            if g == tag and all(a.get(k) == v for k, v in want.items())
        ]


def chromium(url: str, profile: Path, *extra: str) -> str:
    assert CHROMIUM is not None
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--window-size=1400,1500",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, Path]]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("dashboard")
    storage = f"sqlite:///{tmp / 'hub.db'}"
    green = enroll_direct(storage, "greenhouse-3", "Greenhouse 3")
    barn = enroll_direct(storage, "barn-1", "Barn 1")
    enroll_direct(storage, "cellar-2", "Cellar 2")
    models = tmp / "models"
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", models / "sensor-anomaly")
    (models / "broken").mkdir()
    (models / "broken" / "model.onnx").write_bytes(b"not onnx")
    (models / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "model.onnx"\n', encoding="utf-8"
    )
    hub_env = {
        "APPLIANCE_HUB_FLEET__OFFLINE_AFTER": "1.0",
        "APPLIANCE_HUB_FLEET__CHECK_INTERVAL": "0.1",
    }
    with hub(storage, env=hub_env) as h:
        _one_heartbeat(h.url, barn)
        env = {
            "APPLIANCE_DEVICE__ID": "greenhouse-3",
            "APPLIANCE_HUB__URL": h.url,
            "APPLIANCE_HUB__TOKEN": green,
            "APPLIANCE_HUB__OUTBOX_PATH": str(tmp / "outbox.db"),
            "APPLIANCE_HUB__HEARTBEAT_INTERVAL": "0.1",
            "APPLIANCE_HEALTH__INTERVAL": "0.1",
            "APPLIANCE_ALERTS__MODEL_LOAD_FAILURES_THRESHOLD": "0",
        }
        with daemon("--models-dir", str(models), env=env) as appliance:
            body = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "window",
                            "shape": [1, 32, 3],
                            "datatype": "FP32",
                            "data": [[21.0, 48.0, 0.2]] * 32,
                        }
                    ]
                }
            ).encode()
            deadline = time.monotonic() + 60
            while True:  # traffic until the hub holds enough heartbeats and the alert
                urllib.request.urlopen(
                    urllib.request.Request(
                        appliance.url + "/v2/models/sensor-anomaly/infer",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    )
                ).read()
                devices = {d["id"]: d for d in get_json(h.url + "/api/v1/devices")["devices"]}
                points = get_json(h.url + "/api/v1/devices/greenhouse-3/heartbeats")["points"]
                if (
                    devices["greenhouse-3"]["status"] == "alerting"
                    and devices["barn-1"]["status"] == "offline"
                    and len([p for p in points if p["rps"]]) >= 5
                ):
                    break
                assert time.monotonic() < deadline, devices
                time.sleep(0.05)
            yield h, tmp


def _one_heartbeat(hub_url: str, token: str) -> None:
    record = {
        "seq": 1,
        "kind": "heartbeat",
        "time": time.time(),
        "body": {
            "system": {"cpu_percent": 12.0, "memory_percent": 33.0, "max_temperature_c": 41.5},
            "requests_per_s": 0.0,
            "models": {},
        },
    }
    batch = {
        "device": "barn-1",
        "name": "barn-1",
        "version": "0.0.9",
        "stream": "ab" * 16,
        "records": [record],
    }
    request = urllib.request.Request(
        hub_url + "/api/v1/ingest",
        data=json.dumps(batch).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request) as resp:
        assert resp.status == 200


def test_fleet_page_shows_every_device_and_alert(fleet: tuple[DaemonProcess, Path]) -> None:
    h, tmp = fleet
    dom = Dom(chromium(h.url + "/", tmp / "profile-fleet", "--dump-dom"))
    assert dom.find("body", data_loaded="1"), "the page's script did not finish"
    rows = {
        a["data-device"]: (a["data-status"], text)
        for a, text in dom.find("tr")
        if "data-device" in a and "data-status" in a
    }
    assert rows["greenhouse-3"][0] == "alerting"
    assert "Greenhouse 3" in rows["greenhouse-3"][1]
    assert rows["barn-1"][0] == "offline" and "Barn 1" in rows["barn-1"][1]
    assert "41.5 °C" in rows["barn-1"][1]
    assert rows["cellar-2"][0] == "never seen"
    alerts = {
        (a["data-device"], a["data-alert"]): (a["data-state"], text)
        for a, text in dom.find("tr")
        if "data-alert" in a
    }
    assert alerts[("greenhouse-3", "model_load_failures")][0] == "firing"
    assert "failed model loads" in alerts[("greenhouse-3", "model_load_failures")][1]
    assert alerts[("barn-1", "device_offline")][0] == "firing"
    # Alerting counts every device with an alert firing: barn-1's critical device_offline
    # alert too, so the operator never reads "alerting 0" while something is down.
    summary = {a["data-count"]: text for a, text in dom.find("span", class_="pill")}
    assert summary["alerting"].split()[-1] == "2" and summary["offline"].split()[-1] == "1"
    assert summary["online"].split()[-1] == "0"
    # Each row's Alerts cell is what the alerts API says is firing for that device.
    cells = {a["data-device"]: a for a, _ in dom.find("tr") if "data-status" in a}
    for device in ("greenhouse-3", "barn-1", "cellar-2"):
        firing = get_json(f"{h.url}/api/v1/alerts?state=firing&device={device}")["alerts"]
        shown = [a["data-alerts"] for a, _ in dom.find("td") if "data-alerts" in a]
        assert str(len(firing)) in shown
    alerts_cells = _row_cells(dom, "barn-1")
    assert alerts_cells[-2] == "1"  # its device_offline alert, not "!"
    # The offline row's readings are its last report: dimmed and dated, the others not.
    assert "stale" in cells["barn-1"].get("class", "")
    assert "stale" not in cells["greenhouse-3"].get("class", "")
    dimmed = [text for a, text in dom.find("td") if "last" in a.get("class", "").split()]
    assert "12.0 %" in dimmed and "41.5 °C" in dimmed
    assert all(
        a["title"].startswith("last reported ")
        for a, _ in dom.find("td")
        if "last" in a.get("class", "").split()
    )


def _row_cells(dom: Dom, device: str) -> list[str]:
    """The texts of one fleet row's cells, in order."""
    out: list[str] = []
    inside = False
    for tag, attrs, text in dom.elements:
        if tag == "tr":
            inside = attrs.get("data-device") == device and "data-status" in attrs
        elif tag == "td" and inside:
            out.append("".join(text))
    return out


def test_device_page_charts_and_screenshot(fleet: tuple[DaemonProcess, Path]) -> None:
    h, tmp = fleet
    url = h.url + "/#/devices/greenhouse-3"
    dom = Dom(chromium(url, tmp / "profile-device", "--dump-dom"))
    charts = {a["data-chart"]: text for a, text in dom.find("div") if "data-chart" in a}
    assert {"cpu", "memory", "latency_ms", "rps"} <= set(charts)
    points = get_json(h.url + "/api/v1/devices/greenhouse-3/heartbeats")["points"]
    # A Temperature panel only for a box that has temperature sensors: never an empty one.
    sensors = any(p["temperature"] is not None for p in points)
    assert ("temperature" in charts) == sensors
    assert "no data for this period" not in charts.get("temperature", "")
    lines = [a["d"] for a, _ in dom.find("path", class_="line")]
    assert len(lines) >= 4  # cpu, memory, latency, throughput (no thermal zones here)
    assert all(d.startswith("M") and d.count("L") >= 3 for d in lines), lines
    assert "req/s" in charts["rps"] and "%" in charts["cpu"]
    # Upload counts in words, not "Records 34 (stream 86205208)".
    facts = "".join(text for a, text in dom.find("div", class_="facts"))
    assert "Reports received" in facts and "Reports lost on device" in facts
    assert "stream" not in facts and "Records" not in facts
    models = {a["data-model"]: text for a, text in dom.find("tr") if "data-model" in a}
    assert "ready" in models["sensor-anomaly"] and "failed" in models["broken"]
    alerts = [a for a, _ in dom.find("tr") if a.get("data-alert") == "model_load_failures"]
    assert alerts and alerts[0]["data-state"] == "firing"
    # A picture for people: the same page as a PNG.
    shot = tmp / "device.png"
    chromium(url, tmp / "profile-shot", f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000
    shutil.copy(shot, SHOTS / "hub-device.png") if SHOTS else None
    fleet_shot = tmp / "fleet.png"
    chromium(h.url + "/", tmp / "profile-fleet-shot", f"--screenshot={fleet_shot}")
    shutil.copy(fleet_shot, SHOTS / "hub-fleet.png") if SHOTS else None


async def test_sign_in_form_and_kiosk_key_in_the_fragment(
    fleet: tuple[DaemonProcess, Path],
) -> None:
    """A hub that needs keys: the page shows a form (no prompt()), a typed key signs in,
    a wrong one is refused in words, and a kiosk opens /#key=... without typing."""
    _, tmp = fleet
    key = "apk_dashboard-test-key-0123456789abcdef"
    keys = tmp / "hub-keys"
    keys.write_text(f"dashboard read {hash_key(key)}\n", encoding="utf-8")
    env = {"APPLIANCE_HUB_SECURITY__AUTH": "on", "APPLIANCE_HUB_SECURITY__KEYS_FILE": str(keys)}
    with hub(f"sqlite:///{tmp / 'hub.db'}", env=env) as locked:
        async with browser(tmp / "profile-signin") as page:
            await page.goto(locked.url + "/")
            await page.wait_for("document.body.dataset.signin === '1'")
            assert await page.evaluate("document.getElementById('signin').hidden") is False
            assert await page.evaluate("document.getElementById('content').hidden") is True
            await page.screenshot(tmp / "signin.png", full_page=False)
            await page.type("#signin-key", "apk_not-the-right-key-000000000000000")
            await page.press_enter()
            await page.wait_for("!document.getElementById('signin-error').hidden")
            refused = await page.evaluate("document.getElementById('signin-error').textContent")
            assert "key" in refused.lower(), refused
            await page.type("#signin-key", key)
            await page.click("#signin button[type=submit]")
            await page.wait_for("document.body.dataset.loaded === '1'")
            rows = await page.evaluate(
                "[...document.querySelectorAll('#fleet tr[data-device]')]"
                ".map(r => r.dataset.device)"
            )
            assert set(rows) == {"greenhouse-3", "barn-1", "cellar-2"}
            assert await page.evaluate("document.getElementById('signout').hidden") is False
            await page.screenshot(tmp / "signed-in.png", full_page=False)
        async with browser(tmp / "profile-kiosk") as kiosk:
            await kiosk.goto(f"{locked.url}/#/devices/greenhouse-3&key={key}")
            await kiosk.wait_for("document.body.dataset.loaded === '1'")
            assert await kiosk.evaluate("document.body.dataset.signin") is None
            # The key leaves the address bar; the device view it named stays.
            assert await kiosk.evaluate("location.hash") == "#/devices/greenhouse-3"
            await kiosk.wait_for("document.querySelector('#device [data-chart=cpu]') !== null")
    if SHOTS:
        for name in ("signin.png", "signed-in.png"):
            shutil.copy(tmp / name, SHOTS / f"hub-{name}")
