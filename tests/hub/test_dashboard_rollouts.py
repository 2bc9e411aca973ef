"""The dashboard's rollouts view in a real headless Chromium, on a real hub rolling a real
new model version out to two real daemons: it shows the rollout, its waves and each
device's progress, and its Halt, Resume and Roll back buttons act through the REST API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.browser import CHROMIUM, Page, browser
from tests.hub.rollout_parts import (
    build_version,
    call,
    hub_and_fleet,
    poll,
    publish,
    setting,
    traffic,
)

pytestmark = pytest.mark.timeout(240)

SHOTS = Path(os.environ["TEST_SCREENSHOTS"]) if os.environ.get("TEST_SCREENSHOTS") else None


def card(rollout: str, inner: str = "") -> str:
    """A JS expression for an element of the rollout's card (null when it is not there)."""
    return f"document.querySelector({json.dumps(f'[data-rollout={rollout!r}] {inner}'.strip())})"


async def click_and_wait(page: Page, rollout: str, action: str, state: str) -> None:
    await page.wait_for(f"{card(rollout, f'button[data-action={action}]')} !== null")
    await page.click(f"[data-rollout='{rollout}'] button[data-action={action}]")
    await page.wait_for(f"{card(rollout)}?.dataset.state === {json.dumps(state)}", timeout=60)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_rollouts_view_shows_progress_and_halts(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2"))
    with (
        hub_and_fleet(tmp_path, storage, env, ["dev-a", "dev-b"]) as (proc, devices),
        traffic(devices),
    ):
        rollouts = f"{proc.url}/api/v1/rollouts"
        # Two waves and a long soak: wave 1 goes healthy, then the rollout waits there.
        code, doc = call(
            rollouts,
            {"artifact": artifact, "target": {"all": True}, "waves": ["1", "100%"], "soak": 3600},
        )
        assert code == 201, doc
        rid = doc["id"]
        first, second = (d["device_id"] for d in doc["devices"])

        def rest() -> dict[str, Any]:
            got: dict[str, Any] = call(f"{rollouts}/{rid}")[1]
            return got

        poll("wave 1 healthy", lambda: rest()["devices"][0]["state"] == "healthy", timeout=120)
        async with browser(tmp_path / "profile") as page:
            await page.goto(proc.url + "/")
            await page.wait_for(
                f"{card(rid, f'tr[data-device={first!r}]')}?.dataset.state === 'healthy'"
            )
            assert await page.evaluate(f"{card(rid)}.dataset.state") == "running"
            text = await page.evaluate(f"{card(rid)}.innerText")
            assert "sensor-anomaly 2" in text and "wave 1 of 2" in text, text
            assert "canary promoted" in text, "the device's reason is shown"
            row = await page.evaluate(f"{card(rid, f'tr[data-device={second!r}]')}.dataset.state")
            assert row == "pending"
            waves = await page.evaluate(
                f"[...{card(rid)}.querySelectorAll('.waves li')].map(w => w.dataset.state)"
            )
            assert waves == ["running", "waiting"]
            buttons = await page.evaluate(
                f"[...{card(rid)}.querySelectorAll('button')].map(b => b.dataset.action)"
            )
            assert buttons == ["halt", "rollback"], "no Resume while it runs"
            await page.screenshot(tmp_path / "rollouts.png")

            await click_and_wait(page, rid, "halt", "halted")
            assert rest()["state"] == "halted" and rest()["reason"] == "halted by an operator"
            text = await page.evaluate(f"{card(rid)}.innerText")
            assert "halted by an operator" in text
            assert await page.evaluate(f"{card(rid, 'button[data-action=halt]')}") is None

            await click_and_wait(page, rid, "resume", "running")
            assert rest()["state"] == "running"

            # The device's own page: its model version, as the rollouts know it.
            await page.goto(f"{proc.url}/#/devices/{first}")
            await page.wait_for("document.getElementById('model-versions') !== null")
            versions = await page.evaluate("document.getElementById('model-versions').textContent")
            assert versions == "sensor-anomaly 2", versions
            assert await page.evaluate(f"{card(rid)} !== null"), "its rollouts are listed there"

            await page.goto(proc.url + "/")
            await click_and_wait(page, rid, "rollback", "rolled_back")
            doc = rest()
            assert doc["state"] == "rolled_back"
            states = {d["device_id"]: d["state"] for d in doc["devices"]}
            assert states == {first: "rolled_back", second: "cancelled"}
            await page.wait_for(
                f"{card(rid, f'tr[data-device={first!r}]')}?.dataset.state === 'rolled_back'"
            )
            reasons = await page.evaluate(
                f"[...{card(rid)}.querySelectorAll('td.reason')].map(c => c.textContent)"
            )
            assert all(reasons), reasons
            assert await page.evaluate(f"{card(rid)}.querySelectorAll('button').length") == 0
            await page.screenshot(tmp_path / "rolled-back.png")
        await asyncio.to_thread(poll, "dev-a back on 1", lambda: devices[0].serving() == "1")
    if SHOTS:
        for name in ("rollouts.png", "rolled-back.png"):
            shutil.copy(tmp_path / name, SHOTS / f"hub-{name}")
