"""The discovery client against real announcing daemons: picking, spreading, following.

Daemons run in-process (``serving``) or as subprocesses, inside a fresh network namespace
whose loopback carries multicast; the in-process parts run on a thread that entered the
namespace (``Netns.call``), so no socket of these tests ever touches the machine's own
interfaces.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from appliance.client import (
    ApplianceBrowser,
    AsyncApplianceBrowser,
    DiscoveryTimeout,
    NoApplianceAvailable,
)
from appliance.config import Config
from tests.conftest import DEFAULT_MODELS, make_config, serving
from tests.ops.netns import (
    assert_no_new_threads,
    daemons_in,
    loopback,
    port_of,
    thread_names,
)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = thread_names()
    yield
    assert_no_new_threads(before)


def _config(device_id: str, name: str, **models: Any) -> Config:
    return make_config(
        device={"id": device_id, "name": name},
        mdns={"interfaces": ["lo"]},
        mqtt={"enabled": False},
        models=models,
    )


def _no_tasks_left() -> None:
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current]
    assert not left, f"tasks left running: {left}"


def test_picks_ready_appliances_serving_a_model_and_spreads_requests(stories_gguf: Path) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            s1 = await stack.enter_async_context(
                serving(_config("story-1", "Story 1", files=[stories_gguf]))
            )
            s2_stack = await stack.enter_async_context(contextlib.AsyncExitStack())
            s2 = await s2_stack.enter_async_context(
                serving(_config("story-2", "Story 2", files=[stories_gguf]))
            )
            s3 = await stack.enter_async_context(
                serving(_config("sensor-3", "Sensor 3", dir=DEFAULT_MODELS))
            )
            fleet = await stack.enter_async_context(AsyncApplianceBrowser(interfaces=["lo"]))

            both = await fleet.wait_for("stories260K", count=2, timeout=30)
            assert sorted(a.device_id for a in both) == ["story-1", "story-2"]
            sensors = await fleet.wait_for("sensor-anomaly", timeout=30)
            assert [(a.device_id, a.port) for a in sensors] == [("sensor-3", s3.port)]
            with pytest.raises(NoApplianceAvailable, match="'no-such-model'"):
                fleet.pick("no-such-model")

            # One-off picks rotate.
            urls = [fleet.base_url("stories260K") for _ in range(4)]
            story_urls = {f"http://127.0.0.1:{s.port}/v1" for s in (s1, s2)}
            assert set(urls) == story_urls
            assert urls[0] != urls[1] and urls[:2] == urls[2:]

            # Held requests go to the least busy appliance.
            with fleet.lease("stories260K") as first, fleet.lease("stories260K") as second:
                assert first.device_id != second.device_id
                with fleet.lease("stories260K") as third:
                    assert fleet.pool.outstanding(third) == 2
                    with fleet.lease("stories260K") as fourth:
                        assert fourth.device_id != third.device_id
            assert fleet.pool.outstanding(first) == fleet.pool.outstanding(second) == 0

            # Real requests, four at once, spread over both appliances.
            async with aiohttp.ClientSession() as http:

                async def complete() -> str:
                    with fleet.lease("stories260K") as appliance:
                        async with http.post(
                            appliance.openai_base_url + "/completions",
                            json={
                                "model": "stories260K",
                                "prompt": "Once upon a time",
                                "max_tokens": 4,
                            },
                        ) as resp:
                            assert resp.status == 200, await resp.text()
                        return appliance.device_id

                served = await asyncio.gather(*(complete() for _ in range(4)))
            assert collections.Counter(served) == {"story-1": 2, "story-2": 2}

            # The official OpenAI client, pointed at the base URL the browser gives.
            client = openai.AsyncOpenAI(
                base_url=fleet.base_url("stories260K"), api_key="unused", max_retries=0
            )
            async with client:
                chat = await client.chat.completions.create(
                    model="stories260K",
                    max_tokens=8,
                    messages=[{"role": "user", "content": "Once upon a time"}],
                )
            assert chat.choices[0].message.content

            # One leaves (goodbye): the set follows and every pick is the other.
            await s2_stack.aclose()
            await fleet.wait_until(
                lambda apps: "story-2" not in {a.device_id for a in apps}, timeout=10
            )
            assert {fleet.pick("stories260K").device_id for _ in range(4)} == {"story-1"}
            assert fleet.base_url("stories260K") == f"http://127.0.0.1:{s1.port}/v1"
        _no_tasks_left()

    with loopback("client") as ns:
        ns.call(lambda: asyncio.run(scenario()))


def _slow_repository(root: Path) -> Path:
    """``a-slow`` (a 1 TiB sparse file the checksum check reads until it is truncated) and a
    copy of ``sensor-anomaly``, which loads only after it."""
    slow = root / "a-slow"
    slow.mkdir(parents=True)
    with (slow / "model.onnx").open("wb") as fh:
        fh.truncate(1 << 40)
    (slow / "manifest.toml").write_text(
        f'name = "a-slow"\nruntime = "onnx"\nfile = "model.onnx"\nsha256 = "{"0" * 64}"\n'
    )
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", root / "b-sensor")
    return slow / "model.onnx"


def test_an_appliance_is_picked_only_once_it_is_ready(tmp_path: Path) -> None:
    big = _slow_repository(tmp_path / "models")

    async def scenario() -> None:
        try:
            async with (
                serving(
                    _config("slow-1", "Slow", dir=tmp_path / "models"), wait_loaded=False
                ) as server,
                AsyncApplianceBrowser(interfaces=["lo"]) as fleet,
            ):
                await fleet.wait_until(
                    lambda apps: any(a.device_id == "slow-1" for a in apps), timeout=30
                )
                seen = fleet.get("slow-1")
                assert seen is not None and not seen.ready and seen.models == ()
                with pytest.raises(NoApplianceAvailable):
                    fleet.pick("sensor-anomaly")
                with pytest.raises(DiscoveryTimeout):
                    await fleet.wait_for("sensor-anomaly", timeout=0.5)

                big.write_bytes(b"")  # the checksum read ends: a-slow fails, b-sensor loads
                (ready,) = await fleet.wait_for("sensor-anomaly", timeout=30)
                assert ready.device_id == "slow-1" and ready.port == server.port
                assert ready.models == ("sensor-anomaly",)
        finally:
            big.write_bytes(b"")  # never leave a worker thread hashing a terabyte
        _no_tasks_left()

    with loopback("ready") as ns:
        ns.call(lambda: asyncio.run(scenario()))


def test_blocking_browser_gives_the_openai_client_its_base_url(stories_gguf: Path) -> None:
    with (
        loopback("sync") as ns,
        daemons_in(
            ns,
            [
                {
                    "APPLIANCE_DEVICE__ID": "story-9",
                    "APPLIANCE_DEVICE__NAME": "Story 9",
                    "APPLIANCE_MDNS__INTERFACES": "lo",
                }
            ],
            "--model",
            str(stories_gguf),
        ) as (daemon,),
    ):

        def use() -> str:
            with ApplianceBrowser(interfaces=["lo"]) as fleet:
                (found,) = fleet.wait_for("stories260K", timeout=30)
                assert (found.device_id, found.port) == ("story-9", port_of(daemon))
                with openai.OpenAI(
                    base_url=fleet.base_url("stories260K"), api_key="unused", max_retries=0
                ) as client:
                    result = client.completions.create(
                        model="stories260K", prompt="Once upon a time", max_tokens=12, temperature=0
                    )
                return result.choices[0].text

        assert ns.call(use).startswith(", there was a little girl named Lily.")


def test_a_trimmed_model_list_is_completed_over_http(tmp_path: Path) -> None:
    names = [f"sensor-anomaly-replica-with-a-long-name-{i:02d}" for i in range(10)]
    for name in names:
        (tmp_path / name).mkdir()
        shutil.copy(DEFAULT_MODELS / "sensor-anomaly" / "model.onnx", tmp_path / name)
        (tmp_path / name / "manifest.toml").write_text(
            f'name = "{name}"\nruntime = "onnx"\nfile = "model.onnx"\n'
        )

    async def scenario() -> None:
        async with (
            serving(_config("many-1", "Many", dir=tmp_path)),
            AsyncApplianceBrowser(interfaces=["lo"]) as fleet,
        ):
            (found,) = await fleet.wait_for(names[-1], timeout=30)
            assert found.models == tuple(names) and found.models_complete
            assert found.txt["nmodels"] == "10"
            assert len(found.txt["models"].split(",")) < 10  # what the TXT record held
        _no_tasks_left()

    with loopback("many") as ns:
        ns.call(lambda: asyncio.run(scenario()))
