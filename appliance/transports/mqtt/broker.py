"""How the appliance presents itself to the broker: password, TLS, and client options.

The password and the TLS context come from files (``mqtt.password_file``, the systemd
credential, the CA and client certificate files), so both are read once, off the loop,
before the connection starts; a file that cannot be read is a
:class:`~appliance.errors.ConfigError` naming the key. :func:`client_options` turns them and
the configuration into the options of every (re)connect: the client id, the retained
``offline`` last will, and a persistent session (never a clean start).
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.config import MqttConfig
from appliance.errors import ConfigError

CREDENTIAL = "mqtt-password"  # systemd credential name ($CREDENTIALS_DIRECTORY/mqtt-password)


def read_password(config: MqttConfig, env: dict[str, str] | None = None) -> str | None:
    """The broker password: ``password_file``, else ``password``, else the systemd
    credential. Blocking file IO: call off the loop."""
    env = dict(os.environ) if env is None else env
    if config.password_file is not None:
        return _read_secret(config.password_file, "mqtt.password_file")
    secret = config.password.get_secret_value()
    if secret:
        return secret
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / CREDENTIAL).is_file():
        return _read_secret(Path(directory) / CREDENTIAL, f"credential {CREDENTIAL}")
    return None


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{what} = {str(path)!r}: cannot read: {exc.strerror or exc}") from None


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    """The TLS context for the broker. Blocking file IO: call off the loop."""
    try:
        ca = str(config.tls_ca_file) if config.tls_ca_file is not None else None
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"mqtt.tls_ca_file = {str(config.tls_ca_file)!r}: cannot load: {exc}"
        ) from None
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if config.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    if config.tls_cert_file is not None:
        key = str(config.tls_key_file) if config.tls_key_file is not None else None
        try:
            context.load_cert_chain(str(config.tls_cert_file), key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.tls_cert_file = {str(config.tls_cert_file)!r}: cannot load the client "
                f"certificate or its key: {exc}"
            ) from None
    if config.tls_insecure:
        context.check_hostname = False
    return context


def mqtt_properties(packet_type: int) -> Properties:
    """Empty MQTT 5 properties for a packet type."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


class _PahoAtDebug(logging.Filter):
    """paho-mqtt logs a broken socket as an ERROR ("failed to receive on socket"); the
    connection loop already reports it, once, as a WARNING naming the broker."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("appliance.transports.mqtt").isEnabledFor(logging.DEBUG)


PAHO_LOG = logging.getLogger("appliance.transports.mqtt.paho")
PAHO_LOG.addFilter(_PahoAtDebug())


def client_options(
    config: MqttConfig,
    *,
    client_id: str,
    will_topic: str,
    password: str | None,
    tls: ssl.SSLContext | None,
) -> dict[str, Any]:
    """Keyword arguments for :class:`aiomqtt.Client`."""
    v5 = config.protocol == "5"
    properties = None
    if v5:
        properties = mqtt_properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = config.session_expiry
    return {
        "hostname": config.host,
        "port": config.port,
        "username": config.username or None,
        "password": password,
        "identifier": client_id,
        "protocol": aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        "will": aiomqtt.Will(will_topic, b"offline", qos=1, retain=True),
        "clean_session": None if v5 else False,
        # MQTT 5: never start clean; 3.1.1 says the same with clean_session above.
        "clean_start": False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        "keepalive": config.keepalive,
        "timeout": config.timeout,
        "properties": properties,
        "tls_context": tls,
        # paho must not check the host name itself when the context does not.
        "tls_insecure": True if tls is not None and config.tls_insecure else None,
        "logger": PAHO_LOG,
    }


__all__ = [
    "CREDENTIAL",
    "PAHO_LOG",
    "client_options",
    "mqtt_properties",
    "read_password",
    "tls_context",
]
