"""One validated configuration, resolved once before anything starts.

Sources, later ones winning: built-in defaults, ``appliance.toml`` (``--config`` or
``$APPLIANCE_CONFIG``), environment variables ``APPLIANCE_<SECTION>__<KEY>``, command-line
flags. Every section forbids unknown keys; a bad value stops start-up with a
:class:`~appliance.errors.ConfigError` naming the key, the value, where it came from and
what is allowed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from appliance.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

log = logging.getLogger(__name__)

ENV_PREFIX = "APPLIANCE_"
ENV_CONFIG_FILE = "APPLIANCE_CONFIG"

_DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Section(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DeviceConfig(Section):
    """Who this box is; MQTT topics, mDNS names and the hub all use it."""

    id: str = Field(
        default="",
        pattern=r"^$|" + _DEVICE_ID_PATTERN,
        description="Stable device id: lower-case letters, digits and '-', at most 63 "
        "characters. Empty means derived from /etc/machine-id (or the hostname).",
    )
    name: str = Field(
        default="",
        max_length=128,
        description="Human name shown in discovery and on the hub. Empty means the hostname.",
    )


class HttpConfig(Section):
    """The single HTTP port serving OpenAI, Open Inference Protocol v2 and ops routes."""

    host: str = Field(default="0.0.0.0", min_length=1, description="Address to bind.")
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest accepted request body in bytes; larger bodies get 413.",
    )
    shutdown_timeout: float = Field(
        default=10.0,
        ge=0,
        le=600,
        allow_inf_nan=False,
        description="Seconds in-flight requests may run after SIGTERM before they are cut.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="Certificate chain (PEM) to serve HTTPS with (`appliance certs device` "
        "makes one); unset: plain HTTP. gRPC uses it too.",
    )
    tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of tls_cert_file; unset: inside that file."
    )
    tls_min_version: Literal["1.2", "1.3"] = Field(
        default="1.2", description="Oldest TLS version a client may use."
    )

    @field_validator("tls_key_file")
    @classmethod
    def _key_needs_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert_file") is None:
            raise ValueError("tls_key_file needs tls_cert_file")
        return value


class ModelsConfig(Section):
    """Where models come from and how much work each may queue."""

    dir: Path | None = Field(
        default=None,
        description="Model repository: one sub-directory with a manifest.toml per model. "
        "Unset means the default models shipped with the appliance.",
    )
    files: list[Path] = Field(
        default_factory=list,
        description="Model files (.onnx or .gguf) served directly, named after the file "
        "without its extension; no manifest needed.",
    )
    queue_size: int = Field(
        default=8,
        ge=0,
        le=10_000,
        description="Requests that may wait per model beyond those running; more get 503.",
    )
    parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Requests a model runs at the same time (per-model option overrides).",
    )
    retry_after: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds suggested in Retry-After when a model's queue is full.",
    )
    # -- lifecycle (docs/models.md): versions, memory budget, keep-alive ------------------
    version_policy: Literal["latest", "all", "specific"] = Field(
        default="latest",
        description="Which versions of a model serve: latest (the highest), all, or specific "
        "(those listed in models.versions; other models serve their latest).",
    )
    versions: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="With version_policy = 'specific': 'name:version' entries to serve.",
    )
    preload: bool = Field(
        default=True,
        description="Load models at start-up (as far as max_loaded and memory_budget allow); "
        "false loads each on first use.",
    )
    memory_budget: int = Field(
        default=0,
        ge=0,
        le=1 << 50,
        description="Bytes of model files that may be loaded at once (model file size is the "
        "estimate); least recently used idle models are unloaded to make room. 0: no limit.",
    )
    max_loaded: int = Field(
        default=0, ge=0, le=1024,
        description="Models (versions) loaded at once; beyond it the least recently used idle "
        "one is unloaded. 0: no limit.",
    )
    keep_alive: float = Field(
        default=-1.0,
        ge=-1,
        le=365 * 86_400,
        allow_inf_nan=False,
        description="Seconds an unused model stays loaded before it is unloaded (it loads "
        "again on the next request); -1 keeps models loaded. Ollama clients set it per "
        "model with keep_alive.",
    )
    load_wait: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds a request waits for its model to load before it gets 503.",
    )

    @field_validator("versions")
    @classmethod
    def _versions(cls, value: list[str]) -> list[str]:
        for item in value:
            name, sep, version = item.partition(":")
            if not (sep and name and version):
                raise ValueError(f"{item!r} must be 'name:version'")
        return value


class CanaryConfig(Section):
    """Canary releases: a new model version gets a share of the traffic (or a shadow copy)
    and is promoted or rolled back on its error rate and latency (docs/models.md)."""

    enabled: bool = Field(
        default=False,
        description="Run a new version as a canary beside the stable one instead of "
        "switching at once.",
    )
    mode: Literal["split", "shadow"] = Field(
        default="split",
        description="split: the canary answers 'share' of the requests (a failed answer is "
        "retried on stable); shadow: stable answers all, a copy runs on the canary.",
    )
    share: float = Field(
        default=0.1, gt=0, le=1, allow_inf_nan=False,
        description="Share of requests (0-1] routed to the canary in split mode.",
    )
    window: float = Field(
        default=300.0, gt=0, le=7 * 86_400, allow_inf_nan=False,
        description="Seconds over which canary and stable are compared; a canary that holds "
        "for a whole window is promoted.",
    )
    min_requests: int = Field(
        default=20, ge=1, le=1_000_000,
        description="Canary requests in the window before it is judged.",
    )
    max_error_rate_increase: float = Field(
        default=0.02, ge=0, le=1, allow_inf_nan=False,
        description="Roll back when the canary's error rate exceeds stable's by more than "
        "this (0-1).",
    )
    max_latency_ratio: float = Field(
        default=1.5, ge=1, le=1000, allow_inf_nan=False,
        description="Roll back when the canary's mean latency exceeds stable's by this factor.",
    )
    auto_promote: bool = Field(
        default=True,
        description="Promote a canary that held for a whole window; false waits for an "
        "operator (POST /admin/models/{name}/promote).",
    )


class PipelineStep(Section):
    """One step of a pipeline: a tensor model run on the inputs, or a language model
    prompted with the previous step's outputs."""

    model: str = Field(min_length=1, max_length=128, description="Model this step runs.")
    prompt: str = Field(
        default="", max_length=4000,
        description="For a language model: the prompt, with {output_name} placeholders "
        "filled from the previous step's outputs. Empty: a tensor step fed the inputs.",
    )
    when: str = Field(
        default="", max_length=128,
        description="Run this step only when this BOOL output of the previous step is true "
        "for some element. Empty: always.",
    )
    max_tokens: int = Field(default=96, ge=1, le=4096, description="Language steps: tokens.")
    output: str = Field(
        default="text", max_length=128,
        description="Language steps: name of the BYTES output tensor holding the answer.",
    )


