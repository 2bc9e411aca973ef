"""One validated configuration, resolved once before anything starts.

Sources, later ones winning: built-in defaults, ``appliance.toml`` (``--config`` or
``$APPLIANCE_CONFIG``), environment variables ``APPLIANCE_<SECTION>__<KEY>``, command-line
flags. Every section forbids unknown keys; a bad value stops start-up with a
:class:`~appliance.errors.ConfigError` naming the key, the value, where it came from and
what is allowed.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from appliance.config import base, remote
from appliance.config.base import (
    DEVICE_ID_PATTERN,
    ENV_CONFIG_FILE,
    ENV_PREFIX,
    Section,
    load_model,
    to_toml,
)
from appliance.config.daemon import (
    CacheConfig,
    CanaryConfig,
    DeviceConfig,
    HttpConfig,
    LoggingConfig,
    ModelsConfig,
    Pipeline,
    PipelinesConfig,
    PipelineStep,
)
from appliance.config.mqtt import MqttConfig, StreamRule
from appliance.config.ops import AlertsConfig, HealthConfig, HubSyncConfig, MdnsConfig
from appliance.config.security import (
    AccessConfig,
    ApiKeyEntry,
    ClientCertEntry,
    LimitsConfig,
    Scope,
    SecurityConfig,
)
from appliance.config.transports import GrpcConfig, WebSocketConfig


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
    dropin: Path | None = None,
) -> Config:
    """Merge defaults, file, environment and flag overrides; validate; resolve derived values.

    ``overrides`` is ``{section: {key: value}}`` as the CLI produces it. ``dropin``: a
    fragment the hub rolled out (``appliance.config.remote``), read after the file when it
    exists. Raises :class:`ConfigError` for anything invalid.
    """
    layers = []
    if dropin is not None and dropin.exists():
        layers.append((remote.read(dropin), f"the hub's drop-in {dropin}"))
    if env is not None:
        # APPLIANCE_HUB_<SECTION>__<KEY> configures the fleet hub (appliance.hub.config), not
        # this daemon; APPLIANCE_HUB__<KEY> (two underscores) is this daemon's [hub] section.
        env = {k: v for k, v in env.items() if not _HUB_SERVICE_VARIABLE.match(k)}
    return _resolve(load_model(Config, path=path, env=env, overrides=overrides, layers=layers))


def validate_fragment(fragment: Any, *, origin: str = "fragment") -> dict[str, dict[str, Any]]:
    """A fragment (parsed TOML) that names only remotely changeable keys and whose values
    the configuration accepts (over the defaults); else :class:`ConfigError` naming the key."""
    checked = remote.check(fragment, origin=origin)
    load_model(Config, layers=[(checked, origin)])
    return checked


_HUB_SERVICE_VARIABLE = re.compile(r"^APPLIANCE_HUB_(?!_)")


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
    cleaned = "".join(c if c.isascii() and c.isalnum() else "-" for c in _hostname().lower()).strip(
        "-"
    )
    return (cleaned or "appliance")[:63]


def default_models_dir() -> Path:
    """The default models: inside the installed package, or ``models/`` of a source checkout."""
    package = Path(__file__).resolve().parent.parent
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
    """Markdown reference of every key (of the daemon's configuration unless ``root``)."""
    return base.reference(
        Config if root is None else root,
        title=title,
        command=command,
        env_prefix=env_prefix,
        env_config_file=env_config_file,
    )


__all__ = [
    "DEVICE_ID_PATTERN",
    "ENV_CONFIG_FILE",
    "ENV_PREFIX",
    "AccessConfig",
    "AlertsConfig",
    "ApiKeyEntry",
    "CacheConfig",
    "CanaryConfig",
    "ClientCertEntry",
    "Config",
    "DeviceConfig",
    "GrpcConfig",
    "HealthConfig",
    "HttpConfig",
    "HubSyncConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MdnsConfig",
    "ModelsConfig",
    "MqttConfig",
    "Pipeline",
    "PipelineStep",
    "PipelinesConfig",
    "Scope",
    "Section",
    "SecurityConfig",
    "StreamRule",
    "WebSocketConfig",
    "default_device_id",
    "default_models_dir",
    "load",
    "load_model",
    "reference",
    "to_toml",
    "validate_fragment",
]
