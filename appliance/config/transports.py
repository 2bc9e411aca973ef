"""Sections of the WebSocket and gRPC transports."""

from __future__ import annotations

from pydantic import (
    Field,
    field_validator,
)

from appliance.config.base import Section


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
            raise ValueError(
                "gRPC needs grpcio, which is not installed: pip install 'appliance[grpc]'"
            )
        return value


# ---------------------------------------------------------------------------- security