class Pipeline(Section):
    """A declarative chain of models served as one tensor model of its own name."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="Name clients use (like a model name).")
    description: str = Field(default="", max_length=500, description="One line.")
    steps: list[PipelineStep] = Field(min_length=1, max_length=16,
                                      description="Steps, first to last.")


class PipelinesConfig(Section):
    """Pipelines: ``[[pipelines.chain]]`` tables, each served as a model (docs/models.md)."""

    chain: list[Pipeline] = Field(
        default_factory=list, max_length=64,
        description="The pipelines; each is addressed like a tensor model: "
        "POST /v2/models/<name>/infer, or an MQTT stream rule's model.",
    )


class LoggingConfig(Section):
    """Log level and what may appear in logs."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )
    log_payloads: bool = Field(
        default=False,
        description="Log prompts and request payloads (off: they may hold personal data).",
    )


class HealthConfig(Section):
    """How often the box measures itself; snapshots feed alerts, MQTT and the hub."""

    interval: float = Field(
        default=10.0,
        ge=0.05,
        le=3600,
        allow_inf_nan=False,
        description="Seconds between health snapshots (system sensors and per-model stats).",
    )
    disk_paths: list[Path] = Field(
        default_factory=lambda: [Path("/")],
        max_length=16,
        description="Filesystems whose usage is reported, by a path on each.",
    )


AlertRuleName = Literal[
    "latency_high", "qps_low", "gpu_busy", "memory_high", "http_5xx", "model_load_failures"
]


