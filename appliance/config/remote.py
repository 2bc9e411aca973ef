"""Configuration fragments the hub may roll out: which keys, and how they are checked.

A fragment is a TOML document holding only keys that may change remotely (:data:`REMOTE`):
per-model serving options, MQTT stream rules, alert thresholds and the log level. Keys,
tokens, TLS files, the hub URL, the device's identity and listening addresses are never
among them: a fragment naming one is refused by the hub when it is published and by the
device when it arrives (:func:`check`).

On the device a fragment becomes the drop-in ``remote-config.toml`` of the state
directory, read at start after ``appliance.toml`` and before the environment and flags
(``appliance.config.load(dropin=...)``), so the operator's file is never rewritten and
what the operator sets per start (environment, flags) still wins.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DROPIN_NAME = "remote-config.toml"
MAX_BYTES = 256 * 1024

# Section -> the keys a fragment may set there ("*": every key of the section).
REMOTE: dict[str, frozenset[str]] = {
    # Serving options; not where models live (dir, files), which is the device's own layout.
    "models": frozenset(
        {
            "queue_size",
            "parallel",
            "retry_after",
            "version_policy",
            "versions",
            "preload",
            "memory_budget",
            "max_loaded",
            "keep_alive",
            "load_wait",
        }
    ),
    "mqtt": frozenset({"rules", "sensor_rule"}),
    "alerts": frozenset({"*"}),
    # Not log_payloads: remotely turning on the logging of prompts would expose personal data.
    "logging": frozenset({"level"}),
}
# What takes effect on a reload (SIGHUP) of a running daemon; the rest at its next start.
LIVE = ("alerts", "logging")


def check(fragment: Any, *, origin: str = "fragment") -> dict[str, dict[str, Any]]:
    """The fragment, if it names only remotely changeable keys; else :class:`ConfigError`
    naming the first key that may not change remotely."""
    if not isinstance(fragment, dict) or not fragment:
        raise ConfigError(f"{origin}: empty; name at least one of [{'], ['.join(REMOTE)}]")
    for section, values in fragment.items():
        allowed = REMOTE.get(section)
        if allowed is None:
            raise ConfigError(
                f"{origin}: [{section}] may not change remotely; "
                f"a fragment may hold only [{'], ['.join(REMOTE)}]"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {section!r} must be a [{section}] table")
        for key in values:
            if "*" not in allowed and key not in allowed:
                raise ConfigError(
                    f"{origin}: {section}.{key} may not change remotely; "
                    f"allowed in [{section}]: {', '.join(sorted(allowed))}"
                )
    return fragment


def parse(text: str, *, origin: str = "fragment") -> dict[str, dict[str, Any]]:
    """A fragment's TOML text, parsed and :func:`check`-ed."""
    if len(text.encode()) > MAX_BYTES:
        raise ConfigError(f"{origin}: larger than {MAX_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin} is not valid TOML: {exc}") from None
    return check(data, origin=origin)


def read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse(text, origin=str(path))


def sections(fragment: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(fragment)


__all__ = ["DROPIN_NAME", "LIVE", "REMOTE", "check", "parse", "read"]
