"""The gRPC server as a lifecycle unit: bind and start on enter, drain and stop on exit.

grpcio's asyncio server runs on the daemon's own event loop; grpcio's core adds a few
threads of its own for polling, which is why ``[grpc]`` is off unless asked for.
"""

from __future__ import annotations

import logging
from types import TracebackType

import grpc

from appliance.config import Config
from appliance.core.service import Core
from appliance.errors import ConfigError
from appliance.security.access import AccessPolicy
from appliance.transports.grpc import grpc_service_pb2_grpc
from appliance.transports.grpc.service import InferenceService

log = logging.getLogger(__name__)


class GrpcServer:
    """``inference.GRPCInferenceService`` on ``grpc.host``:``grpc.port``."""

    def __init__(self, core: Core, config: Config, access: AccessPolicy | None = None) -> None:
        self._core = core
        self._config = config
        self._access = access
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = self._config.grpc.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def __aenter__(self) -> GrpcServer:
        settings = self._config.grpc
        limit = settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # One daemon per port: a second one must fail to bind, not share the port.
                ("grpc.so_reuseport", 0),
            ]
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self._core, self._access), server
        )
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        http = self._config.http
        try:
            if http.tls_cert_file is not None:  # the HTTP side's certificate serves gRPC too
                cert = http.tls_cert_file.read_bytes()
                key = (http.tls_key_file or http.tls_cert_file).read_bytes()
                # Mutual TLS as on HTTP, where required. grpcio has no "optional" client
                # certificates: then gRPC asks for none, and its callers use API keys.
                client_ca = http.tls_client_ca if http.tls_client_auth == "required" else None
                credentials = grpc.ssl_server_credentials(
                    [(key, cert)],
                    root_certificates=client_ca.read_bytes() if client_ca else None,
                    require_client_auth=client_ca is not None,
                )
                self.port = server.add_secure_port(f"{host}:{settings.port}", credentials)
            else:
                self.port = server.add_insecure_port(f"{host}:{settings.port}")
        except RuntimeError as exc:
            raise OSError(f"cannot serve gRPC on {host}:{settings.port}: {exc}") from None
        except OSError as exc:  # a certificate file that vanished since HTTP loaded it
            raise ConfigError(f"gRPC cannot read its TLS files: {exc}") from None
        await server.start()
        self._server = server
        log.info("gRPC (Open Inference Protocol v2) listening on %s", self.address)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            # New calls are refused at once; running ones get the HTTP side's grace period.
            await server.stop(self._config.http.shutdown_timeout)
            log.info("gRPC stopped")