class AlertsConfig(Section):
    """Alert rules evaluated on the device (defaults from the original design notes).

    Every rule has ``<rule>_threshold``, ``<rule>_window`` (seconds the value is averaged or
    counted over; 0 = the latest snapshot) and ``<rule>_for`` (seconds the condition must hold
    before the alert fires).
    """

    enabled: bool = Field(default=True, description="Evaluate alert rules at all.")
    disabled: list[AlertRuleName] = Field(
        default_factory=list,
        description="Rules not evaluated, by name: latency_high, qps_low, gpu_busy, "
        "memory_high, http_5xx, model_load_failures.",
    )
    hysteresis: float = Field(
        default=10.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Percent of the threshold a firing alert's value must move back past "
        "before it resolves, so a value hovering at the threshold does not flap.",
    )
    min_requests: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description="Requests a window must hold before latency and 5xx rates are judged.",
    )
    latency_high_threshold: float = Field(
        default=500.0, gt=0, le=3_600_000, allow_inf_nan=False,
        description="Average response time per model above this many milliseconds fires.",
    )
    latency_high_window: float = Field(
        default=60.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds the average response time is taken over.",
    )
    latency_high_for: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds the average must stay high before latency_high fires.",
    )
    qps_target: float = Field(
        default=0.0, ge=0, le=1_000_000, allow_inf_nan=False,
        description="Expected requests per second over all models; 0 disables qps_low.",
    )
    qps_low_threshold: float = Field(
        default=80.0, gt=0, le=100, allow_inf_nan=False,
        description="qps_low fires when requests/s fall below this percent of qps_target.",
    )
    qps_low_window: float = Field(
        default=60.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds requests are counted over for qps_low.",
    )
    qps_low_for: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds the rate must stay low before qps_low fires.",
    )
    gpu_busy_threshold: float = Field(
        default=90.0, gt=0, le=100, allow_inf_nan=False,
        description="GPU utilisation percent (the busiest GPU) above which gpu_busy fires.",
    )
    gpu_busy_window: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds GPU utilisation is averaged over.",
    )
    gpu_busy_for: float = Field(
        default=300.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds utilisation must stay high before gpu_busy fires.",
    )
    memory_high_threshold: float = Field(
        default=85.0, gt=0, le=100, allow_inf_nan=False,
        description="System memory use in percent above which memory_high fires.",
    )
    memory_high_window: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds memory use is averaged over.",
    )
    memory_high_for: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds memory use must stay high before memory_high fires.",
    )
    http_5xx_threshold: float = Field(
        default=1.0, gt=0, le=100, allow_inf_nan=False,
        description="Percent of HTTP responses with a 5xx status above which http_5xx fires.",
    )
    http_5xx_window: float = Field(
        default=300.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds the 5xx share is counted over.",
    )
    http_5xx_for: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds the share must stay high before http_5xx fires.",
    )
    model_load_failures_threshold: float = Field(
        default=3.0, ge=0, le=1_000_000, allow_inf_nan=False,
        description="model_load_failures fires when more loads than this failed in the window.",
    )
    model_load_failures_window: float = Field(
        default=3600.0, ge=0, le=86_400 * 7, allow_inf_nan=False,
        description="Seconds failed model loads are counted over.",
    )
    model_load_failures_for: float = Field(
        default=0.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds the count must stay high before model_load_failures fires.",
    )


