"""Sections of the daemon itself: device, HTTP, models and their lifecycle, logging, cache."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from appliance.config.base import DEVICE_ID_PATTERN, Section, TlsFilesSection


class DeviceConfig(Section):
    """Who this box is; MQTT topics, mDNS names and the hub all use it."""

    id: str = Field(
        default="",
        pattern=r"^$|" + DEVICE_ID_PATTERN,
        description="Stable device id: lower-case letters, digits and '-', at most 63 "
        "characters. Empty means derived from /etc/machine-id (or the hostname).",
    )
    name: str = Field(
        default="",
        max_length=128,
        description="Human name shown in discovery and on the hub. Empty means the hostname.",
    )


class HttpConfig(TlsFilesSection):
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
    tls_client_ca: Path | None = Field(
        default=None,
        description="CA certificate(s) (PEM) that sign client certificates (`appliance certs "
        "client` makes them): mutual TLS on this port and gRPC, see tls_client_auth. Unset: "
        "clients are not asked for a certificate.",
    )
    tls_client_auth: Literal["required", "optional"] = Field(
        default="required",
        description="With tls_client_ca: 'required' fails the TLS handshake of a client "
        "without a certificate signed by that CA; 'optional' lets such clients in (they "
        "need an API key as usual) and still refuses a certificate the CA did not sign.",
    )


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
    parallel: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Requests a model runs at the same time (per-model option overrides); "
        "unset: each runtime's own default (ONNX 1, GGUF slots sized to the machine).",
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
        default=0,
        ge=0,
        le=1024,
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
        default=0.1,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Share of requests (0-1] routed to the canary in split mode.",
    )
    window: float = Field(
        default=300.0,
        gt=0,
        le=7 * 86_400,
        allow_inf_nan=False,
        description="Seconds over which canary and stable are compared; a canary that holds "
        "for a whole window is promoted.",
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=1_000_000,
        description="Canary requests in the window before it is judged.",
    )
    max_error_rate_increase: float = Field(
        default=0.02,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Roll back when the canary's error rate exceeds stable's by more than "
        "this (0-1).",
    )
    max_latency_ratio: float = Field(
        default=1.5,
        ge=1,
        le=1000,
        allow_inf_nan=False,
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
        default="",
        max_length=4000,
        description="For a language model: the prompt, with {output_name} placeholders "
        "filled from the previous step's outputs. Empty: a tensor step fed the inputs.",
    )
    when: str = Field(
        default="",
        max_length=128,
        description="Run this step only when this BOOL output of the previous step is true "
        "for some element. Empty: always.",
    )
    max_tokens: int = Field(default=96, ge=1, le=4096, description="Language steps: tokens.")
    output: str = Field(
        default="text",
        max_length=128,
        description="Language steps: name of the BYTES output tensor holding the answer.",
    )


class Pipeline(Section):
    """A declarative chain of models served as one tensor model of its own name."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Name clients use (like a model name).",
    )
    description: str = Field(default="", max_length=500, description="One line.")
    steps: list[PipelineStep] = Field(
        min_length=1, max_length=16, description="Steps, first to last."
    )


class PipelinesConfig(Section):
    """Pipelines: ``[[pipelines.chain]]`` tables, each served as a model (docs/models.md)."""

    chain: list[Pipeline] = Field(
        default_factory=list,
        max_length=64,
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


class CacheConfig(Section):
    """The result cache: repeated identical requests answered without running the model.

    Off for every model unless its manifest says ``cache = true`` or it is listed in
    ``models``. Keyed by model, version and a hash of the inputs, so a new model version
    never answers from an old one's results.
    """

    models: list[str] = Field(
        default_factory=list,
        max_length=256,
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
        default=64 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024 * 1024,
        description="Most bytes of results kept (memory backend); the least recently used "
        "go first.",
    )
    max_entry_bytes: int = Field(
        default=1024 * 1024,
        ge=64,
        le=512 * 1024 * 1024,
        description="Results larger than this are not cached.",
    )
    ttl: float = Field(
        default=300.0,
        gt=0,
        le=30 * 86_400,
        allow_inf_nan=False,
        description="Seconds a result stays valid (a model's cache_ttl option overrides).",
    )
    redis_url: str = Field(
        default="",
        max_length=2048,
        description="redis://[user:password@]host:port/db or unix:///path (redis backend).",
    )
    redis_prefix: str = Field(
        default="appliance:cache:", max_length=128, description="Prefix of every Redis key."
    )
    redis_timeout: float = Field(
        default=0.25,
        gt=0,
        le=60,
        allow_inf_nan=False,
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
