"""``/health``, ``/v2/health/ready`` and ``/metrics`` of a real in-process daemon.

Loading is made observable without touching the daemon: the repository holds valid models
padded with 32 MiB of metadata and a checksum, so each one takes a while to verify and
parse, and the test asks before the loader has even started.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from appliance import __version__
from appliance.server import Server
from tests.conftest import DEFAULT_MODELS, base_url, make_config, serving

GOOD = "sensor-anomaly"
GOOD_DIR = DEFAULT_MODELS / GOOD
PADDING = 32 << 20

Json = dict[str, Any]


def padded_model(path: Path) -> str:
    """Write the default model plus 32 MiB of metadata to ``path``; return its sha256."""
    model = onnx.load(str(GOOD_DIR / "model.onnx"))
    entry = model.metadata_props.add()
    entry.key = "padding"
    entry.value = "x" * PADDING
    onnx.save(model, str(path))
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slow_repo(root: Path, copies: int) -> tuple[Path, list[str]]:
    """A repository of ``copies`` slow-to-load models (hard links to one padded file)."""
    source = root / "padded.onnx"
    sha256 = padded_model(source)
    repo = root / "models"
    names = [f"slow-{i}" for i in range(copies)]
    for name in names:
        (repo / name).mkdir(parents=True)
        os.link(source, repo / name / "model.onnx")
        (repo / name / "manifest.toml").write_text(
            f'name = "{name}"\nruntime = "onnx"\nfile = "model.onnx"\nsha256 = "{sha256}"\n',
            encoding="utf-8",
        )
    return repo, names


def mixed_repo(root: Path) -> Path:
    """The default model and one whose file is missing."""
    repo = root / "models"
    shutil.copytree(GOOD_DIR, repo / GOOD)
    (repo / "broken").mkdir()
    (repo / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "gone.onnx"\n', encoding="utf-8"
    )
    return repo


def infer_body(batch: int = 2) -> Json:
    rng = np.random.default_rng(batch)
    data = (np.array([21.0, 45.0, 0.2]) + rng.normal(0, 0.05, (batch, 32, 3))).astype(np.float32)
    return {
        "inputs": [
            {"name": "window", "datatype": "FP32", "shape": [batch, 32, 3], "data": data.tolist()}
        ]
    }


async def status_of(http: aiohttp.ClientSession, url: str) -> tuple[int, Json]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------------------- health


async def test_health_is_loading_then_ok(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    repo, names = slow_repo(tmp_path, copies=3)
    last = names[-1]  # models load in order: while loading, the last one is never ready
    config = make_config(models={"dir": repo})
    seen: list[str] = []
    async with serving(config, wait_loaded=False) as server:
        url = base_url(server)
        while True:
            model_code, model_body = await status_of(http, f"{url}/v2/models/{last}/ready")
            ready_before, _ = await status_of(http, url + "/v2/health/ready")
            code, body = await status_of(http, url + "/health")
            ready_after, ready_body = await status_of(http, url + "/v2/health/ready")
            seen.append(body["status"])
            if body["status"] == "loading":
                # Loading only ever ends, so everything asked before this answer saw it too.
                assert code == 503
                assert ready_before == 503
                assert model_code == 400  # not ready: 4xx, as Triton answers
                assert "loading" in model_body["error"]
                assert body["models"][last]["state"] == "loading"
                continue
            assert body["status"] == "ok", seen
            assert code == 200
            assert ready_after == 200
            assert ready_body == {"ready": True}
            break
        assert set(body["models"]) == set(names)
        assert all(m["state"] == "ready" for m in body["models"].values())
        async with http.post(f"{url}/v2/models/{last}/infer", json=infer_body()) as resp:
            assert resp.status == 200
    # The first answer came before the loader ran; after "ok" nothing goes back.
    assert seen[0] == "loading"
    assert seen[-1] == "ok"
    assert seen == ["loading"] * (len(seen) - 1) + ["ok"]


async def test_infer_while_loading_waits_then_503_with_retry_after(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # A request for a model being loaded waits for it (bounded by models.load_wait) ...
    repo, names = slow_repo(tmp_path, copies=2)
    async with serving(make_config(models={"dir": repo}), wait_loaded=False) as server:
        url = base_url(server)
        async with http.post(f"{url}/v2/models/{names[-1]}/infer", json=infer_body()) as resp:
            assert resp.status == 200
    # ... and is told 503 with Retry-After once that wait is over.
    config = make_config(models={"dir": repo, "load_wait": 0.001})
    async with serving(config, wait_loaded=False) as server:
        url = base_url(server)
        async with http.post(f"{url}/v2/models/{names[-1]}/infer", json=infer_body()) as resp:
            answer = await resp.json()
            status, retry = resp.status, resp.headers.get("Retry-After")
        assert status == 503
        assert retry is not None
        assert retry.isdigit()
        assert "state: loading" in answer["error"]
        assert server.core is not None
        await server.core.models.wait_loaded()
        async with http.post(f"{url}/v2/models/{names[-1]}/infer", json=infer_body()) as resp:
            assert resp.status == 200


async def test_health_document(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    repo = tmp_path / "models"
    shutil.copytree(GOOD_DIR, repo / GOOD)
    config = make_config(
        models={"dir": repo}, device={"id": "greenhouse-3", "name": "Greenhouse 3"}
    )
    async with serving(config) as server:
        code, body = await status_of(http, base_url(server) + "/health")
    assert code == 200
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["device"] == {"id": "greenhouse-3", "name": "Greenhouse 3"}
    assert isinstance(body["uptime_s"], (int, float))
    assert body["uptime_s"] >= 0
    assert body["models"] == {GOOD: {"state": "ready", "runtime": "onnx", "version": "1"}}


async def test_health_is_degraded_with_a_failed_model(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serving(make_config(models={"dir": mixed_repo(tmp_path)})) as server:
        url = base_url(server)
        code, body = await status_of(http, url + "/health")
        assert (code, body["status"]) == (200, "degraded")
        assert body["models"]["broken"]["state"] == "failed"
        assert "gone.onnx" in body["models"]["broken"]["error"]
        assert "error" not in body["models"][GOOD]
        assert await status_of(http, url + "/v2/health/ready") == (200, {"ready": True})


async def test_health_with_no_models(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """An empty repository is a working daemon with nothing to serve, not a failure."""
    (tmp_path / "empty").mkdir()
    async with serving(make_config(models={"dir": tmp_path / "empty"})) as server:
        url = base_url(server)
        code, body = await status_of(http, url + "/health")
        assert (code, body["status"], body["models"]) == (200, "ok", {})
        assert (await status_of(http, url + "/v2/health/ready"))[0] == 200


# --------------------------------------------------------------------------- metrics


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1
        return found[0] if found else None

    def matching(self, name: str, **labels: str) -> list[Sample]:
        """Samples of ``name`` whose labels include these."""
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def histogram(self, name: str, **labels: str) -> tuple[list[tuple[float, float]], float, float]:
        """(le, cumulative count) pairs in order, the count and the sum of one histogram."""
        buckets = [
            (float(s.labels["le"]), s.value)
            for s in self.matching(name + "_bucket")
            if {k: v for k, v in s.labels.items() if k != "le"} == labels
        ]
        count = self.value(name + "_count", **labels)
        total = self.value(name + "_sum", **labels)
        assert count is not None
        assert total is not None
        return sorted(buckets), count, total


async def scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"  # Prometheus text exposition format
        assert "version=" in resp.headers["Content-Type"]
        return Scrape(await resp.text())


def check_histogram(buckets: list[tuple[float, float]], count: float, total: float) -> None:
    assert buckets, "no buckets"
    assert buckets[-1][0] == math.inf
    assert buckets[-1][1] == count
    cumulative = [c for _, c in buckets]
    assert cumulative == sorted(cumulative), "bucket counts must not decrease"
    assert total >= 0


@pytest.fixture
async def mixed_server(tmp_path: Path) -> AsyncIterator[Server]:
    async with serving(make_config(models={"dir": mixed_repo(tmp_path)})) as server:
        yield server


INFER = "/v2/models/{name}/infer"
INFER_VERSION = "/v2/models/{name}/versions/{version}/infer"
HTTP = {"transport": "http"}


async def test_metrics_count_requests_by_route_model_and_status(
    mixed_server: Server, http: aiohttp.ClientSession
) -> None:
    url = base_url(mixed_server)
    for _ in range(3):
        async with http.post(f"{url}/v2/models/{GOOD}/infer", json=infer_body()) as resp:
            assert resp.status == 200
    async with http.post(f"{url}/v2/models/{GOOD}/versions/1/infer", json=infer_body(8)) as resp:
        assert resp.status == 200
    async with http.post(f"{url}/v2/models/{GOOD}/infer", json={"inputs": []}) as resp:
        assert resp.status == 400
    async with http.post(f"{url}/v2/models/broken/infer", json=infer_body()) as resp:
        assert resp.status == 503
    for _ in range(2):
        async with http.get(url + "/health") as resp:
            assert resp.status == 200

    m = await scrape(http, url)
    assert m.types["appliance_requests"] == "counter"
    requests = "appliance_requests_total"
    assert m.value(requests, **HTTP, route=INFER, model=GOOD, status="200") == 3
    assert m.value(requests, **HTTP, route=INFER, model=GOOD, status="400") == 1
    assert m.value(requests, **HTTP, route=INFER_VERSION, model=GOOD, status="200") == 1
    assert m.value(requests, **HTTP, route=INFER, model="broken", status="503") == 1
    assert m.value(requests, **HTTP, route="/health", model="", status="200") == 2
    assert m.value(requests, **HTTP, route="/metrics", model="", status="200") is None

    assert m.types["appliance_request_duration_seconds"] == "histogram"
    buckets, count, total = m.histogram(
        "appliance_request_duration_seconds", **HTTP, route=INFER, model=GOOD
    )
    check_histogram(buckets, count, total)
    assert count == 4  # every answer is timed, errors included
    assert len(buckets) == 15  # 5 ms .. 120 s, then +Inf
    assert buckets[0][0] == 0.005
    assert total > 0

    assert m.types["appliance_inference_duration_seconds"] == "histogram"
    buckets, count, total = m.histogram("appliance_inference_duration_seconds", model=GOOD)
    check_histogram(buckets, count, total)
    assert count == 4  # the model ran four times; the bad request never reached it
    assert m.value("appliance_inference_duration_seconds_count", model="broken") is None

    # The scrape itself is counted from the next scrape on.
    again = await scrape(http, url)
    assert again.value(requests, **HTTP, route="/metrics", model="", status="200") == 1


async def test_metrics_model_state_and_queues(
    mixed_server: Server, http: aiohttp.ClientSession
) -> None:
    url = base_url(mixed_server)
    async with http.post(f"{url}/v2/models/{GOOD}/infer", json=infer_body()) as resp:
        assert resp.status == 200
    m = await scrape(http, url)
    assert m.types["appliance_model_ready"] == "gauge"
    assert m.value("appliance_model_ready", model=GOOD) == 1
    assert m.value("appliance_model_ready", model="broken") == 0
    assert m.types["appliance_model_load_failures"] == "counter"
    assert m.value("appliance_model_load_failures_total", model="broken") == 1
    assert not m.value("appliance_model_load_failures_total", model=GOOD)
    assert m.types["appliance_queue_depth"] == "gauge"
    assert m.value("appliance_queue_depth", model=GOOD) == 0
    assert m.value("appliance_requests_running", model=GOOD) == 0
    load_seconds = m.value("appliance_model_load_seconds", model=GOOD)
    assert load_seconds is not None
    assert load_seconds > 0


async def test_queue_depth_shows_waiting_requests(
    mixed_server: Server, http: aiohttp.ClientSession
) -> None:
    """While the model is busy, a request waits in its queue and the gauge shows it."""
    url = base_url(mixed_server)
    assert mixed_server.core is not None
    admission = mixed_server.core.models.get(GOOD).admission
    assert admission.parallel == 1

    async def depth() -> float | None:
        return (await scrape(http, url)).value("appliance_queue_depth", model=GOOD)

    async def infer() -> int:
        async with http.post(f"{url}/v2/models/{GOOD}/infer", json=infer_body()) as resp:
            await resp.read()
            return resp.status

    async with admission.admit():  # occupy the model's only slot, as a long request would
        queued = asyncio.create_task(infer(), name="queued-infer")
        try:
            while True:  # bounded by the test timeout
                if await depth() == 1:
                    break
                await asyncio.sleep(0.01)
            running = (await scrape(http, url)).value("appliance_requests_running", model=GOOD)
            assert running == 1
            assert not queued.done()
        except BaseException:
            queued.cancel()
            raise
    assert await queued == 200
    assert await depth() == 0
    assert (await scrape(http, url)).value("appliance_requests_running", model=GOOD) == 0


async def test_metrics_labels_only_known_models(
    mixed_server: Server, http: aiohttp.ClientSession
) -> None:
    """Model names clients make up must not become label values (unbounded series)."""
    url = base_url(mixed_server)
    for i in range(20):
        async with http.post(f"{url}/v2/models/made-up-{i}/infer", json=infer_body()) as resp:
            assert resp.status == 404
        async with http.post(
            url + "/v1/completions", json={"model": f"made-up-{i}", "prompt": "x"}
        ) as resp:
            assert resp.status == 404
    m = await scrape(http, url)
    models = {s.labels.get("model") for s in m.samples if s.name.startswith("appliance_")}
    assert not {name for name in models if name and name.startswith("made-up")}
    requests = "appliance_requests_total"
    assert m.value(requests, **HTTP, route=INFER, model="", status="404") == 20
    assert sum(s.value for s in m.matching(requests, status="404")) == 40


async def completion(http: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> Json:
    async with http.post(
        url + "/v1/completions",
        json={
            "model": model,
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    ) as resp:
        assert resp.status == 200
        body: Json = await resp.json()
    return body


async def test_metrics_count_generated_tokens(
    stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    name = stories_gguf.stem
    async with serving(make_config(models={"files": [stories_gguf]})) as server:
        url = base_url(server)
        before = await scrape(http, url)
        assert not before.value("appliance_tokens_generated_total", model=name)
        prompt_tokens = 0
        for max_tokens in (12, 7):
            body = await completion(http, url, name, max_tokens)
            # Cut at max_tokens, so exactly that many tokens were generated.
            assert body["choices"][0]["finish_reason"] == "length"
            prompt_tokens += body["usage"]["prompt_tokens"]
        m = await scrape(http, url)
    assert m.types["appliance_tokens_generated"] == "counter"
    assert m.value("appliance_tokens_generated_total", model=name) == 12 + 7
    assert m.types["appliance_prompt_tokens"] == "counter"
    assert m.value("appliance_prompt_tokens_total", model=name) == prompt_tokens
    ttft = m.histogram("appliance_time_to_first_token_seconds", model=name)
    check_histogram(*ttft)
    assert ttft[1] == 2
    assert m.histogram("appliance_inference_duration_seconds", model=name)[1] == 2
    assert (
        m.value(
            "appliance_requests_total", **HTTP, route="/v1/completions", model=name, status="200"
        )
        == 2
    )
    assert m.value("appliance_model_ready", model=name) == 1


async def test_usage_agrees_with_the_token_counter(
    stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    name = stories_gguf.stem
    async with serving(make_config(models={"files": [stories_gguf]})) as server:
        url = base_url(server)
        body = await completion(http, url, name, 12)
        m = await scrape(http, url)
    counted = m.value("appliance_tokens_generated_total", model=name)
    assert body["usage"]["completion_tokens"] == counted == 12