class HubSyncConfig(Section):
    """Keeping the fleet hub informed: heartbeats, alerts and events through a durable outbox."""

    url: str = Field(
        default="",
        pattern=r"^$|^https?://[^\s/]+(/\S*)?$",
        description="Base URL of the hub, e.g. http://hub.local:8090. Empty: no hub sync.",
    )
    token: SecretStr = Field(
        default=SecretStr(""),
        description="This device's hub token (from `appliance hub enroll`). Prefer token_file "
        "or the systemd credential 'hub-token' ($CREDENTIALS_DIRECTORY/hub-token).",
    )
    token_file: Path | None = Field(
        default=None, description="File holding the device's hub token."
    )
    tls_ca_file: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that signed an https hub's certificate, e.g. the hub's "
        "own self-signed certificate. Unset: the system's trusted CAs.",
    )
    heartbeat_interval: float = Field(
        default=30.0, ge=0.05, le=86_400, allow_inf_nan=False,
        description="Seconds between heartbeats (a health snapshot) queued for the hub.",
    )
    outbox_path: Path | None = Field(
        default=None,
        description="SQLite outbox file. Unset: outbox.db in the state directory "
        "($STATE_DIRECTORY, else /var/lib/appliance as root, else ~/.local/state/appliance).",
    )
    outbox_max_records: int = Field(
        default=100_000, ge=10, le=100_000_000,
        description="Records the outbox holds at most; beyond it the oldest are dropped "
        "(heartbeats before alerts and events).",
    )
    outbox_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=4096, le=64 * 1024**3,
        description="Payload bytes the outbox holds at most; same drop policy.",
    )
    outbox_max_age: float = Field(
        default=7 * 86_400.0, ge=1, le=365 * 86_400, allow_inf_nan=False,
        description="Seconds a record may wait for the hub before it is dropped.",
    )
    batch_size: int = Field(
        default=200, ge=1, le=10_000, description="Records sent to the hub per request."
    )
    backoff_initial: float = Field(
        default=1.0, gt=0, le=3600, allow_inf_nan=False,
        description="Seconds to wait after the first failed upload; doubles per failure.",
    )
    backoff_max: float = Field(
        default=300.0, gt=0, le=86_400, allow_inf_nan=False,
        description="Longest wait between upload attempts.",
    )
    timeout: float = Field(
        default=15.0, gt=0, le=600, allow_inf_nan=False,
        description="Seconds one upload request may take.",
    )


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
        default="sensor-anomaly", min_length=1, max_length=128,
        description="Model each window is run through (a tensor model).",
    )
    input: str = Field(
        default="", max_length=128,
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
        default=0, ge=0, le=4096,
        description="Run the model every this many new readings once the window is full; "
        "0 means every full, non-overlapping window (hop = window).",
    )
    output: str = Field(
        default="{base}/rules/{rule}/{source}",
        min_length=1, max_length=1024,
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
        default="is_anomaly", max_length=128,
        description="BOOL output that marks a window anomalous. Empty: none does.",
    )
    max_sources: int = Field(
        default=1000, ge=1, le=1_000_000,
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


class MqttConfig(Section):
    """The MQTT transport: requests, stream rules and Home Assistant discovery (docs/mqtt.md)."""

    # TLS keys are flat (tls_*) rather than a nested table so each has an environment variable.

    enabled: bool = Field(default=True, description="Connect to the broker at all.")
    host: str = Field(
        default="localhost", min_length=1, max_length=253,
        description="Broker host name or address.",
    )
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (usually 1883, 8883 with TLS)."
    )
    client_id: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._:-]{0,128}$",
        description="MQTT client id; keep it stable so the broker keeps the session. "
        "Empty: 'appliance-<device id>'.",
    )
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT protocol version the appliance speaks to the broker."
    )
    keepalive: int = Field(
        default=30, ge=5, le=65535,
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
        default=86_400, ge=0, le=4_294_967_295,
        description="Seconds the broker keeps this session (subscriptions and queued requests) "
        "while the appliance is away (MQTT 5; 3.1.1 sessions last as the broker decides).",
    )
    reconnect_min: float = Field(
        default=1.0, gt=0, le=3600, allow_inf_nan=False,
        description="Seconds before the first reconnect attempt; doubles per failure.",
    )
    reconnect_max: float = Field(
        default=60.0, gt=0, le=86_400, allow_inf_nan=False,
        description="Longest wait between reconnect attempts (each wait is jittered).",
    )
    timeout: float = Field(
        default=10.0, gt=0, le=600, allow_inf_nan=False,
        description="Seconds to wait for the broker to acknowledge a connect or a publish.",
    )
    max_payload_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="Largest request or reading accepted; larger ones get a 'too_large' error.",
    )
    max_inflight: int = Field(
        default=64, ge=1, le=10_000,
        description="MQTT requests handled at once; more get a 'busy' reply.",
    )
    reply_queue_size: int = Field(
        default=1000, ge=1, le=1_000_000,
        description="Messages (replies, results) held while the broker is away; beyond it the "
        "oldest are dropped and counted.",
    )
    dedup_ttl: float = Field(
        default=300.0, ge=0, le=86_400, allow_inf_nan=False,
        description="Seconds a reply is remembered so a redelivered request (same id) is "
        "answered again instead of run twice; 0 disables.",
    )
    dedup_size: int = Field(
        default=1000, ge=1, le=1_000_000, description="Replies remembered at most."
    )
    stats_interval: float = Field(
        default=60.0, ge=0, le=86_400, allow_inf_nan=False,
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

    @field_validator("base_topic", "fleet_topic", "discovery_prefix")
    @classmethod
    def _prefixes(cls, value: str) -> str:
        return _check_topic_prefix(value)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # TOML users write `protocol = 5`; the version names are strings.
        return "5" if value == 5 and not isinstance(value, bool) else value

    @field_validator("tls_key_file")
    @classmethod
    def _key_needs_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert_file") is None:
            raise ValueError("tls_key_file needs tls_cert_file")
        return value

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


class MdnsConfig(Section):
    """mDNS/DNS-SD: announce the appliance on the LAN so clients find it (docs/discovery.md)."""

    enabled: bool = Field(
        default=True, description="Announce _appliance._tcp and _http._tcp over mDNS."
    )
    interfaces: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Interfaces to announce on, by name (eth0, wlan0, lo) or IPv4 address. "
        "Empty: every non-loopback interface with an IPv4 address. Environment: comma-separated.",
    )
    rescan_interval: float = Field(
        default=30.0,
        ge=0.1,
        le=3600,
        allow_inf_nan=False,
        description="Seconds between interface rescans, so an address that appears or "
        "changes (DHCP, Wi-Fi) is announced.",
    )

    @field_validator("interfaces")
    @classmethod
    def _interface_names(cls, value: list[str]) -> list[str]:
        for item in value:
            if not 0 < len(item) <= 64 or not all(c.isalnum() or c in "_.:@-" for c in item):
                raise ValueError(f"{item!r} is not an interface name or IPv4 address")
        return value


