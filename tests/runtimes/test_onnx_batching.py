"""ONNX dynamic batching on the real default model behind a real daemon.

One repository serves the sensor model twice from the same file: ``batched`` (batching on)
and ``single`` (off). Concurrent requests to ``batched`` must share model runs — seen in
``appliance_batch_size``, not in mocks — and every request must get exactly the outputs
``single`` gives it (up to the last float32 bits: onnxruntime picks its matrix kernels
by batch size).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_url, make_config, serving

CLIENTS = 24


def repo(root: Path, default_models: Path) -> Path:
    source = default_models / "sensor-anomaly"
    for name, options in [
        ("batched", "batching = true\nmax_batch = 16\nbatch_delay_ms = 20\n"),
        ("single", ""),
        ("fixed", "batching = true\n"),
    ]:
        (root / name).mkdir(parents=True)
        shutil.copy(source / "model.onnx", root / name / "model.onnx")
        if name == "fixed":  # the same graph with its batch dimension fixed to 1
            model = onnx.load(str(source / "model.onnx"))
            for tensor in [*model.graph.input, *model.graph.output]:
                tensor.type.tensor_type.shape.dim[0].dim_value = 1
            onnx.save(model, str(root / name / "model.onnx"))
        (root / name / "manifest.toml").write_text(
            f'name = "{name}"\nruntime = "onnx"\nfile = "model.onnx"\n\n[options]\n{options}'
        )
    return root


def window(seed: int, rows: int = 1) -> dict[str, Any]:
    data = np.random.default_rng(seed).normal(20, 5, size=(rows, 32, 3)).astype(np.float32)
    return {
        "inputs": [
            {
                "name": "window",
                "shape": [rows, 32, 3],
                "datatype": "FP32",
                "data": data.reshape(-1).tolist(),
            }
        ]
    }


async def infer(
    http: aiohttp.ClientSession, url: str, model: str, body: dict[str, Any]
) -> dict[str, list[Any]]:
    async with http.post(f"{url}/v2/models/{model}/infer", json=body) as resp:
        assert resp.status == 200, await resp.text()
        result = await resp.json()
    return {out["name"]: out["data"] for out in result["outputs"]}


async def batch_sizes(http: aiohttp.ClientSession, url: str, model: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "appliance_batch_size_bucket":
                out[sample.labels["le"]] = sample.value
            elif sample.name == "appliance_batch_size_count":
                out["count"] = sample.value
    return out


async def test_concurrent_requests_share_runs_with_unchanged_outputs(
    tmp_path: Path, default_models: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(models={"dir": repo(tmp_path, default_models)})
    async with serving(config) as server:
        url = base_url(server)
        # Mixed batch sizes: 1-row and 3-row requests are stacked together.
        bodies = [window(i, rows=3 if i % 5 == 0 else 1) for i in range(CLIENTS)]
        expected = [await infer(http, url, "single", b) for b in bodies]
        got = await asyncio.gather(*(infer(http, url, "batched", b) for b in bodies))
        for mine, alone in zip(got, expected, strict=True):
            assert mine["is_anomaly"] == alone["is_anomaly"]
            # onnxruntime picks its matrix kernels by batch size, so a score may differ from
            # the unbatched one in its last float32 bits — never by more.
            np.testing.assert_allclose(mine["score"], alone["score"], rtol=1e-6, atol=0)

        batched = await batch_sizes(http, url, "batched")
        # Fewer runs than requests, and runs of more than one request happened.
        assert batched["count"] < CLIENTS
        assert batched["+Inf"] - batched["1"] >= 1
        single = await batch_sizes(http, url, "single")
        assert single["count"] == CLIENTS
        assert single["1"] == CLIENTS


async def test_a_bad_request_fails_alone_and_a_fixed_batch_dimension_is_not_batched(
    tmp_path: Path, default_models: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(models={"dir": repo(tmp_path, default_models)})
    async with serving(config) as server:
        url = base_url(server)
        good = [window(i) for i in range(6)]
        bad = {
            "inputs": [
                {"name": "window", "shape": [1, 31, 3], "datatype": "FP32", "data": [0.0] * 93}
            ]
        }

        async def post(body: dict[str, Any]) -> int:
            async with http.post(f"{url}/v2/models/batched/infer", json=body) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(post(b) for b in [*good[:3], bad, *good[3:]]))
        assert statuses == [200, 200, 200, 400, 200, 200, 200]
        # Batching asked for on a model whose batch dimension is fixed: it runs requests
        # one by one (each run a batch of one) and still answers every one of them.
        fixed = await asyncio.gather(*(infer(http, url, "fixed", b) for b in good))
        assert fixed == [await infer(http, url, "single", b) for b in good]
        sizes = await batch_sizes(http, url, "fixed")
        assert sizes["count"] == len(good)
        assert sizes["1"] == len(good)
