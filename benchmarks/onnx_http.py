"""Benchmark 3: ONNX requests/s and latency over HTTP at 1, 8 and 32 concurrent clients.

Against onnxruntime called in-process in a loop (batch 1, the model's limit without any
serving), the appliance with dynamic batching off and on, and the transport's own ceiling
(:mod:`benchmarks.canned`: aiohttp parsing the same JSON and answering a canned response of
the same size). Two models: the default ``sensor-anomaly`` (tiny: HTTP and JSON set the
pace) and a random MLP where batch-1 compute dominates (:func:`benchmarks.models.build_mlp`).
Each point runs for ``seconds`` after a short warm-up.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.common import ROOT, Daemon, free_port, pct, stop, wait_http

LEVELS = (1, 8, 32)


def payloads() -> dict[str, tuple[str, list[int], Any]]:
    rng = np.random.default_rng(0)
    return {
        "sensor-anomaly": ("window", [1, 32, 3], rng.normal(20, 5, (1, 32, 3))),
        "mlp": ("x", [1, 256], rng.normal(0, 1, (1, 256))),
    }


def body(model: str) -> dict[str, Any]:
    name, shape, data = payloads()[model]
    return {
        "inputs": [
            {
                "name": name,
                "shape": shape,
                "datatype": "FP32",
                "data": data.astype(np.float32).reshape(-1).tolist(),
            }
        ]
    }


def repo(root: Path, mlp: Path, threads: int) -> Path:
    sources = {"sensor-anomaly": ROOT / "models" / "sensor-anomaly" / "model.onnx", "mlp": mlp}
    for model, source in sources.items():
        for suffix, options in (("", ""), ("-batched", "batching = true\nmax_batch = 32\n")):
            directory = root / (model + suffix)
            directory.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, directory / "model.onnx")
            (directory / "manifest.toml").write_text(
                f'name = "{model + suffix}"\nruntime = "onnx"\nfile = "model.onnx"\n\n'
                f"[options]\nthreads = {threads}\n{options}"
            )
    return root


def in_process(path: Path, model: str, threads: int, seconds: float) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name, _, data = payloads()[model]
    feed = {name: data.astype(np.float32)}
    session.run(None, feed)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feed)
        count += 1
    return count / (time.perf_counter() - started)


async def load(
    url: str,
    model: str,
    request: dict[str, Any],
    clients: int,
    seconds: float,
    probe: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Requests/s and latencies of ``clients`` concurrent clients over ``seconds`` (after a
    0.3 s warm-up); with ``probe``, also how much it grew over the measured window."""
    latencies: list[float] = []
    errors = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as http:
        target = f"{url}/v2/models/{model}/infer"

        async def client(until: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < until:
                sent = time.perf_counter()
                async with http.post(target, json=request) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                if record:
                    latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(client(time.perf_counter() + 0.3, False) for _ in range(clients)))
        probed = probe() if probe is not None else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds, True) for _ in range(clients)))
        wall = time.perf_counter() - started
        probed = probe() - probed if probe is not None else 0.0
    return {
        "probe": probed,
        "rps": len(latencies) / wall,
        "p50_ms": pct(latencies, 50) * 1000,
        "p99_ms": pct(latencies, 99) * 1000,
        "errors": errors,
    }


def run(mlp: Path, threads: int, work: Path, seconds: float = 2.0) -> dict[str, Any]:
    models_dir = repo(work / "onnx-models", mlp, threads)
    result: dict[str, Any] = {"threads": threads, "seconds": seconds, "models": {}}
    daemon = Daemon(
        env={"APPLIANCE_MODELS__DIR": str(models_dir), "APPLIANCE_MODELS__QUEUE_SIZE": "128"}
    )
    try:
        for model in ("sensor-anomaly", "mlp"):
            request = body(model)
            entry: dict[str, Any] = {
                "in_process_rps": in_process(
                    models_dir / model / "model.onnx", model, threads, seconds
                ),
            }
            for variant in ("", "-batched"):
                entry["appliance" + variant] = {
                    str(n): asyncio.run(load(daemon.url, model + variant, request, n, seconds))
                    for n in LEVELS
                }
            # The canned response is the appliance's own answer to this request.
            req = urllib.request.Request(
                f"{daemon.url}/v2/models/{model}/infer", data=json.dumps(request).encode()
            )
            with urllib.request.urlopen(req) as resp:
                canned_body = resp.read()
            entry["canned"] = canned(canned_body, request, model, seconds, work)
            result["models"][model] = entry
        result["appliance_rss_mb"] = daemon.rss_bytes() / 2**20
    finally:
        daemon.stop()
    return result


def canned(
    answer: bytes, request: dict[str, Any], model: str, seconds: float, work: Path
) -> dict[str, Any]:
    path = work / f"canned-{model}.json"
    path.write_bytes(answer)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.canned", str(port), str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc=proc)
        return {str(n): asyncio.run(load(url, model, request, n, seconds)) for n in LEVELS}
    finally:
        stop(proc)