class WebSocketConfig(Section):
    """The WebSocket endpoint ``/ws`` on the HTTP port: many requests over one connection."""

    enabled: bool = Field(default=True, description="Serve /ws on the HTTP port.")
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest message a client may send; a larger one closes the connection "
        "with code 1009 (message too big).",
    )
    max_in_flight: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Requests one connection may have running at once; more are refused "
        "with a 429 error message.",
    )
    heartbeat: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds between the server's pings; a client that does not answer in "
        "time is disconnected. 0 turns server pings off.",
    )


class GrpcConfig(Section):
    """Open Inference Protocol v2 over gRPC (KServe/Triton); off by default, see docs/grpc.md."""

    enabled: bool = Field(
        default=False, description="Serve gRPC (needs grpcio: pip install 'appliance[grpc]')."
    )
    host: str = Field(default="0.0.0.0", min_length=1, description="Address to bind.")
    port: int = Field(
        default=8081, ge=0, le=65535, description="TCP port (KServe's default); 0 picks one."
    )
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest request or response message in bytes; larger ones fail with "
        "RESOURCE_EXHAUSTED.",
    )

    @field_validator("enabled")
    @classmethod
    def _grpcio_installed(cls, value: bool) -> bool:
        import importlib.util

        if value and importlib.util.find_spec("grpc") is None:
            raise ValueError("gRPC needs grpcio, which is not installed: "
                             "pip install 'appliance[grpc]'")
        return value


# ---------------------------------------------------------------------------- security

Scope = Literal["read", "infer", "admin"]
_KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ApiKeyEntry(Section):
    """One API key, by name: only its hash is stored (``appliance keys create`` prints both)."""

    name: str = Field(pattern=_KEY_NAME_PATTERN,
                      description="Key name (letters, digits, '_', '.', '-'); logged, never "
                      "the key itself.")
    scopes: list[Scope] = Field(
        min_length=1, description="What the key may do: read, infer, admin (admin: all)."
    )
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$",
                      description="'sha256:<hex>' of the key, from `appliance keys create`.")


class AccessConfig(Section):
    """Who may use the HTTP port: API keys, client allow-list, Host check, rate limits
    (docs/security.md). Shared by the appliance and the hub."""

    auth: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="API keys: 'auto' requires them unless the port is bound to loopback only "
        "and no key is configured; with no key configured on a LAN address, an admin key is "
        "generated into the state directory (api-key) and its path logged. 'off' serves "
        "without keys (logged as a warning on a LAN address).",
    )
    keys: list[ApiKeyEntry] = Field(
        default_factory=list, max_length=1024,
        description="API keys, TOML only: [[security.keys]] tables with name, scopes, hash.",
    )
    keys_file: Path | None = Field(
        default=None,
        description="File of more keys, one 'NAME SCOPE[,SCOPE] sha256:HEX' a line. The "
        "systemd credential 'api-keys' ($CREDENTIALS_DIRECTORY/api-keys) is read too.",
    )
    public: list[str] = Field(
        default_factory=lambda: ["/", "/health", "/metrics", "/v2/health/live",
                                 "/v2/health/ready"],
        max_length=256,
        description="Paths served without a key: exact, or ending in '*' for a prefix.",
    )
    allow: list[str] = Field(
        default_factory=list, max_length=1024,
        description="Client networks allowed at all (CIDRs, IPv4 or IPv6, e.g. "
        "192.168.1.0/24, fd00::/8); others get 403 before their body is read. Empty: any.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, max_length=256,
        description="Host header names accepted besides the box's own names, its addresses, "
        "localhost and *.local (DNS-rebinding guard); '*.example.org' matches subdomains, "
        "'*' turns the check off.",
    )
    rate_per_client: float = Field(
        default=0.0, ge=0, le=1_000_000, allow_inf_nan=False,
        description="Requests per second one client address may make on average (token "
        "bucket); beyond it 429 with Retry-After. 0: no limit.",
    )
    burst_per_client: int = Field(
        default=20, ge=1, le=1_000_000,
        description="Requests a client address may make at once before rate_per_client applies.",
    )
    rate_per_key: float = Field(
        default=0.0, ge=0, le=1_000_000, allow_inf_nan=False,
        description="Requests per second one API key may make on average; 0: no limit.",
    )
    burst_per_key: int = Field(
        default=20, ge=1, le=1_000_000,
        description="Requests one API key may make at once before rate_per_key applies.",
    )

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, value: list[ApiKeyEntry]) -> list[ApiKeyEntry]:
        names = [key.name for key in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"key names must be unique; repeated: {', '.join(repeated)}")
        return value

    @field_validator("public")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.startswith("/") or "*" in item[:-1]:
                raise ValueError(f"{item!r} must be a path starting with '/', optionally "
                                 "ending in '*'")
        return value

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IPv4 or IPv6 network (CIDR)") from None
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for item in value:
            name = item.removeprefix("*.") if item != "*" else "x"
            if not name or not all(c.isalnum() or c in "-._:[]" for c in name):
                raise ValueError(f"{item!r} is not a host name, '*.domain' or '*'")
        return value


