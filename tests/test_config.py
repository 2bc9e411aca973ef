"""``appliance.config.load``: defaults < file < environment < flags, and errors that explain.

Unit tests of the one validated configuration: every source is given explicitly (``path``,
``env``, ``overrides``), so nothing here depends on the environment the tests run in.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.config import default_device_id, default_models_dir, load
from appliance.errors import ConfigError
from tests.conftest import ROOT

DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MACHINE_ID = "4f1c6d0b9e2a4c55b8d7a1e3f0c29b64"


def toml(tmp_path: Path, text: str, name: str = "appliance.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(**kwargs)
    return str(caught.value)


# ------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = load(env={})
    assert (config.http.host, config.http.port) == ("0.0.0.0", 8080)
    assert config.http.max_body_bytes == 16 * 1024 * 1024
    assert (config.models.queue_size, config.models.parallel) == (8, None)
    assert config.models.files == []
    assert config.logging.level == "info"
    assert config.logging.log_payloads is False


def test_models_dir_defaults_to_the_shipped_models() -> None:
    config = load(env={})
    assert config.models.dir == default_models_dir()
    assert (config.models.dir / "sensor-anomaly" / "manifest.toml").is_file()
    if not (ROOT / "appliance" / "default_models").is_dir():  # a source checkout
        assert config.models.dir == ROOT / "models"


def test_models_dir_is_not_defaulted_when_files_are_given(tmp_path: Path) -> None:
    only_files = load(env={}, overrides={"models": {"files": [tmp_path / "a.gguf"]}})
    assert only_files.models.dir is None
    both = load(env={}, overrides={"models": {"files": [tmp_path / "a.gguf"], "dir": tmp_path}})
    assert both.models.dir == tmp_path


def test_without_env_the_process_environment_is_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APPLIANCE_HTTP__PORT", "1234")
    assert load().http.port == 8080
    assert load(env={"APPLIANCE_HTTP__PORT": "1234"}).http.port == 1234


# ----------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("file", "env", "flag", "port"),
    [
        (False, False, False, 8080),
        (True, False, False, 1000),
        (False, True, False, 2000),
        (True, True, False, 2000),
        (False, False, True, 3000),
        (True, False, True, 3000),
        (True, True, True, 3000),
    ],
    ids=["defaults", "file", "env", "env-over-file", "flag", "flag-over-file", "flag-over-all"],
)
def test_precedence_defaults_file_env_flags(
    tmp_path: Path, file: bool, env: bool, flag: bool, port: int
) -> None:
    path = toml(tmp_path, "[http]\nport = 1000\n") if file else None
    config = load(
        path=path,
        env={"APPLIANCE_HTTP__PORT": "2000"} if env else {},
        overrides={"http": {"port": 3000}} if flag else None,
    )
    assert config.http.port == port


def test_layers_merge_key_by_key(tmp_path: Path) -> None:
    path = toml(tmp_path, '[http]\nhost = "127.0.0.9"\nport = 1000\n[models]\nqueue_size = 3\n')
    config = load(
        path=path, env={"APPLIANCE_HTTP__PORT": "2000"}, overrides={"logging": {"level": "debug"}}
    )
    assert config.http.host == "127.0.0.9"  # file only
    assert config.http.port == 2000  # environment over file
    assert config.models.queue_size == 3  # file only, other section
    assert config.logging.level == "debug"  # flag only
    assert config.http.max_body_bytes == 16 * 1024 * 1024  # nobody: default


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    named = toml(tmp_path, "[http]\nport = 1000\n", "named.toml")
    given = toml(tmp_path, "[http]\nport = 1500\n", "given.toml")
    env = {"APPLIANCE_CONFIG": str(named)}
    assert load(env=env).http.port == 1000
    assert load(path=given, env=env).http.port == 1500  # --config wins over $APPLIANCE_CONFIG


# ---------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("value", "files"),
    [
        ("a.gguf", ["a.gguf"]),
        ("a.gguf,b.onnx", ["a.gguf", "b.onnx"]),
        (" a.gguf , b.onnx ,, c.gguf,", ["a.gguf", "b.onnx", "c.gguf"]),
        ("", []),
    ],
    ids=["one", "two", "spaces-and-empties", "empty"],
)
def test_list_values_from_env_are_comma_separated(value: str, files: list[str]) -> None:
    config = load(env={"APPLIANCE_MODELS__FILES": value})
    assert config.models.files == [Path(f) for f in files]


def test_env_values_are_converted_to_the_field_type() -> None:
    config = load(
        env={
            "APPLIANCE_HTTP__PORT": "0",
            "APPLIANCE_LOGGING__LOG_PAYLOADS": "true",
            "APPLIANCE_MODELS__RETRY_AFTER": "2.5",
            "APPLIANCE_LOGGING__LEVEL": "warning",
        }
    )
    assert config.http.port == 0
    assert config.logging.log_payloads is True
    assert config.models.retry_after == 2.5
    assert config.logging.level == "warning"


def test_env_ignores_variables_that_are_not_settings() -> None:
    config = load(
        env={
            "PATH": "/usr/bin",
            "HTTP__PORT": "1",
            "APPLIANCE_DEBUG": "1",
            "APPLIANCE_CONFIG": "",
            "appliance_http__port": "2",
        }
    )
    assert config.http.port == 8080


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            {"env": {"APPLIANCE_HTTP__PORT": "abc"}},
            [
                "http.port = 'abc'",
                "(from environment variable APPLIANCE_HTTP__PORT)",
                "allowed: integer (>= 0, <= 65535)",
            ],
        ),
        (
            {"file": '[http]\nport = "x"\n'},
            ["http.port = 'x'", "(from {file})", "allowed: integer (>= 0, <= 65535)"],
        ),
        (
            {"overrides": {"http": {"port": 70000}}},
            [
                "http.port = 70000",
                "(from command line)",
                "less than or equal to 65535",
                "allowed: integer (>= 0, <= 65535)",
            ],
        ),
        (
            {"file": "[models]\nretry_after = nan\n"},
            ["models.retry_after = nan", "(from {file})", "finite number", "allowed: number"],
        ),
        (
            {"env": {"APPLIANCE_MODELS__QUEUE_SIZE": "-1"}},
            ["models.queue_size = '-1'", "APPLIANCE_MODELS__QUEUE_SIZE", ">= 0"],
        ),
        (
            {"env": {"APPLIANCE_LOGGING__LEVEL": "loud"}},
            [
                "logging.level = 'loud'",
                "APPLIANCE_LOGGING__LEVEL",
                "allowed: 'debug' | 'info' | 'warning' | 'error'",
            ],
        ),
        (
            {"env": {"APPLIANCE_DEVICE__ID": "Shed_Pi"}},
            ["device.id = 'Shed_Pi'", "APPLIANCE_DEVICE__ID", "matching"],
        ),
        (
            {"file": "[http]\nportt = 8080\n"},
            [
                "http.portt = 8080",
                "(from {file})",
                "unknown key",
                "allowed keys: host, port, max_body_bytes, shutdown_timeout",
            ],
        ),
        (
            {"overrides": {"models": {"queue": 3}}},
            ["models.queue = 3", "(from command line)", "unknown key", "allowed keys: dir, files"],
        ),
        (
            {"env": {"APPLIANCE_HTTP__PROT": "1"}},
            [
                "environment variable APPLIANCE_HTTP__PROT",
                "unknown key 'prot' in [http]",
                "allowed keys: host, port",
            ],
        ),
        (
            {"env": {"APPLIANCE_HTPP__PORT": "1"}},
            [
                "environment variable APPLIANCE_HTPP__PORT",
                "unknown section 'htpp'",
                "allowed sections: device, http, models, logging",
            ],
        ),
        (
            {"file": "[htpp]\nport = 1\n"},
            [
                "config file {file}",
                "unknown section 'htpp'",
                "allowed sections: device, http, models, logging",
            ],
        ),
        ({"file": "http = 5\n"}, ["config file {file}", "'http' must be a [http] table"]),
        ({"file": "[http\n"}, ["config file {file} is not valid TOML"]),
    ],
    ids=[
        "env-type",
        "file-type",
        "flag-range",
        "file-nan",
        "env-range",
        "env-enum",
        "env-pattern",
        "file-unknown-key",
        "flag-unknown-key",
        "env-unknown-key",
        "env-unknown-section",
        "file-unknown-section",
        "file-not-a-table",
        "file-not-toml",
    ],
)
def test_errors_name_key_value_source_and_what_is_allowed(
    tmp_path: Path, source: dict[str, Any], expected: list[str]
) -> None:
    path = toml(tmp_path, source["file"]) if "file" in source else None
    message = error_of(path=path, env=source.get("env", {}), overrides=source.get("overrides"))
    for text in expected:
        assert text.replace("{file}", str(path)) in message, message


def test_every_invalid_value_is_reported_at_once(tmp_path: Path) -> None:
    path = toml(tmp_path, "[http]\nport = -1\n[models]\nqueue_size = -2\n")
    message = error_of(path=path, env={"APPLIANCE_LOGGING__LEVEL": "loud"})
    assert "http.port = -1" in message
    assert "models.queue_size = -2" in message
    assert "logging.level = 'loud'" in message


def test_missing_config_file(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    message = error_of(path=absent, env={})
    assert f"cannot read config file {absent}" in message
    assert error_of(env={"APPLIANCE_CONFIG": str(absent)}) == message


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"http\.port = 'abc'"):
        load(env={"APPLIANCE_HTTP__PORT": "abc"})


def test_resolved_config_is_immutable() -> None:
    config = load(env={})
    with pytest.raises(ValidationError):
        config.http.port = 1
    assert config.http.port == 8080


# ------------------------------------------------------------------------ device id


def test_device_id_is_derived_stably_from_the_machine_id(tmp_path: Path) -> None:
    machine_id = toml(tmp_path, MACHINE_ID + "\n", "machine-id")
    first = default_device_id(machine_id)
    assert first == default_device_id(machine_id)
    assert DEVICE_ID.match(first)
    assert first.startswith("appliance-")
    # Never the raw machine id (systemd asks applications not to expose it), nor part of it.
    assert first != MACHINE_ID
    assert MACHINE_ID[:8] not in first
    assert MACHINE_ID[-8:] not in first
    # Surrounding whitespace is not part of the id.
    assert default_device_id(toml(tmp_path, f"  {MACHINE_ID}\n\n", "padded")) == first


def test_different_machines_get_different_device_ids(tmp_path: Path) -> None:
    other = MACHINE_ID[:-1] + "5"
    assert default_device_id(toml(tmp_path, MACHINE_ID, "a")) != default_device_id(
        toml(tmp_path, other, "b")
    )


@pytest.mark.parametrize("content", [None, "", "\n"], ids=["missing", "empty", "blank"])
def test_device_id_falls_back_to_the_hostname(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "machine-id"
    if content is not None:
        path.write_text(content, encoding="ascii")
    device_id = default_device_id(path)
    assert DEVICE_ID.match(device_id)
    hostname = socket.gethostname().lower()
    if re.fullmatch(r"[a-z0-9][a-z0-9-]*", hostname):  # already a valid id: used as it is
        assert device_id == hostname[:63]


@pytest.mark.parametrize(
    "hostname",
    ["Café-Box", "ÜBER.local", "-edge_box-", "日本", "x" * 80, "", "a" * 62 + "-b"],
)
def test_hostname_fallback_is_always_a_valid_device_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostname: str
) -> None:
    # The one stand-in here: the machine's hostname cannot be changed by a test.
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    device_id = default_device_id(tmp_path / "no-machine-id")
    assert DEVICE_ID.match(device_id), device_id
    assert device_id == default_device_id(tmp_path / "no-machine-id")
    # And the resolved configuration accepts it as its own device.id.
    config = load(env={"APPLIANCE_DEVICE__ID": device_id})
    assert config.device.id == device_id


def test_load_fills_device_id_and_name_unless_given() -> None:
    derived = load(env={})
    assert derived.device.id == default_device_id()
    assert DEVICE_ID.match(derived.device.id)
    assert derived.device.name == (socket.gethostname() or "appliance")
    given = load(env={"APPLIANCE_DEVICE__ID": "shed-pi", "APPLIANCE_DEVICE__NAME": "Shed"})
    assert (given.device.id, given.device.name) == ("shed-pi", "Shed")
