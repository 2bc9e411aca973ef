"""Pipelines: the sensor-anomaly detector's anomalous windows explained by a language model,
over HTTP (OIP) and through an MQTT-style call of ``core.infer`` (what stream rules do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from tests.conftest import base_url, make_config, serving
from tests.transports.sensor_data import sensor_windows

PIPELINE = {
    "name": "explained-anomaly",
    "steps": [
        {"model": "sensor-anomaly"},
        {
            "model": "stories260K",
            "when": "is_anomaly",
            "max_tokens": 12,
            "prompt": "The sensor score was {score}. Once upon a time",
        },
    ],
}


def anomalous_window() -> np.ndarray[Any, np.dtype[np.float32]]:
    chosen = sensor_windows(8)[0].copy()
    chosen[20:, 0] = 85.0  # the temperature sensor saturates: out of range
    return chosen[None]


def body(w: np.ndarray[Any, np.dtype[np.float32]]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(w.shape),
                "data": w.ravel().tolist(),
            }
        ]
    }


async def test_pipeline_runs_from_http_and_from_the_core(
    default_models: Path, stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(
        models={"dir": default_models, "files": [stories_gguf]}, pipelines={"chain": [PIPELINE]}
    )
    async with serving(config) as server:
        url = base_url(server)
        async with http.get(url + "/v2/models/explained-anomaly") as resp:
            meta = await resp.json()
        assert meta["state"] == "ready"
        assert [t["name"] for t in meta["inputs"]] == ["window"]
        assert {t["name"] for t in meta["outputs"]} == {"score", "is_anomaly", "text"}

        async with http.post(
            url + "/v2/models/explained-anomaly/infer", json=body(anomalous_window())
        ) as resp:
            assert resp.status == 200, await resp.text()
            outputs = {o["name"]: o["data"] for o in (await resp.json())["outputs"]}
        assert outputs["is_anomaly"] == [True]
        assert outputs["text"][0].strip()  # the language model explained it

        # What an MQTT stream rule with model = "explained-anomaly" calls, on a window the
        # detector finds normal.
        assert server.core is not None
        windows = sensor_windows(64)
        plain = await server.core.infer("sensor-anomaly", {"window": windows})
        quiet = windows[int(np.argmin(plain.outputs["score"]))][None]
        result = await server.core.infer("explained-anomaly", {"window": quiet})
        assert not bool(result.outputs["is_anomaly"][0])
        assert result.outputs["text"][0] == b""  # quiet windows cost no generation
