"""Sections of the operations units: health collector, alerts, hub sync, mDNS."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
)

from appliance.config.base import Section, TlsFilesSection


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
        default=500.0,
        gt=0,
        le=3_600_000,
        allow_inf_nan=False,
        description="Average response time per model above this many milliseconds fires.",
    )
    latency_high_window: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds the average response time is taken over.",
    )
    latency_high_for: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds the average must stay high before latency_high fires.",
    )
    qps_target: float = Field(
        default=0.0,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="Expected requests per second over all models; 0 disables qps_low.",
    )
    qps_low_threshold: float = Field(
        default=80.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="qps_low fires when requests/s fall below this percent of qps_target.",
    )
    qps_low_window: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds requests are counted over for qps_low.",
    )
    qps_low_for: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds the rate must stay low before qps_low fires.",
    )
    gpu_busy_threshold: float = Field(
        default=90.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="GPU utilisation percent (the busiest GPU) above which gpu_busy fires.",
    )
    gpu_busy_window: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds GPU utilisation is averaged over.",
    )
    gpu_busy_for: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds utilisation must stay high before gpu_busy fires.",
    )
    memory_high_threshold: float = Field(
        default=85.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="System memory use in percent above which memory_high fires.",
    )
    memory_high_window: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds memory use is averaged over.",
    )
    memory_high_for: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds memory use must stay high before memory_high fires.",
    )
    http_5xx_threshold: float = Field(
        default=1.0,
        gt=0,
        le=100,
        allow_inf_nan=False,
        description="Percent of HTTP responses with a 5xx status above which http_5xx fires; "
        "503s of a full queue (shed load, appliance_requests_shed_total) do not count.",
    )
    http_5xx_window: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds the 5xx share is counted over.",
    )
    http_5xx_for: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds the share must stay high before http_5xx fires.",
    )
    model_load_failures_threshold: float = Field(
        default=3.0,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="model_load_failures fires when more loads than this failed in the window.",
    )
    model_load_failures_window: float = Field(
        default=3600.0,
        ge=0,
        le=86_400 * 7,
        allow_inf_nan=False,
        description="Seconds failed model loads are counted over.",
    )
    model_load_failures_for: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds the count must stay high before model_load_failures fires.",
    )


class HubSyncConfig(TlsFilesSection):
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
    tls_cert_file: Path | None = Field(
        default=None,
        description="Client certificate (PEM) shown to a hub that asks for one "
        "(its http.tls_client_ca), e.g. the device certificate of `appliance certs device`. "
        "Unset: none.",
    )
    tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of tls_cert_file; unset: inside that file."
    )
    heartbeat_interval: float = Field(
        default=30.0,
        ge=0.05,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds between heartbeats (a health snapshot) queued for the hub.",
    )
    outbox_path: Path | None = Field(
        default=None,
        description="SQLite outbox file. Unset: outbox.db in the state directory "
        "($STATE_DIRECTORY, else /var/lib/appliance as root, else ~/.local/state/appliance).",
    )
    outbox_max_records: int = Field(
        default=100_000,
        ge=10,
        le=100_000_000,
        description="Records the outbox holds at most; beyond it the oldest are dropped "
        "(heartbeats before alerts and events).",
    )
    outbox_max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=4096,
        le=64 * 1024**3,
        description="Payload bytes the outbox holds at most; same drop policy.",
    )
    outbox_max_age: float = Field(
        default=7 * 86_400.0,
        ge=1,
        le=365 * 86_400,
        allow_inf_nan=False,
        description="Seconds a record may wait for the hub before it is dropped.",
    )
    batch_size: int = Field(
        default=200, ge=1, le=10_000, description="Records sent to the hub per request."
    )
    backoff_initial: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds to wait after the first failed upload; doubles per failure.",
    )
    backoff_max: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="Longest wait between upload attempts.",
    )
    timeout: float = Field(
        default=15.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description="Seconds one upload request may take.",
    )
    public_key: str = Field(
        default="",
        pattern=r"^$|^ed25519:[A-Za-z0-9+/=]{40,60}$",
        description="The hub's signing key (`ed25519:...`, printed by `appliance hub enroll`). "
        "Set: the device installs model rollouts the hub signed for it; unset: none.",
    )
    update_margin_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        le=1024**4,
        description="Free space a rollout must leave on the models' file system; a download "
        "that would leave less is refused before it starts.",
    )
    update_rate_bytes: int = Field(
        default=0,
        ge=0,
        le=1024**4,
        description="Bytes per second a rollout download may take (a slow or metered link); "
        "0: no limit.",
    )
    backup_interval: float = Field(
        default=0.0,
        ge=0,
        le=30 * 86_400,
        description="Seconds between uploads of the configuration backup to the hub (what "
        "`appliance backup --to-hub` sends); 0: off.",
    )
    backup_key_file: Path | None = Field(
        default=None,
        description="A file of random bytes sealing the periodic backups (as `appliance "
        "backup --key-file`); unset: the passphrase in $APPLIANCE_BACKUP_PASSPHRASE.",
    )


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
