"""The ``[mqtt]`` configuration: every key from the environment, stream rules from TOML, and
bad values stopped with a message naming the key."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from appliance import cli
from appliance import config as config_mod
from appliance.config import MqttConfig, StreamRule
from appliance.errors import ConfigError

# A valid non-default value for every key that has an environment variable.
ENV_VALUES: dict[str, tuple[str, Any]] = {
    "enabled": ("false", False),
    "host": ("broker.lan", "broker.lan"),
    "port": ("8883", 8883),
    "client_id": ("box-1", "box-1"),
    "protocol": ("3.1.1", "3.1.1"),
    "keepalive": ("15", 15),
    "username": ("appliance", "appliance"),
    "password": ("pw", "pw"),
    "password_file": ("/run/credentials/mqtt", Path("/run/credentials/mqtt")),
    "tls": ("true", True),
    "tls_ca_file": ("/etc/ca.pem", Path("/etc/ca.pem")),
    "tls_cert_file": ("/etc/c.pem", Path("/etc/c.pem")),
    "tls_key_file": ("/etc/k.pem", Path("/etc/k.pem")),
    "tls_min_version": ("1.3", "1.3"),
    "tls_insecure": ("true", True),
    "base_topic": ("site/box-1", "site/box-1"),
    "fleet_topic": ("site/fleet", "site/fleet"),
    "shared_group": ("workers", "workers"),
    "session_expiry": ("600", 600),
    "reconnect_min": ("0.5", 0.5),
    "reconnect_max": ("30", 30.0),
    "timeout": ("5", 5.0),
    "max_payload_bytes": ("65536", 65536),
    "max_inflight": ("8", 8),
    "reply_queue_size": ("50", 50),
    "dedup_ttl": ("0", 0.0),
    "dedup_size": ("10", 10),
    "stats_interval": ("5", 5.0),
    "homeassistant": ("false", False),
    "sensor_rule": ("false", False),
    "discovery_prefix": ("ha", "ha"),
}


def test_every_key_but_rules_has_a_working_environment_variable() -> None:
    assert set(ENV_VALUES) == set(MqttConfig.model_fields) - {"rules"}
    env = {f"APPLIANCE_MQTT__{key.upper()}": raw for key, (raw, _) in ENV_VALUES.items()}
    mqtt = config_mod.load(env=env).mqtt
    for key, (_, expected) in ENV_VALUES.items():
        value = getattr(mqtt, key)
        if key == "password":
            value = value.get_secret_value()
        assert value == expected, key


def test_defaults() -> None:
    mqtt = config_mod.load(env={}).mqtt
    assert mqtt.enabled is True
    assert (mqtt.host, mqtt.port, mqtt.protocol) == ("localhost", 1883, "5")
    assert mqtt.base_topic == "" and mqtt.rules == []


def test_stream_rules_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(
        "[mqtt]\n"
        "protocol = 5\n"
        "[[mqtt.rules]]\n"
        'name = "env"\n'
        'topic = "sensors/+/telemetry"\n'
        'fields = ["temperature", "humidity", "vibration"]\n'
        "hop = 8\n"
        'output = "results/{1}/{rule}"\n'
    )
    mqtt = config_mod.load(path=path, env={}).mqtt
    assert mqtt.protocol == "5"
    assert mqtt.rules == [
        StreamRule(
            name="env",
            topic="sensors/+/telemetry",
            fields=["temperature", "humidity", "vibration"],
            hop=8,
            output="results/{1}/{rule}",
        )
    ]
    rule = mqtt.rules[0]
    assert (rule.model, rule.window) == ("sensor-anomaly", 32)


@pytest.mark.parametrize(
    ("rule", "key", "message"),
    [
        ({"topic": "sensors/#/x"}, "mqtt.rules.0.topic", "'#' may only be a whole level"),
        ({"topic": "sensors/a+"}, "mqtt.rules.0.topic", "'+' may only be a whole level"),
        ({"topic": "$SYS/#"}, "mqtt.rules.0.topic", "belong to the broker"),
        ({"output": "out/{nope}"}, "mqtt.rules.0.output", "unknown placeholder {nope}"),
        ({"output": "out/{0!r}"}, "mqtt.rules.0.output", "format or conversion"),
        ({"anomaly_output": "out/#"}, "mqtt.rules.0.anomaly_output", "may not hold '#'"),
        ({"fields": ["a..b"]}, "mqtt.rules.0.fields", "dotted path"),
        ({"window": 0}, "mqtt.rules.0.window", "greater than or equal to 1"),
        ({"colour": "red"}, "mqtt.rules.0.colour", "unknown key"),
    ],
)
def test_bad_stream_rules_name_the_key(rule: dict[str, Any], key: str, message: str) -> None:
    base = {"name": "r", "topic": "sensors/+/t"}
    with pytest.raises(ConfigError) as info:
        config_mod.load(env={}, overrides={"mqtt": {"rules": [{**base, **rule}]}})
    assert key in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"APPLIANCE_MQTT__PORT": "0"}, "mqtt.port = '0' (from environment variable"),
        ({"APPLIANCE_MQTT__PROTOCOL": "4"}, "'5' | '3.1.1'"),
        ({"APPLIANCE_MQTT__BASE_TOPIC": "a/+/b"}, "mqtt.base_topic"),
        ({"APPLIANCE_MQTT__BASE_TOPIC": "a/"}, "may not start or end with '/'"),
        ({"APPLIANCE_MQTT__SHARED_GROUP": "a/b"}, "mqtt.shared_group"),
        (
            {"APPLIANCE_MQTT__RECONNECT_MIN": "10", "APPLIANCE_MQTT__RECONNECT_MAX": "5"},
            "must not be less than reconnect_min",
        ),
        ({"APPLIANCE_MQTT__TLS_KEY_FILE": "/k.pem"}, "tls_key_file needs tls_cert_file"),
        ({"APPLIANCE_MQTT__COLOUR": "red"}, "unknown key 'colour' in [mqtt]"),
        ({"APPLIANCE_MQTT__RULES": "a"}, "mqtt.rules.0"),
    ],
)
def test_bad_values_name_key_value_and_source(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.load(env=env)
    assert message in str(info.value)


def test_duplicate_rule_names() -> None:
    rules = [{"name": "a", "topic": "x"}, {"name": "a", "topic": "y"}]
    with pytest.raises(ConfigError, match="repeated: a"):
        config_mod.load(env={}, overrides={"mqtt": {"rules": rules}})


def test_the_password_never_appears_in_the_resolved_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("APPLIANCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("APPLIANCE_MQTT__PASSWORD", "hunter2")
    assert cli.main(["config"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed
    assert json.loads(printed)["mqtt"]["password"] == "**********"
