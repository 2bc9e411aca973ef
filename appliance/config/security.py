"""Sections for API keys, access control and request limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from appliance.config.base import Section

Scope = Literal["read", "infer", "admin"]
_KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ApiKeyEntry(Section):
    """One API key, by name: only its hash is stored (``appliance keys create`` prints both)."""

    name: str = Field(
        pattern=_KEY_NAME_PATTERN,
        description="Key name (letters, digits, '_', '.', '-'); logged, never the key itself.",
    )
    scopes: list[Scope] = Field(
        min_length=1, description="What the key may do: read, infer, admin (admin: all)."
    )
    hash: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="'sha256:<hex>' of the key, from `appliance keys create`.",
    )


class ClientCertEntry(Section):
    """A client certificate that stands in for an API key, by its common name (CN).

    Also written ``NAME:SCOPE[+SCOPE]`` (how the environment variable lists them)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        description="The certificate's common name (CN), e.g. what `appliance "
        "certs client NAME` put there; logged as 'cert:NAME'.",
    )
    scopes: list[Scope] = Field(
        min_length=1, description="What its holder may do: read, infer, admin (admin: all)."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        name, sep, scopes = value.partition(":")
        if not sep:
            raise ValueError(f"{value!r}: expected a table, or 'NAME:SCOPE[+SCOPE]'")
        return {"name": name.strip(), "scopes": [s.strip() for s in scopes.split("+")]}


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
        default_factory=list,
        max_length=1024,
        description="API keys, TOML only: [[security.keys]] tables with name, scopes, hash.",
    )
    keys_file: Path | None = Field(
        default=None,
        description="File of more keys, one 'NAME SCOPE[,SCOPE] sha256:HEX' a line. The "
        "systemd credential 'api-keys' ($CREDENTIALS_DIRECTORY/api-keys) is read too.",
    )
    public: list[str] = Field(
        # The API reference is no secret: a browser opens /docs without a key (its "Try it"
        # forms send the key typed into the page).
        default_factory=lambda: [
            "/",
            "/health",
            "/metrics",
            "/v2/health/live",
            "/v2/health/ready",
            "/docs",
            "/openapi.json",
        ],
        max_length=256,
        description="Paths served without a key: exact, or ending in '*' for a prefix.",
    )
    allow: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description="Client networks allowed at all (CIDRs, IPv4 or IPv6, e.g. "
        "192.168.1.0/24, fd00::/8); others get 403 before their body is read. Empty: any.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Reverse proxies (CIDRs) whose forwarded_header is believed: a request "
        "from one of them counts as coming from the rightmost address in that header that "
        "is not itself a trusted proxy, for the allow-list, rate limits and logs. Empty: "
        "the header is ignored and the connection's address counts.",
    )
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = Field(
        default="x-forwarded-for",
        description="The header the trusted proxies write: X-Forwarded-For, or RFC 7239 "
        "Forwarded (its for= parameters). Only this one is read; configure the proxy to "
        "append to it.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Host header names accepted besides the box's own names, its addresses, "
        "localhost and *.local (DNS-rebinding guard); '*.example.org' matches subdomains, "
        "'*' turns the check off.",
    )
    rate_per_client: float = Field(
        default=0.0,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="Requests per second one client address may make on average (token "
        "bucket); beyond it 429 with Retry-After. 0: no limit.",
    )
    burst_per_client: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Requests a client address may make at once before rate_per_client applies.",
    )
    rate_per_key: float = Field(
        default=0.0,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="Requests per second one API key may make on average; 0: no limit.",
    )
    burst_per_key: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Requests one API key may make at once before rate_per_key applies.",
    )
    client_certs: list[ClientCertEntry] = Field(
        default_factory=list,
        max_length=1024,
        description="Client certificates accepted instead of an API key: "
        "[[security.client_certs]] tables with name (the certificate's CN) and scopes, or "
        "'NAME:SCOPE[+SCOPE]' strings (sensor-1:infer+read). Needs http.tls_client_ca; an "
        "API key sent along wins. Re-read on SIGHUP, like the keys.",
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
                raise ValueError(
                    f"{item!r} must be a path starting with '/', optionally ending in '*'"
                )
        return value

    @field_validator("client_certs")
    @classmethod
    def _unique_certs(cls, value: list[ClientCertEntry]) -> list[ClientCertEntry]:
        names = [entry.name for entry in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"certificate names must be unique; repeated: {', '.join(repeated)}")
        return value

    @field_validator("allow", "trusted_proxies")
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
        "that encrypts stored data with AES-256-GCM: the records of the hub outbox and the "
        "results of the Redis cache. The systemd credential 'data-key' is read too. Unset: "
        "stored in plain (JSON, msgpack).",
    )


class LimitsConfig(Section):
    """Limits on what one HTTP request or connection may cost. The body's size limit is
    http.max_body_bytes, counted after Content-Encoding (gzip, deflate, br) is undone, so
    a compression bomb stops there."""

    max_header_bytes: int = Field(
        default=8190,
        ge=1024,
        le=1024 * 1024,
        description="Longest request line or header field; longer ones get 400.",
    )
    max_headers: int = Field(
        default=100, ge=8, le=10_000, description="Most header fields in one request."
    )
    max_chunks: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Most chunks in one chunked request body; more get 413.",
    )
    request_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds a client may take to send a request's body; slower gets 408.",
    )
    idle_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds a connection may stay idle, or take to send a request's "
        "headers, before it is closed (slowloris guard).",
    )