class SecurityConfig(AccessConfig):
    """Who may use the HTTP port and gRPC: API keys, client allow-list, Host check, rate
    limits; and the key that encrypts request data at rest (docs/security.md)."""

    data_key_file: Path | None = Field(
        default=None,
        description="File holding a 256-bit key (64 hex digits, `appliance keys data-key`) "
        "that encrypts stored records (the hub outbox) with AES-256-GCM. The systemd "
        "credential 'data-key' is read too. Unset: stored as plain JSON.",
    )


class LimitsConfig(Section):
    """Limits on what one HTTP request or connection may cost. The body's size limit is
    http.max_body_bytes, counted after Content-Encoding (gzip, deflate, br) is undone, so
    a compression bomb stops there."""

    max_header_bytes: int = Field(
        default=8190, ge=1024, le=1024 * 1024,
        description="Longest request line or header field; longer ones get 400.",
    )
    max_headers: int = Field(
        default=100, ge=8, le=10_000, description="Most header fields in one request."
    )
    max_chunks: int = Field(
        default=10_000, ge=1, le=10_000_000,
        description="Most chunks in one chunked request body; more get 413.",
    )
    request_timeout: float = Field(
        default=60.0, gt=0, le=3600, allow_inf_nan=False,
        description="Seconds a client may take to send a request's body; slower gets 408.",
    )
    idle_timeout: float = Field(
        default=30.0, gt=0, le=3600, allow_inf_nan=False,
        description="Seconds a connection may stay idle, or take to send a request's "
        "headers, before it is closed (slowloris guard).",
    )


