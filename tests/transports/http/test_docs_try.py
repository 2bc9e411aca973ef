"""The docs page as a person meets it: opened in a browser with no key (the reference is
no secret), then "Try it" with a key typed into the page, in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from appliance.security.keys import hash_key
from tests.browser import CHROMIUM, browser
from tests.conftest import base_url, make_config, serving

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
]

KEY = "apk_docs-try-it-key-0123456789abcdefghij"
SHOTS = Path(os.environ["TEST_SCREENSHOTS"]) if os.environ.get("TEST_SCREENSHOTS") else None


async def test_docs_open_without_a_key_and_try_it_sends_the_typed_key(
    default_models: Path, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(
        models={"dir": str(default_models)},
        security={
            "auth": "on",
            "keys": [{"name": "reader", "scopes": ["read", "infer"], "hash": hash_key(KEY)}],
        },
    )
    async with serving(config) as server:
        url = base_url(server)
        for path in ("/docs", "/openapi.json"):
            async with http.get(url + path) as response:
                assert response.status == 200, path
        async with http.get(url + "/v1/models") as response:
            assert response.status == 401  # the API itself still needs the key

        async with browser(tmp_path / "profile") as page:
            await page.goto(url + "/docs")
            models = "#op-listModels"
            assert await page.evaluate(f"document.querySelector('{models}') !== null")
            # Without a key the box answers 401, and the page shows it.
            await page.click(f"{models} details.try summary")
            await page.click(f"{models} form.try button")
            await page.wait_for(f"document.querySelector('{models} pre.try-out').dataset.status")
            assert (
                await page.evaluate(
                    f"document.querySelector('{models} pre.try-out').dataset.status"
                )
                == "401"
            )
            # With the key typed into the header, the same button lists the models.
            await page.type("#api-key", KEY)
            await page.click(f"{models} form.try button")
            await page.wait_for(
                f"document.querySelector('{models} pre.try-out').dataset.status === '200'"
            )
            listed = await page.evaluate(
                f"document.querySelector('{models} pre.try-out').textContent"
            )
            assert "sensor-anomaly" in listed and "home-intent" in listed
            # A POST with the documented example body: an inference on the default model.
            infer = await page.evaluate(
                "[...document.querySelectorAll('form.try')].find(f => f.dataset.path === "
                "'/v2/models/{name}/infer').closest('article').id"
            )
            await page.click(f"#{infer} details.try summary")
            await page.evaluate(
                f"document.querySelector('#{infer} input[name=name]').value = 'sensor-anomaly'"
            )
            body = await page.evaluate(f"document.querySelector('#{infer} textarea').value")
            assert json.loads(body)["inputs"]
            await page.click(f"#{infer} form.try button")
            await page.wait_for(f"document.querySelector('#{infer} pre.try-out').dataset.status")
            status = await page.evaluate(
                f"document.querySelector('#{infer} pre.try-out').dataset.status"
            )
            answer = await page.evaluate(
                f"document.querySelector('#{infer} pre.try-out').textContent"
            )
            assert status == "200", answer
            assert '"outputs"' in answer
            # The key stays in the tab: reloading keeps it in the box.
            await page.goto(url + "/docs")
            assert await page.evaluate("document.getElementById('api-key').value") == KEY
            await page.click(f"{models} details.try summary")
            await page.click(f"{models} form.try button")
            await page.wait_for(
                f"document.querySelector('{models} pre.try-out').dataset.status === '200'"
            )
            await page.evaluate(f"document.querySelector('{models}').scrollIntoView()")
            shot = tmp_path / "docs-try.png"
            await page.screenshot(shot, full_page=False)
    assert shot.read_bytes().startswith(b"\x89PNG")
    if SHOTS:
        shutil.copy(shot, SHOTS / "docs-try.png")
