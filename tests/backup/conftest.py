"""A device on disk for backup tests: configuration, keys, a model repository, the CLI."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.security.keys import hash_key, new_key
from tests.conftest import DEFAULT_MODELS, ROOT

# The hub's storage fixtures (both backends, a private PostgreSQL server), used here too.
from tests.hub.conftest import postgres_server, postgres_url, storage, storage_url  # noqa: F401

PASSPHRASE = "correct horse battery staple"


@dataclass
class Box:
    """One appliance's files: what a freshly flashed card would lose."""

    root: Path
    config: Path
    state: Path
    models: Path
    api_key: str

    def files(self) -> dict[str, bytes]:
        """Every file of the box (configuration, keys, models), by path relative to root."""
        return {
            str(p.relative_to(self.root)): p.read_bytes()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and self.state not in p.parents
        }


def make_box(root: Path, device: str, hub_url: str = "", token: str = "") -> Box:
    etc, models, state = root / "etc", root / "models", root / "state"
    etc.mkdir(parents=True)
    state.mkdir()
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", models / "sensor-anomaly")
    (etc / "data-key").write_text(secrets.token_hex(32) + "\n")
    api_key = new_key()
    (etc / "api-keys").write_text(f"ops read,infer {hash_key(api_key)}\n")
    hub = ""
    if hub_url:
        (etc / "hub-token").write_text(token + "\n")
        hub = (
            f'[hub]\nurl = "{hub_url}"\ntoken_file = "{etc / "hub-token"}"\n'
            "heartbeat_interval = 0.1\nbackoff_initial = 0.1\nbackoff_max = 0.5\n"
        )
    config = etc / "appliance.toml"
    config.write_text(
        "# the box's own file: comments stay\n"
        f'[device]\nid = "{device}"\nname = "Box {device}"\n\n'
        f'[models]\ndir = "{models}"\n\n'
        f'[security]\nauth = "on"\nkeys_file = "{etc / "api-keys"}"\n'
        f'data_key_file = "{etc / "data-key"}"\n\n'
        "[health]\ninterval = 0.1\n\n" + hub
    )
    return Box(root, config, state, models, api_key)


def cli(*args: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ARGS`` with its own state directory and nothing else inherited."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    full.update(STATE_DIRECTORY=str(state), APPLIANCE_MDNS__ENABLED="false", **env)
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=ROOT,
        timeout=120,
    )


def passphrase_file(directory: Path, text: str = PASSPHRASE) -> Path:
    path = directory / f"pass-{secrets.token_hex(4)}"
    path.write_text(text + "\n")
    return path