class CacheConfig(Section):
    """The result cache: repeated identical requests answered without running the model.

    Off for every model unless its manifest says ``cache = true`` or it is listed in
    ``models``. Keyed by model, version and a hash of the inputs, so a new model version
    never answers from an old one's results.
    """

    models: list[str] = Field(
        default_factory=list, max_length=256,
        description="Models cached besides those whose manifest sets cache = true (models "
        "served with --model have no manifest).",
    )
    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: an LRU in this process; redis: shared by several processes or "
        "boxes (needs the redis package and redis_url).",
    )
    max_entries: int = Field(
        default=1024, ge=1, le=10_000_000, description="Most results kept (memory backend)."
    )
    max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024 * 1024,
        description="Most bytes of results kept (memory backend); the least recently used "
        "go first.",
    )
    max_entry_bytes: int = Field(
        default=1024 * 1024, ge=64, le=512 * 1024 * 1024,
        description="Results larger than this are not cached.",
    )
    ttl: float = Field(
        default=300.0, gt=0, le=30 * 86_400, allow_inf_nan=False,
        description="Seconds a result stays valid (a model's cache_ttl option overrides).",
    )
    redis_url: str = Field(
        default="", max_length=2048,
        description="redis://[user:password@]host:port/db or unix:///path (redis backend).",
    )
    redis_prefix: str = Field(
        default="appliance:cache:", max_length=128, description="Prefix of every Redis key."
    )
    redis_timeout: float = Field(
        default=0.25, gt=0, le=60, allow_inf_nan=False,
        description="Seconds a Redis call may take; a slow or absent Redis counts as a miss "
        "and never fails a request.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str, info: ValidationInfo) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if not value and info.data.get("backend") == "redis":
            raise ValueError("is required when backend = 'redis'")
        return value


class Config(Section):
    """The whole configuration. Sections map to ``[section]`` tables in appliance.toml."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    hub: HubSyncConfig = Field(default_factory=HubSyncConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    mdns: MdnsConfig = Field(default_factory=MdnsConfig)
    websocket: WebSocketConfig = Field(default_factory=WebSocketConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    pipelines: PipelinesConfig = Field(default_factory=PipelinesConfig)


# ---------------------------------------------------------------------------- loading


def load(
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Merge defaults, file, environment and flag overrides; validate; resolve derived values.

    ``overrides`` is ``{section: {key: value}}`` as the CLI produces it. Raises
    :class:`ConfigError` for anything invalid.
    """
    if env is not None:
        # APPLIANCE_HUB_<SECTION>__<KEY> configures the fleet hub (appliance.hub.config), not
        # this daemon; APPLIANCE_HUB__<KEY> (two underscores) is this daemon's [hub] section.
        env = {k: v for k, v in env.items() if not _HUB_SERVICE_VARIABLE.match(k)}
    return _resolve(load_model(Config, path=path, env=env, overrides=overrides))


_HUB_SERVICE_VARIABLE = re.compile(r"^APPLIANCE_HUB_(?!_)")


RootT = TypeVar("RootT", bound=BaseModel)


def load_model(
    root: type[RootT],
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    env_prefix: str = ENV_PREFIX,
    env_config_file: str = ENV_CONFIG_FILE,
) -> RootT:
    """Load any sectioned configuration model (the daemon's, the hub's) the same way."""
    env = {} if env is None else env
    raw: dict[str, dict[str, Any]] = {}
    sources: dict[tuple[str, str], str] = {}

    if path is None and env.get(env_config_file):
        path = Path(env[env_config_file])
    if path is not None:
        _merge(raw, sources, _read_file(root, path), str(path))
    _merge(raw, sources, _from_env(root, env, sources, env_prefix), None)
    if overrides:
        _merge(raw, sources, overrides, "command line")

    try:
        return root.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(root, exc, sources)) from None


def _read_file(root: type[BaseModel], path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data: dict[str, Any] = dict(parsed)
    for key, value in data.items():
        if key not in root.model_fields:
            raise ConfigError(
                f"config file {path}: unknown section {key!r}; "
                f"allowed sections: {', '.join(root.model_fields)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"config file {path}: {key!r} must be a [{key}] table")
    return data


def _from_env(
    root: type[BaseModel],
    env: Mapping[str, str],
    sources: dict[tuple[str, str], str],
    prefix: str,
) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        if not name.startswith(prefix) or "__" not in name:
            continue
        section, _, key = name[len(prefix) :].lower().partition("__")
        section_field = root.model_fields.get(section)
        if section_field is None:
            raise ConfigError(
                f"environment variable {name}: unknown section {section!r}; "
                f"allowed sections: {', '.join(root.model_fields)}"
            )
        model = section_field.annotation
        assert isinstance(model, type)
        assert issubclass(model, Section)
        field = model.model_fields.get(key)
        if field is None:
            raise ConfigError(
                f"environment variable {name}: unknown key {key!r} in [{section}]; "
                f"allowed keys: {', '.join(model.model_fields)}"
            )
        parsed: Any = value
        if getattr(field.annotation, "__origin__", None) is list:
            # Lists come comma-separated from the environment: "a.onnx,b.gguf".
            parsed = [item.strip() for item in value.split(",") if item.strip()]
        out.setdefault(section, {})[key] = parsed
        sources[(section, key)] = f"environment variable {name}"
    return out


def _merge(
    raw: dict[str, dict[str, Any]],
    sources: dict[tuple[str, str], str],
    layer: Mapping[str, Any],
    origin: str | None,
) -> None:
    for section, values in layer.items():
        target = raw.setdefault(section, {})
        for key, value in values.items():
            target[key] = value
            if origin is not None:
                sources[(section, key)] = origin


def _describe(
    root: type[BaseModel],
    exc: ValidationError,
    sources: Mapping[tuple[str, str], str],
) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc)
        value = err.get("input")
        origin = sources.get((loc[0], loc[1])) if len(loc) >= 2 else None
        where = f" (from {origin})" if origin else ""
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1])
            lines.append(f"  {key} = {value!r}{where}: unknown key; allowed keys: {allowed}")
            continue
        allowed = _allowed_values(root, loc)
        hint = f"; allowed: {allowed}" if allowed else ""
        lines.append(f"  {key} = {value!r}{where}: {err['msg']}{hint}")
    return "\n".join(lines)


