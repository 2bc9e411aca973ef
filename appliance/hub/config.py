"""The hub's own configuration: same loader and rules as the daemon's, its own sections.

Sources, later ones winning: defaults, ``hub.toml`` (``--config`` or ``$APPLIANCE_HUB_CONFIG``),
environment variables ``APPLIANCE_HUB_<SECTION>__<KEY>``, command-line flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from appliance.config import AccessConfig, LimitsConfig, Section, load_model, reference
from appliance.config.base import TlsFilesSection

ENV_PREFIX = "APPLIANCE_HUB_"
ENV_CONFIG_FILE = "APPLIANCE_HUB_CONFIG"


class HubHttpConfig(TlsFilesSection):
    """The hub's HTTP port: ingest API, fleet REST API, dashboard, /health and /metrics."""

    host: str = Field(default="0.0.0.0", min_length=1, description="Address to bind.")
    port: int = Field(default=8090, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest accepted request (an ingest batch) in bytes; larger get 413.",
    )
    shutdown_timeout: float = Field(
        default=10.0,
        ge=0,
        le=600,
        allow_inf_nan=False,
        description="Seconds in-flight requests may run after SIGTERM.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="Certificate chain (PEM) to serve HTTPS with; unset: plain HTTP.",
    )
    tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of tls_cert_file; unset: inside that file."
    )
    tls_min_version: Literal["1.2", "1.3"] = Field(
        default="1.2", description="Oldest TLS version a client may use."
    )
    tls_client_ca: Path | None = Field(
        default=None,
        description="CA certificate(s) (PEM) that sign client certificates (`appliance certs "
        "client` makes them): mutual TLS on this port, see tls_client_auth and "
        "security.client_certs. Unset: clients are not asked for a certificate.",
    )
    tls_client_auth: Literal["required", "optional"] = Field(
        default="required",
        description="With tls_client_ca: 'required' fails the TLS handshake of a client "
        "without a certificate signed by that CA (devices then need hub.tls_cert_file); "
        "'optional' lets such clients in (they need an API key or device token as usual) "
        "and still refuses a certificate the CA did not sign.",
    )


class StorageConfig(Section):
    """Where the hub keeps devices, records, heartbeats and alerts."""

    url: str = Field(
        default="",
        pattern=r"^$|^sqlite:///.+|^postgres(ql)?://.*",
        description="sqlite:///ABSOLUTE/PATH.db or postgresql://user:pass@host/db. Empty: "
        "hub.db (SQLite) in the state directory ($STATE_DIRECTORY, else /var/lib/appliance "
        "as root, else ~/.local/state/appliance).",
    )
    pool_size: int = Field(
        default=10, ge=1, le=200, description="PostgreSQL connections the hub may hold."
    )


class FleetConfig(Section):
    """When a device counts as offline."""

    offline_after: float = Field(
        default=90.0,
        ge=0.1,
        le=7 * 86_400,
        allow_inf_nan=False,
        description="Seconds without an upload after which a device is offline (and a "
        "device_offline alert fires). Set it to a few heartbeat intervals.",
    )
    check_interval: float = Field(
        default=10.0,
        ge=0.05,
        le=3600,
        allow_inf_nan=False,
        description="Seconds between offline checks.",
    )


class RetentionConfig(Section):
    """How long history is kept, and at what resolution."""

    raw: float = Field(
        default=2 * 86_400.0,
        ge=60,
        le=3650 * 86_400,
        allow_inf_nan=False,
        description="Seconds heartbeats and records are kept as received; older heartbeats "
        "are downsampled into buckets, older records deleted.",
    )
    keep: float = Field(
        default=90 * 86_400.0,
        ge=60,
        le=3650 * 86_400,
        allow_inf_nan=False,
        description="Seconds downsampled heartbeats and resolved alerts are kept.",
    )
    bucket: float = Field(
        default=3600.0,
        ge=1,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds one downsampled heartbeat averages.",
    )
    interval: float = Field(
        default=3600.0,
        ge=1,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds between retention runs.",
    )


class HubLoggingConfig(Section):
    """Log level."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )


class HubSecurityConfig(AccessConfig):
    """Who may use the hub's HTTP port: API keys for the fleet API and dashboard data,
    client allow-list, Host check, rate limits (docs/security.md). Devices upload with
    their own tokens (`appliance hub enroll`), whatever these say."""

    public: list[str] = Field(
        default_factory=lambda: ["/", "/health", "/metrics"],
        max_length=256,
        description="Paths served without a key: exact, or ending in '*' for a prefix. The "
        "dashboard page itself holds no data; it asks for a key when the API wants one.",
    )


class RolloutConfig(Section):
    """Signed model rollouts to the fleet (docs/hub.md#rollouts)."""

    dir: Path | None = Field(
        default=None,
        description="Where published artifacts are stored (content-addressed). Unset: "
        "artifacts/ in the state directory.",
    )
    signing_key_file: Path | None = Field(
        default=None,
        description="The hub's Ed25519 signing key (PEM), made on first use. Unset: "
        "hub-signing-key in the state directory.",
    )
    interval: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds between checks that move running rollouts along.",
    )
    max_upload_bytes: int = Field(
        default=16 << 30,
        ge=1,
        le=1 << 40,
        description="Largest artifact `POST /api/v1/artifacts` takes (all its files "
        "together); it is written to disk as it arrives, never held in memory.",
    )


class HubConfig(Section):
    """The whole hub configuration; sections map to ``[section]`` tables in hub.toml."""

    http: HubHttpConfig = Field(default_factory=HubHttpConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    logging: HubLoggingConfig = Field(default_factory=HubLoggingConfig)
    security: HubSecurityConfig = Field(default_factory=HubSecurityConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)


def load(
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> HubConfig:
    """Load and validate; raises :class:`~appliance.errors.ConfigError`."""
    if env is not None:
        # APPLIANCE_HUB__<KEY> (two underscores) is the daemon's [hub] section, not ours.
        env = {k: v for k, v in env.items() if not k.startswith("APPLIANCE_HUB__")}
    return load_model(
        HubConfig,
        path=path,
        env=env,
        overrides=overrides,
        env_prefix=ENV_PREFIX,
        env_config_file=ENV_CONFIG_FILE,
    )


def storage_url(config: HubConfig, env: Mapping[str, str] | None = None) -> str:
    """The storage URL with the default (SQLite in the state directory) filled in."""
    if config.storage.url:
        return config.storage.url
    from appliance.ops.instance import state_directory

    state = state_directory(os.environ if env is None else env)
    return f"sqlite:///{state / 'hub.db'}"


def state_path(config: HubConfig, name: str, env: Mapping[str, str] | None = None) -> Path:
    """``name`` in the hub's state directory."""
    from appliance.ops.instance import default_state_dir

    env = os.environ if env is None else env
    return default_state_dir(env, is_root=os.geteuid() == 0, home=Path.home()) / name


def hub_reference() -> str:
    return reference(
        HubConfig,
        title="Hub configuration reference",
        command="appliance hub config --reference",
        env_prefix=ENV_PREFIX,
        env_config_file=ENV_CONFIG_FILE,
    )
