"""The ``inference.GRPCInferenceService`` servicer: translate messages, call the core.

Tensors are decoded by the same Open Inference Protocol decoder as HTTP (``protocol/oip.py``):
``raw_input_contents`` becomes the binary tensor data extension's form and typed
``contents`` become its ``data`` lists, so every check and message is shared. Outputs
always go back in ``raw_output_contents``, as Triton answers.

Every call passes through :meth:`InferenceService._call`, the one place that maps errors to
gRPC status codes (:func:`status_of`), counts metrics and applies the HTTP side's access
policy: the client's address, the ``authorization`` / ``x-api-key`` metadata and the scope
of the HTTP route each RPC corresponds to (:data:`HTTP_EQUIVALENT`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from appliance import __version__
from appliance.core.service import Core
from appliance.core.types import ModelInfo, ModelState
from appliance.errors import (
    Forbidden,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    ShuttingDown,
    Unauthenticated,
)
from appliance.protocol import oip
from appliance.protocol.oip import DecodedRequest
from appliance.security.access import AccessPolicy
from appliance.transports.grpc import grpc_service_pb2 as pb
from appliance.transports.http.scopes import scope_of

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# Which InferTensorContents field carries each datatype (FP16 has none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from errors to gRPC status codes."""
    if isinstance(exc, PayloadTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, exc.message
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (Overloaded, ModelUnavailable, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, RateLimited):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    log.error("unhandled error in a gRPC call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the appliance log"


# The HTTP route each RPC does the same as: its scope and whether it is public come from the
# HTTP side's table and ``security.public``, so both transports apply one policy.
HTTP_EQUIVALENT: dict[str, tuple[str, str]] = {
    "ServerLive": ("GET", "/v2/health/live"),
    "ServerReady": ("GET", "/v2/health/ready"),
    "ModelReady": ("GET", "/v2/models/{name}/ready"),
    "ServerMetadata": ("GET", "/v2"),
    "ModelMetadata": ("GET", "/v2/models/{name}"),
    "ModelInfer": ("POST", "/v2/models/{name}/infer"),
}


class InferenceService:
    """Implements the RPCs of ``grpc_service.proto`` on top of the core."""

    def __init__(self, core: Core, access: AccessPolicy | None = None) -> None:
        self.core = core
        self.access = access

    # -- health and metadata ----------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return await self._call(
            "ServerLive", context, "", lambda: _done(pb.ServerLiveResponse(live=True))
        )

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return await self._call(
            "ServerReady", context, "", lambda: _done(pb.ServerReadyResponse(ready=self.core.ready))
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        async def work() -> pb.ModelReadyResponse:
            info = self._info(request.name, request.version)
            return pb.ModelReadyResponse(ready=info.state is ModelState.READY)

        return await self._call("ModelReady", context, request.name, work)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        answer = pb.ServerMetadataResponse(name="appliance", version=__version__)
        return await self._call("ServerMetadata", context, "", lambda: _done(answer))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            info = self._info(request.name, request.version)
            answer = pb.ModelMetadataResponse(
                name=info.name,
                versions=[info.version],
                platform=oip.PLATFORMS.get(info.runtime, info.runtime),
            )
            for spec in info.signature.inputs:
                answer.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            for spec in info.signature.outputs:
                answer.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
            return answer

        return await self._call("ModelMetadata", context, request.name, work)

    # -- inference --------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        async def work() -> pb.ModelInferResponse:
            name, version = request.model_name, request.model_version or None
            info = self._info(name, version)  # NOT_FOUND before decoding tensors
            decoded = decode_infer_request(request)
            result = await self.core.infer(
                name, decoded.inputs, version=version, outputs=decoded.outputs
            )
            tensors, blobs = oip.encode_outputs(result.outputs, set(result.outputs))
            answer = pb.ModelInferResponse(
                model_name=info.name,
                model_version=info.version,
                id=request.id,
                raw_output_contents=blobs,
            )
            for tensor in tensors:
                answer.outputs.add(
                    name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
                )
            return answer

        return await self._call("ModelInfer", context, request.model_name, work)

    # -- the one entry point ----------------------------------------------------------

    async def _call(
        self, method: str, context: Context, model: str, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one RPC: access checks, then the work; errors become status codes here and
        nowhere else."""
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED  # unless the call finishes one way or the other
        try:
            if self.access is not None:
                self._check_access(method, context)
            result = await work()
            code = grpc.StatusCode.OK
            return result
        except Exception as exc:
            code, message = status_of(exc)
            if isinstance(exc, (Overloaded, RateLimited)):
                context.set_trailing_metadata(
                    (("retry-after", str(max(1, math.ceil(exc.retry_after)))),)
                )
            await context.abort(code, message)
        finally:
            self._count(method, model, code, time.perf_counter() - started)

    def _check_access(self, method: str, context: Context) -> None:
        """The HTTP side's checks, in its order: allow-list, key, scope, rate limit."""
        access = self.access
        assert access is not None
        peer = _peer_address(context.peer())
        access.check_network(peer, None, None)  # no Host header: gRPC is not a browser's
        http_method, template = HTTP_EQUIVALENT[method]
        key = None
        if not access.is_public(template):
            metadata = {
                k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
            }
            key = access.authenticate(
                metadata.get("authorization"),
                metadata.get("x-api-key"),
                _certificate(context) if access.store.certs else None,
            )
            access.authorize(key, scope_of(http_method, template))
        access.limit(peer, key)

    def _info(self, name: str, version: str | None) -> ModelInfo:
        if not name:
            raise RequestError("a model name is required", param="name")
        return self.core.model(name, version or None)

    def _count(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        self.core.count_request("grpc", method, model, code.name, seconds)


def decode_infer_request(request: pb.ModelInferRequest) -> DecodedRequest:
    """A ``ModelInferRequest`` in core terms, through the shared OIP decoder."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs; "
            "raw contents are given for every input or for none",
            param="raw_input_contents",
        )
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if raw:
            blob: bytes | None = raw[index]
        elif tensor.datatype == "BYTES":
            blob = b"".join(
                len(v).to_bytes(4, "little") + v for v in tensor.contents.bytes_contents
            )
        else:
            blob = None
            field = _CONTENTS.get(tensor.datatype)
            if field is None and tensor.datatype == "FP16":
                raise RequestError(
                    f"input tensor {tensor.name!r}: FP16 has no typed contents field; send it "
                    "in raw_input_contents",
                    param="inputs",
                )
            item["data"] = list(getattr(tensor.contents, field)) if field else []
        if blob is not None:
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        inputs.append(item)
    body: dict[str, Any] = {
        "inputs": inputs,
        "outputs": [{"name": out.name} for out in request.outputs],
    }
    if request.id:
        body["id"] = request.id
    return oip.decode_request(body, b"".join(blobs))


async def _done(value: T) -> T:
    return value


def _certificate(context: Context) -> str | None:
    """The CN of the client certificate the TLS handshake verified (mutual TLS), if any."""
    names = context.auth_context().get("x509_common_name") or ()
    for name in names:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return None


def _peer_address(peer: str) -> str | None:
    """The address in a gRPC peer string: ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return None