def _section_model(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def _allowed_keys(root: type[BaseModel], loc: list[str]) -> str:
    model = _section_model(root, loc)
    return ", ".join(model.model_fields) if model else "(none)"


def _allowed_values(root: type[BaseModel], loc: list[str]) -> str:
    model = _section_model(root, loc[:-1])
    if model is None or loc[-1] not in model.model_fields:
        return ""
    schema = model.model_json_schema()["properties"].get(loc[-1], {})
    parts: list[str] = []
    options = schema.get("anyOf", [schema])
    for option in options:
        if "enum" in option:
            parts.append(" | ".join(repr(v) for v in option["enum"]))
        elif "const" in option:
            parts.append(repr(option["const"]))
        elif "type" in option:
            bounds = []
            for name, sym in (
                ("minimum", ">="),
                ("exclusiveMinimum", ">"),
                ("maximum", "<="),
                ("exclusiveMaximum", "<"),
                ("minLength", "length >="),
                ("maxLength", "length <="),
            ):
                if name in option:
                    bounds.append(f"{sym} {option[name]}")
            if "pattern" in option:
                bounds.append(f"matching {option['pattern']}")
            parts.append(option["type"] + (f" ({', '.join(bounds)})" if bounds else ""))
    text = " or ".join(parts)
    description = schema.get("description")
    return f"{text} — {description}" if description else text


# --------------------------------------------------------------------------- resolving


def _resolve(config: Config) -> Config:
    """Fill the values whose defaults depend on the machine."""
    device = config.device
    if not device.id or not device.name:
        device = device.model_copy(
            update={"id": device.id or default_device_id(), "name": device.name or _hostname()}
        )
    models = config.models
    if models.dir is None and not models.files:
        models = models.model_copy(update={"dir": default_models_dir()})
    return config.model_copy(update={"device": device, "models": models})


def _hostname() -> str:
    return socket.gethostname() or "appliance"


def default_device_id(machine_id_file: Path = Path("/etc/machine-id")) -> str:
    """A stable id derived from the machine id, never the raw id itself.

    systemd asks applications to hash /etc/machine-id with an application key rather than
    expose it; without one, fall back to the hostname.
    """
    try:
        machine_id = machine_id_file.read_text(encoding="ascii").strip()
    except OSError:
        machine_id = ""
    if machine_id:
        digest = hashlib.sha256(b"appliance-device-id:" + machine_id.encode()).hexdigest()
        return f"appliance-{digest[:12]}"
    # ASCII only: str.isalnum() accepts "é" or "日", which the device id pattern does not.
    cleaned = "".join(
        c if c.isascii() and c.isalnum() else "-" for c in _hostname().lower()
    ).strip("-")
    return (cleaned or "appliance")[:63]


def default_models_dir() -> Path:
    """The default models: inside the installed package, or ``models/`` of a source checkout."""
    package = Path(__file__).resolve().parent
    shipped = package / "default_models"
    if shipped.is_dir():
        return shipped
    return package.parent / "models"


# -------------------------------------------------------------------------- reference


def reference(
    root: type[BaseModel] | None = None,
    *,
    title: str = "Configuration reference",
    command: str = "appliance config --reference",
    env_prefix: str = ENV_PREFIX,
    env_config_file: str = ENV_CONFIG_FILE,
) -> str:
    """Markdown reference of every key, generated from the models so it cannot drift."""
    root = Config if root is None else root
    lines = [
        f"# {title}",
        "",
        f"Generated by `{command}`; do not edit by hand.",
        "",
        "Sources, later ones winning: built-in defaults, the TOML file (`--config FILE` or "
        f"`${env_config_file}`), environment variables, command-line flags.",
    ]
    for section, field in root.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, Section)
        lines += ["", f"## [{section}]", "", (model.__doc__ or "").strip(), ""]
        lines += ["| key | environment variable | default | allowed |", "|---|---|---|---|"]
        for key in model.model_fields:
            default = model.model_fields[key].get_default(call_default_factory=True)
            env = f"{env_prefix}{section.upper()}__{key.upper()}"
            allowed = _allowed_values(root, [section, key]).replace("|", "\\|")
            lines.append(f"| `{key}` | `{env}` | `{default!r}` | {allowed} |")
    return "\n".join(lines) + "\n"
