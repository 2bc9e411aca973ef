"""The ``[mqtt]`` section and its stream rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from appliance.config.base import Section, TlsFilesSection

_RULE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_TEMPLATE_FIELDS = frozenset({"base", "rule", "source", "device_id", "model"})


def _check_topic_prefix(value: str) -> str:
    """A topic prefix other topics are built under: no wildcards, no NUL, not starting with
    '$' (the broker's) and no empty level, so joined topics never hold '//'."""
    if not value:
        return value
    if any(c in value for c in "#+\x00") or value.startswith("$"):
        raise ValueError("a topic prefix may not hold '#', '+' or NUL, nor start with '$'")
    if any(not level for level in value.split("/")):
        raise ValueError("a topic prefix may not start or end with '/' or hold '//'")
    return value


def _check_topic_filter(value: str) -> str:
    """An MQTT subscription filter: '+' and '#' only as whole levels, '#' only last."""
    if not value or "\x00" in value or len(value.encode()) > 1024:
        raise ValueError("must be a non-empty topic filter of at most 1024 bytes")
    if value.startswith("$"):
        raise ValueError("topics starting with '$' belong to the broker")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError("'#' may only be a whole level at the end, e.g. 'sensors/#'")
        if "+" in level and level != "+":
            raise ValueError("'+' may only be a whole level, e.g. 'sensors/+/telemetry'")
    return value


def _check_topic_template(value: str) -> str:
    """A topic with ``{base}``, ``{rule}``, ``{source}``, ``{device_id}``, ``{model}`` and
    ``{0}``, ``{1}`` ... (levels of the source topic) placeholders; no wildcards."""
    import string

    if "\x00" in value or "#" in value or "+" in value:
        raise ValueError("an output topic may not hold '#', '+' or NUL")
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in _TEMPLATE_FIELDS and not field_name.isdigit():
            raise ValueError(
                f"unknown placeholder {{{field_name}}}; allowed: "
                f"{', '.join('{' + f + '}' for f in sorted(_TEMPLATE_FIELDS))}, {{0}}, {{1}} ..."
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{field_name}}} may not carry a format or conversion")
    return value


class StreamRule(Section):
    """One stream rule: readings on matching topics are windowed per source topic and each
    full window (or every ``hop`` readings) is run through a model."""

    name: str = Field(
        pattern=_RULE_NAME_PATTERN,
        description="Rule name (letters, digits, '_', '-'); used in topics and metrics.",
    )
    topic: str = Field(
        description="Topic filter the readings arrive on; '+' and '#' wildcards allowed, "
        "e.g. 'sensors/+/telemetry'. Every matching topic is a source with its own window.",
    )
    model: str = Field(
        default="sensor-anomaly",
        min_length=1,
        max_length=128,
        description="Model each window is run through (a tensor model).",
    )
    input: str = Field(
        default="",
        max_length=128,
        description="Input tensor the window is fed to. Empty: the model's only input.",
    )
    fields: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="JSON fields (dotted paths) read from each reading, in channel order. "
        "Empty: each reading is a single number.",
    )
    window: int = Field(
        default=32, ge=1, le=4096, description="Readings in one window (per source topic)."
    )
    hop: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Run the model every this many new readings once the window is full; "
        "0 means every full, non-overlapping window (hop = window).",
    )
    output: str = Field(
        default="{base}/rules/{rule}/{source}",
        min_length=1,
        max_length=1024,
        description="Topic template for every result; placeholders {base}, {rule}, "
        "{source}, {device_id}, {model} and {0}, {1} ... (levels of the source topic).",
    )
    anomaly_output: str = Field(
        default="{base}/anomalies/{rule}/{source}",
        max_length=1024,
        description="Topic template for anomaly events (results whose anomaly_tensor is "
        "true); same placeholders. Empty: no separate anomaly events.",
    )
    anomaly_tensor: str = Field(
        default="is_anomaly",
        max_length=128,
        description="BOOL output that marks a window anomalous. Empty: none does.",
    )
    max_sources: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Source topics windowed at once; the least recently heard is dropped "
        "beyond that.",
    )

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return _check_topic_filter(value)

    @field_validator("output", "anomaly_output")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _check_topic_template(value)

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or any(not part for part in item.split(".")):
                raise ValueError(f"field {item!r} must be a name or a dotted path like 'a.b'")
        return value


# Zero configuration for the sensor use case: a sensor publishing
#   {"temperature": 24.7, "humidity": 68.2, "vibration": 0.02}
# to sensors/<name>/telemetry gets a score per 32 readings from the default model.
SENSOR_RULE = StreamRule(
    name="sensors",
    topic="sensors/+/telemetry",
    model="sensor-anomaly",
    fields=["temperature", "humidity", "vibration"],
    window=32,
)


