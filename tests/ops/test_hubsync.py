"""The hub uploader's own decisions: the token, the backoff, alerts from before it started."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.ops.hubsync import HubSync, resolve_token
from tests.conftest import DEFAULT_MODELS, make_config, serving, start_daemon, wait_for
from tests.hub.conftest import free_port

pytestmark = pytest.mark.timeout(60)


def test_token_sources(tmp_path: Path) -> None:
    cfg = make_config(hub={"url": "http://hub:8090", "token": " direct "})
    assert resolve_token(cfg, {}) == "direct"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    cfg = make_config(hub={"url": "http://hub:8090", "token_file": token_file})
    assert resolve_token(cfg, {"CREDENTIALS_DIRECTORY": "/nowhere"}) == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hub-token").write_text("from-systemd")
    cfg = make_config(hub={"url": "http://hub:8090"})
    assert resolve_token(cfg, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-systemd"
    with pytest.raises(ConfigError, match=r"hub.url = 'http://hub:8090' is set but no device"):
        resolve_token(cfg, {})
    (creds / "hub-token").write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        resolve_token(cfg, {"CREDENTIALS_DIRECTORY": str(creds)})
    cfg = make_config(hub={"url": "http://hub:8090", "token_file": tmp_path / "missing"})
    with pytest.raises(ConfigError, match="cannot read the hub token"):
        resolve_token(cfg, {})


def test_the_daemon_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    proc = start_daemon(
        "--models-dir",
        str(tmp_path / "models"),
        env={
            "APPLIANCE_HUB__URL": "http://127.0.0.1:9",
            "APPLIANCE_HUB__OUTBOX_PATH": str(tmp_path / "outbox.db"),
        },
    )
    proc.proc.wait(timeout=60)
    assert proc.stop() == 2
    assert any("is set but no device token is" in line for line in proc.log), proc.log


async def test_backoff_is_exponential_capped_and_jittered(tmp_path: Path) -> None:
    config = make_config(
        hub={
            "url": "http://127.0.0.1:9",
            "token": "t",
            "backoff_initial": 0.5,
            "backoff_max": 8,
            "outbox_path": tmp_path / "o.db",
        }
    )
    async with serving(config) as server:
        assert server.health is not None
        sync = HubSync(config, server.health, None)
        for failures, step in [(1, 0.5), (2, 1), (3, 2), (4, 4), (5, 8), (6, 8), (40, 8)]:
            sync.failures = failures
            delays = [sync._backoff() for _ in range(50)]
            assert all(step / 2 <= d <= step for d in delays)
            assert max(delays) - min(delays) > 0  # jitter spreads a fleet's retries
        sync.failures = 1
        assert 4 <= sync._backoff(unauthorised=True) <= 8


async def test_alerts_that_fired_before_the_uploader_started_are_queued(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", repo / "sensor-anomaly")
    (repo / "broken").mkdir()
    (repo / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "gone.onnx"\n', encoding="utf-8"
    )
    config = make_config(
        models={"dir": repo}, health={"interval": 0.05}, alerts={"model_load_failures_threshold": 0}
    )
    hub = make_config(
        hub={
            "url": f"http://127.0.0.1:{free_port()}",
            "token": "t",
            "backoff_initial": 60,
            "outbox_path": tmp_path / "o.db",
        }
    ).hub
    async with serving(config) as server:
        engine = server.alerts
        assert server.health is not None and engine is not None
        await wait_for(lambda: bool(engine.active()))
        # An uploader that starts after the alert fired must still queue it.
        late = HubSync(config.model_copy(update={"hub": hub}), server.health, engine)
        async with late:
            await wait_for(lambda: late.outbox.records >= 3)
            kinds = [
                (r.kind, r.body.get("rule") or r.body.get("type"))
                for r in await late.outbox.peek(10)
            ]
    assert kinds[0] == ("event", "started")
    assert ("alert", "model_load_failures") in kinds
