"""The box's face: a browser at ``http://<box>:8080/`` sees the device; Ollama clients at
the same ``GET /`` still read "Ollama is running". A real daemon with the default models
(plus one that fails to load, so an alert fires), a real Mosquitto, real traffic, and the
page in a real headless Chromium, signed in with a key typed into its form."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import ollama
import pytest

from appliance.security.keys import hash_key
from tests.browser import CHROMIUM, browser
from tests.conftest import DEFAULT_MODELS, daemon
from tests.transports.mqtt.conftest import Broker

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
]

KEY = "apk_device-page-key-0123456789abcdefghij"
SHOTS = Path(os.environ["TEST_SCREENSHOTS"]) if os.environ.get("TEST_SCREENSHOTS") else None


def _call(
    url: str, body: dict[str, object] | None = None, *, accept: str | None = None
) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {KEY}"}
    if accept is not None:
        headers["Accept"] = accept
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    with urllib.request.urlopen(
        urllib.request.Request(url, data=data, headers=headers), timeout=60
    ) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def _plain_get(url: str, accept: str | None) -> bytes:
    request = urllib.request.Request(url)
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return bytes(resp.read())


async def test_a_browser_sees_the_device_and_ollama_clients_see_ollama(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("sensor-anomaly", "home-intent"):
        shutil.copytree(DEFAULT_MODELS / name, models / name)
    (models / "broken").mkdir()
    (models / "broken" / "model.onnx").write_bytes(b"not onnx")
    (models / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "model.onnx"\n', encoding="utf-8"
    )
    keys = tmp_path / "keys"
    keys.write_text(f"viewer read,infer {hash_key(KEY)}\n", encoding="utf-8")
    broker = Broker(tmp_path)
    broker.start()
    env = {
        "APPLIANCE_DEVICE__ID": "greenhouse-3",
        "APPLIANCE_DEVICE__NAME": "Greenhouse 3",
        "APPLIANCE_SECURITY__AUTH": "on",
        "APPLIANCE_SECURITY__KEYS_FILE": str(keys),
        "APPLIANCE_MQTT__ENABLED": "true",
        "APPLIANCE_MQTT__HOST": broker.host,
        "APPLIANCE_MQTT__PORT": str(broker.port),
        "APPLIANCE_HEALTH__INTERVAL": "0.2",
        "APPLIANCE_ALERTS__MODEL_LOAD_FAILURES_THRESHOLD": "0",
        "STATE_DIRECTORY": str(tmp_path / "state"),
    }
    try:
        with daemon("--models-dir", str(models), env=env) as box:
            # Ollama clients: GET / with no Accept, or */*, is Ollama's plain answer.
            for accept in (None, "*/*"):
                assert _plain_get(box.url + "/", accept) == b"Ollama is running"
            # Traffic for the charts: tensor inferences and generated tokens.
            window = {
                "inputs": [
                    {
                        "name": "window",
                        "shape": [1, 32, 3],
                        "datatype": "FP32",
                        "data": [[21.0, 48.0, 0.2]] * 32,
                    }
                ]
            }
            deadline = time.monotonic() + 60
            while True:
                _call(box.url + "/v2/models/sensor-anomaly/infer", window)
                _call(
                    box.url + "/v1/chat/completions",
                    {
                        "model": "home-intent",
                        "max_tokens": 8,
                        "messages": [{"role": "user", "content": "turn on the kitchen light"}],
                    },
                )
                _, _, raw = _call(box.url + "/device")
                state = json.loads(raw)
                points = state["history"]["points"]
                if (
                    len([p for p in points if p["rps"]]) >= 3
                    and any(p["tokens_s"] for p in points)
                    and state["alerts"]["firing"]
                ):
                    break
                assert time.monotonic() < deadline, state
                await asyncio.sleep(0.1)
            assert {m["name"]: m["state"] for m in state["models"]} == {
                "sensor-anomaly": "ready",
                "home-intent": "ready",
                "broken": "failed",
            }
            # Ollama's /api/show names the GGUF's own quantization and size (home-intent:
            # a Q8_0 file; its parameters counted here with gguf-py).
            with ollama.Client(host=box.url, headers={"Authorization": f"Bearer {KEY}"}) as olla:
                details = olla.show("home-intent").details
            assert details is not None and details.quantization_level == "Q8_0"
            reader = gguf.GGUFReader(str(home_intent_file()))
            params = sum(int(np.prod(t.shape)) for t in reader.tensors)
            assert details.parameter_size == f"{params / 1e3:.1f}K"
            assert details.family == "llama"
            topics = [t["topic"] for t in state["mqtt"]["topics"]]
            assert "appliance/greenhouse-3/infer/sensor-anomaly" in topics

            async with browser(tmp_path / "profile", height=1400) as page:
                await page.goto(box.url + "/")
                await page.wait_for("document.body.dataset.signin === '1'")
                await page.type("#signin-key", KEY)
                await page.press_enter()
                await page.wait_for("document.body.dataset.loaded === '1'")
                title = await page.evaluate("document.getElementById('title').textContent")
                assert "Greenhouse 3" in title and "greenhouse-3" in title
                rows = await page.evaluate(
                    "Object.fromEntries([...document.querySelectorAll('#models tr[data-model]')]"
                    ".map(r => [r.dataset.model, r.dataset.state]))"
                )
                assert rows == {
                    "sensor-anomaly": "ready",
                    "home-intent": "ready",
                    "broken": "failed",
                }
                charts = await page.evaluate(
                    "Object.fromEntries([...document.querySelectorAll('[data-chart]')].map("
                    "c => [c.dataset.chart, (c.querySelector('path.line') || {}).getAttribute"
                    "? c.querySelector('path.line').getAttribute('d') : '']))"
                )
                assert {"latency_ms", "rps", "tokens_s", "cpu", "memory"} <= set(charts)
                for key in ("latency_ms", "rps", "tokens_s", "cpu"):
                    assert charts[key].startswith("M"), (key, charts[key])
                sensors = any(p["temperature"] is not None for p in points)
                assert ("temperature" in charts) == sensors
                alerts = await page.evaluate(
                    "[...document.querySelectorAll('tr[data-alert]')].map("
                    "r => [r.dataset.alert, r.dataset.state])"
                )
                assert ["model_load_failures", "firing"] in alerts
                shown = await page.evaluate(
                    "[...document.querySelectorAll('#topics tr[data-topic]')]"
                    ".map(r => r.dataset.topic)"
                )
                assert "appliance/greenhouse-3/infer/home-intent" in shown
                shot = tmp_path / "device-page.png"
                await page.screenshot(shot)
    finally:
        broker.stop()
    assert shot.read_bytes().startswith(b"\x89PNG")
    if SHOTS:
        shutil.copy(shot, SHOTS / "device-page.png")


def home_intent_file() -> Path:
    """The GGUF file the shipped home-intent manifest names."""
    import tomllib

    directory = Path(__file__).resolve().parents[3] / "models" / "home-intent"
    manifest = tomllib.loads((directory / "manifest.toml").read_text())
    return directory / str(manifest["file"])