class MqttConfig(TlsFilesSection):
    """The MQTT transport: requests, stream rules and Home Assistant discovery (docs/mqtt.md)."""

    # TLS keys are flat (tls_*) rather than a nested table so each has an environment variable.

    enabled: bool = Field(default=True, description="Connect to the broker at all.")
    host: str = Field(
        default="localhost",
        min_length=1,
        max_length=253,
        description="Broker host name or address.",
    )
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (usually 1883, 8883 with TLS)."
    )
    client_id: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._:-]{0,128}$",
        description="MQTT client id; keep it stable so the broker keeps the session. "
        "Empty: 'appliance-<device id>', plus a hash of the state directory when it is not "
        "the default one.",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT protocol version the appliance speaks to the broker."
    )
    keepalive: int = Field(
        default=30,
        ge=5,
        le=65535,
        description="Seconds between keepalive pings; the broker declares the appliance gone "
        "(and publishes its last will) after 1.5 times this without traffic.",
    )
    username: str = Field(default="", max_length=256, description="Broker user name; empty: none.")
    password: SecretStr = Field(
        default=SecretStr(""),
        description="Broker password. Prefer password_file or the systemd credential "
        "'mqtt-password' ($CREDENTIALS_DIRECTORY/mqtt-password).",
    )
    password_file: Path | None = Field(
        default=None, description="File holding the broker password."
    )
    tls: bool = Field(default=False, description="Connect with TLS.")
    tls_ca_file: Path | None = Field(
        default=None, description="CA certificates (PEM) to verify the broker; unset: the system's."
    )
    tls_cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM) for brokers that require one."
    )
    tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of tls_cert_file; unset: inside that file."
    )
    tls_min_version: Literal["1.2", "1.3"] = Field(
        default="1.2", description="Oldest TLS version accepted."
    )
    tls_insecure: bool = Field(
        default=False,
        description="Do not check that the broker's certificate names `host` (testing only).",
    )
    base_topic: str = Field(
        default="",
        max_length=256,
        description="Topic prefix of this device. Empty: 'appliance/<device id>'.",
    )
    fleet_topic: str = Field(
        default="appliance/fleet",
        min_length=1,
        max_length=256,
        description="Topic prefix shared by the fleet; requests to <fleet_topic>/infer/<model> "
        "are spread over appliances subscribed with the same shared_group.",
    )
    shared_group: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="Also take fleet requests through the shared subscription "
        "$share/<group>/<fleet_topic>/infer/#. Empty: no fleet subscription.",
    )
    session_expiry: int = Field(
        default=86_400,
        ge=0,
        le=4_294_967_295,
        description="Seconds the broker keeps this session (subscriptions and queued requests) "
        "while the appliance is away (MQTT 5; 3.1.1 sessions last as the broker decides).",
    )
    reconnect_min: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds before the first reconnect attempt; doubles per failure.",
    )
    reconnect_max: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="Longest wait between reconnect attempts (each wait is jittered).",
    )
    timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description="Seconds to wait for the broker to acknowledge a connect or a publish.",
    )
    max_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest request or reading accepted; larger ones get a 'too_large' error.",
    )
    max_inflight: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="MQTT requests handled at once; more get a 'busy' reply.",
    )
    reply_queue_size: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Messages (replies, results) held while the broker is away; beyond it the "
        "oldest are dropped and counted.",
    )
    dedup_ttl: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds a reply is remembered so a redelivered request (same id) is "
        "answered again instead of run twice; 0 disables.",
    )
    dedup_size: int = Field(
        default=1000, ge=1, le=1_000_000, description="Replies remembered at most."
    )
    stats_interval: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds between retained stats documents; 0: only on changes.",
    )
    homeassistant: bool = Field(
        default=True, description="Announce the device to Home Assistant (MQTT discovery)."
    )
    discovery_prefix: str = Field(
        default="homeassistant",
        min_length=1,
        max_length=256,
        description="Home Assistant discovery prefix; '<prefix>/status' online re-announces.",
    )
    rules: list[StreamRule] = Field(
        default_factory=list,
        max_length=256,
        description="Stream rules, TOML only: [[mqtt.rules]] tables (see docs/mqtt.md).",
    )
    sensor_rule: bool = Field(
        default=True,
        description="With no [[mqtt.rules]] configured and sensor-anomaly served, run the "
        "built-in rule 'sensors': JSON readings with temperature, humidity and vibration on "
        "sensors/+/telemetry, scored in windows of 32. false: no built-in rule.",
    )

    def effective_rules(self, models: set[str]) -> list[StreamRule]:
        """The configured rules; with none, the built-in sensor rule (if on and its model
        is among ``models``)."""
        if self.rules or not self.sensor_rule or SENSOR_RULE.model not in models:
            return list(self.rules)
        return [SENSOR_RULE]

    @field_validator("base_topic", "fleet_topic", "discovery_prefix")
    @classmethod
    def _prefixes(cls, value: str) -> str:
        return _check_topic_prefix(value)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # TOML users write `protocol = 5`; the version names are strings.
        return "5" if value == 5 and not isinstance(value, bool) else value

    @field_validator("reconnect_max")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("reconnect_min")
        if low is not None and value < low:
            raise ValueError(f"must not be less than reconnect_min ({low})")
        return value

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, value: list[StreamRule]) -> list[StreamRule]:
        names = [rule.name for rule in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stream rule names must be unique; repeated: {', '.join(repeated)}")
        return value
