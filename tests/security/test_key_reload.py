"""Key rotation without a restart: SIGHUP to a running daemon re-reads the API keys of the
configuration file, ``security.keys_file`` and ``$CREDENTIALS_DIRECTORY/api-keys``; a file
that does not parse keeps the keys in use and says what is wrong."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.errors import ConfigError
from appliance.security.access import build
from appliance.security.keys import hash_key, new_key
from tests.conftest import DaemonProcess, daemon


def _status(url: str, key: str) -> int:
    request = urllib.request.Request(url + "/v2", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _config(path: Path, keys_file: Path, name: str, key: str) -> None:
    path.write_text(
        f'[security]\nauth = "on"\nkeys_file = "{keys_file}"\n\n'
        f'[[security.keys]]\nname = "{name}"\nscopes = ["read"]\n'
        f'hash = "{hash_key(key)}"\n'
    )


def _hangup(proc: DaemonProcess, expect: str, timeout: float = 20) -> str:
    """SIGHUP, then the first new log line containing ``expect``."""
    seen = len(proc.log)
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log[seen:]:
            if expect in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {expect!r} after SIGHUP:\n" + "\n".join(proc.log[seen:]))


def test_sighup_rotates_keys_from_every_source(tmp_path: Path, default_models: Path) -> None:
    config, keys_file, creds = tmp_path / "appliance.toml", tmp_path / "keys", tmp_path / "creds"
    creds.mkdir()
    old = {"config-a": new_key(), "file-b": new_key(), "cred-c": new_key()}
    new = {"config-d": new_key(), "file-e": new_key(), "cred-f": new_key()}
    _config(config, keys_file, "config-a", old["config-a"])
    keys_file.write_text(f"file-b read {hash_key(old['file-b'])}\n")
    (creds / "api-keys").write_text(f"cred-c read {hash_key(old['cred-c'])}\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    # ready: rotation on a box that serves (models loaded), as in the field.
    with daemon("--config", str(config), "--models-dir", str(default_models), env=env) as proc:
        url = proc.url
        assert all(_status(url, key) == 200 for key in old.values())
        assert all(_status(url, key) == 401 for key in new.values())

        # Every source changes: the old keys go, new ones come, no restart.
        _config(config, keys_file, "config-d", new["config-d"])
        keys_file.write_text(f"file-e read {hash_key(new['file-e'])}\n")
        (creds / "api-keys").write_text(f"cred-f read {hash_key(new['cred-f'])}\n")
        line = _hangup(proc, "API keys reloaded")
        assert "added: config-d, cred-f, file-e" in line
        assert "removed: config-a, cred-c, file-b" in line
        assert all(_status(url, key) == 401 for key in old.values())
        assert all(_status(url, key) == 200 for key in new.values())
        assert not any(key in "\n".join(proc.log) for key in [*old.values(), *new.values()])

        # A broken key file: the error names it and the line; the keys in use stay.
        keys_file.write_text(f"file-e read {hash_key(new['file-e'])}\nnot a key line\n")
        line = _hangup(proc, "API keys NOT reloaded")
        assert "ERROR" in line and str(keys_file) in line and "line 2" in line
        assert all(_status(url, key) == 200 for key in new.values())

        # A configuration file that is not TOML at all: the same.
        keys_file.write_text(f"file-e read {hash_key(new['file-e'])}\n")
        config.write_text("[security\nauth = on\n")
        line = _hangup(proc, "API keys NOT reloaded")
        assert "not valid TOML" in line
        assert all(_status(url, key) == 200 for key in new.values())

        # Fixed again, with the file key's scope narrowed: read only → admin.
        _config(config, keys_file, "config-d", new["config-d"])
        keys_file.write_text(f"file-e admin {hash_key(new['file-e'])}\n")
        line = _hangup(proc, "API keys reloaded")
        assert "changed: file-e" in line

        # Two reloads back to back, the second perhaps while the first still runs (it
        # re-reads the models too): the second is never dropped, the last state wins.
        extra = new_key()
        keys_file.write_text(f"file-g read {hash_key(extra)}\n")
        proc.proc.send_signal(signal.SIGHUP)
        keys_file.write_text(f"file-e read {hash_key(new['file-e'])}\n")
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while (_status(url, new["file-e"]), _status(url, extra)) != (200, 401):
            assert time.monotonic() < deadline, "\n".join(proc.log[-10:])
            time.sleep(0.05)
        assert proc.proc.poll() is None  # SIGHUP never stopped the daemon


def test_a_reload_without_keys_falls_back_to_the_generated_one(tmp_path: Path) -> None:
    """Keys stay required (decided at start); removing every key revokes them all and
    leaves only the generated admin key, as a start on a LAN address would."""
    keys_file, key = tmp_path / "keys", new_key()
    keys_file.write_text(f"only read {hash_key(key)}\n")
    config = config_mod.SecurityConfig(keys_file=keys_file)
    policy = build(config, binds=["0.0.0.0"], env={}, state_dir=tmp_path / "state")
    assert policy.store.verify(key) is not None
    assert not (tmp_path / "state" / "api-key").exists()
    keys_file.write_text("# every key revoked\n")
    policy.reload_keys(config)
    assert policy.store.verify(key) is None
    generated = (tmp_path / "state" / "api-key").read_text().strip()
    found = policy.store.verify(generated)
    assert found is not None and found.allows("admin")
    keys_file.unlink()  # unreadable: an error, and the keys in use stay
    with pytest.raises(ConfigError, match="cannot read"):
        policy.reload_keys(config)
    assert policy.store.verify(generated) is not None
