"""Fast ONNX runs on the event loop: the policy, and the same answers either way.

The sensor model is served twice from one file behind a real daemon: ``onloop`` with the
default ``inline_max_ms`` and ``threaded`` with it at 0 (every run on a worker thread).
Both must give the same outputs bit for bit, refuse bad input with the same errors and
count the same metrics.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from appliance.runtimes.inline import InlinePolicy
from appliance.runtimes.onnx import OnnxRuntime
from tests.conftest import base_url, make_config, serving
from tests.runtimes.test_onnx_batching import window

REQUESTS = 12


def test_a_run_goes_inline_only_once_a_threaded_run_that_size_was_fast() -> None:
    policy = InlinePolicy(0.001)
    assert not policy.inline(100)  # nothing measured yet
    policy.threaded()
    assert not policy.inline(100)
    policy.observe(100, 0.0002, threaded=True)
    assert policy.inline(100) and policy.inline(50)
    assert not policy.inline(101)  # larger than any run measured fast
    policy.threaded()  # a run in flight on a worker: nothing goes inline meanwhile
    assert not policy.inline(50)
    policy.observe(400, None, threaded=True)  # given up on before it finished: no measure
    assert policy.inline(100) and not policy.inline(400)
    policy.observe(80, 0.002, threaded=False)  # one slow run turns it off
    assert not policy.inline(10)
    policy.threaded()
    policy.observe(60, 0.0001, threaded=True)
    assert policy.inline(60) and not policy.inline(61)
    policy.observe(-1, 0.0, threaded=False)  # sizes that say nothing never count
    assert not policy.inline(-1)


def test_a_session_that_computes_alone_goes_inline_beside_threaded_runs() -> None:
    policy = InlinePolicy(0.001, alone=True)
    policy.threaded()
    assert not policy.inline(100)  # nothing measured yet
    policy.threaded()
    policy.observe(100, 0.0002, threaded=True)
    assert policy.inline(100)  # one run still in flight on a worker: no matter
    assert not policy.inline(101)
    policy.observe(100, 0.002, threaded=True)  # a slow one still turns it off
    assert not policy.inline(10)


def test_a_zero_limit_never_runs_inline() -> None:
    policy = InlinePolicy(0)
    policy.threaded()
    policy.observe(10, 0.0, threaded=True)
    assert not policy.inline(10)


def _repo(root: Path, default_models: Path) -> Path:
    # 5 ms: well above the sensor model's run even on a busy box, so it does go inline.
    for name, limit in [("onloop", 5), ("threaded", 0)]:
        (root / name).mkdir(parents=True)
        shutil.copy(default_models / "sensor-anomaly" / "model.onnx", root / name / "model.onnx")
        (root / name / "manifest.toml").write_text(
            f'name = "{name}"\nruntime = "onnx"\nfile = "model.onnx"\n\n[options]\n'
            f"threads = 1\ninline_max_ms = {limit}\n"
        )
    return root


async def _post(http: aiohttp.ClientSession, url: str, model: str, body: Any) -> tuple[int, Any]:
    async with http.post(f"{url}/v2/models/{model}/infer", json=body) as resp:
        return resp.status, await resp.json()


async def _counts(http: aiohttp.ClientSession, url: str, model: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("model", None) != model:
                continue
            timed = "duration" in sample.name and sample.name.endswith("_bucket")
            if timed or sample.name.endswith(("_sum", "_created")):
                continue  # durations and times differ; what is counted must not
            if sample.name.startswith("appliance_model_"):
                continue  # load times and file facts
            out[sample.name + repr(sorted(labels.items()))] = sample.value
    return out


async def test_inline_and_threaded_runs_answer_and_count_alike(
    tmp_path: Path, default_models: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(models={"dir": _repo(tmp_path, default_models)})
    async with serving(config) as server:
        url = base_url(server)
        bad = [
            {"inputs": [{**window(0)["inputs"][0], "shape": [1, 31, 3]}]},
            {"inputs": [{**window(0)["inputs"][0], "data": [float("nan")] * 96}]},
            {"inputs": [{**window(0)["inputs"][0], "datatype": "FP64"}]},
        ]
        answers: dict[str, list[Any]] = {}
        for model in ("onloop", "threaded"):
            answers[model] = [await _post(http, url, model, window(i)) for i in range(REQUESTS)]
            answers[model] += [await _post(http, url, model, body) for body in bad]
        for (status_a, a), (status_b, b) in zip(
            answers["onloop"], answers["threaded"], strict=True
        ):
            assert status_a == status_b
            if status_a == 200:
                assert a["outputs"] == b["outputs"]
                assert a["model_name"] == "onloop" and b["model_name"] == "threaded"
            else:
                assert a == b
        assert sum(status == 200 for status, _ in answers["onloop"]) == REQUESTS
        counted = await _counts(http, url, "onloop")
        assert any(key.startswith("appliance_batch_size_count") for key in counted)
        assert counted == await _counts(http, url, "threaded")

        assert server.core is not None
        runtimes = {
            name: server.core.models.get(name, None).ready_runtime()
            for name in ("onloop", "threaded")
        }
        size = np.zeros((1, 32, 3), np.float32).nbytes
        onloop, threaded = runtimes["onloop"], runtimes["threaded"]
        assert isinstance(onloop, OnnxRuntime) and isinstance(threaded, OnnxRuntime)
        # The first run was measured on the worker thread; the sensor model takes well under
        # 5 ms, so the later ones ran inline. The other never does.
        assert onloop.inline_policy.inline(size)
        assert not threaded.inline_policy.inline(size)
        # One thread on the CPU: runs share nothing; threaded ones are timed in CPU time.
        assert onloop.inline_policy.alone and threaded.inline_policy.alone
