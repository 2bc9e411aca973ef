"""The configuration machinery: sections, loading from file, environment and flags,
error messages that name key, value, source and what is allowed, and the reference."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
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

DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Section(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TlsFilesSection(Section):
    """A section with ``tls_cert_file``/``tls_key_file`` (and maybe ``tls_client_ca``)
    fields: a key, and a client CA, need the section's certificate.

    The fields themselves (and their descriptions) stay in each section; this base holds
    the one cross-field check they share.
    """

    @field_validator("tls_key_file", check_fields=False)
    @classmethod
    def _key_needs_cert(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert_file") is None:
            raise ValueError("tls_key_file needs tls_cert_file")
        return value

    @field_validator("tls_client_ca", check_fields=False)
    @classmethod
    def _client_ca_needs_tls(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert_file") is None:
            raise ValueError(
                "tls_client_ca needs tls_cert_file: client certificates are part of a TLS handshake"
            )
        return value


RootT = TypeVar("RootT", bound=BaseModel)


def to_toml(config: BaseModel, *, header: str = "") -> str:
    """``config`` as TOML that :func:`load_model` reads back to the same values.

    TOML has no null: keys whose value is ``None`` are left out, which gives them their
    default again (every such default is ``None``).
    """
    import tomli_w

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    text = tomli_w.dumps(strip(config.model_dump(mode="json")))
    return (header + "\n\n" if header else "") + text


def load_model(
    root: type[RootT],
    *,
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    env_prefix: str = ENV_PREFIX,
    env_config_file: str = ENV_CONFIG_FILE,
    layers: Sequence[tuple[Mapping[str, Mapping[str, Any]], str]] = (),
) -> RootT:
    """Load any sectioned configuration model (the daemon's, the hub's) the same way.

    ``layers``: (values, where they come from) merged after the file and before the
    environment, e.g. a drop-in the hub rolled out (``appliance.config.remote``)."""
    env = {} if env is None else env
    raw: dict[str, dict[str, Any]] = {}
    sources: dict[tuple[str, str], str] = {}

    if path is None and env.get(env_config_file):
        path = Path(env[env_config_file])
    if path is not None:
        _merge(raw, sources, _read_file(root, path), str(path))
    for values, origin in layers:
        _merge(raw, sources, values, origin)
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


def reference(
    root: type[BaseModel],
    *,
    title: str = "Configuration reference",
    command: str = "appliance config --reference",
    env_prefix: str = ENV_PREFIX,
    env_config_file: str = ENV_CONFIG_FILE,
) -> str:
    """Markdown reference of every key, generated from the models so it cannot drift."""
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
