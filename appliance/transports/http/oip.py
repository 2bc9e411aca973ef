"""Open Inference Protocol v2 (KServe / Triton REST) routes.

Supports the JSON tensor form and the binary tensor data extension Triton clients use by
default. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from appliance import __version__
from appliance.core.types import Array, Capability, ModelInfo, ModelState
from appliance.errors import ModelUnavailable, RequestError, UnsupportedOperation
from appliance.protocol import oip_msgpack
from appliance.protocol.oip import PLATFORMS, decode_request, encode_outputs
from appliance.transports.http.errors import error_response, parse_json
from appliance.transports.http.keys import CORE, MODEL
from appliance.transports.http.negotiation import answers_msgpack, msgpack_request

routes = web.RouteTableDef()

HEADER_LENGTH = "Inference-Header-Content-Length"
# Only what is implemented: Triton clients call an extension's routes when it is listed
# (model_repository: /v2/repository/index, load and unload, in repository.py).
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_PLATFORMS = PLATFORMS


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": "appliance", "version": __version__, "extensions": EXTENSIONS}
    )


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    core = request.app[CORE]
    if core.ready:
        return web.json_response({"ready": True})
    reason = "loading models" if core.loading else "no model is ready"
    return error_response(request, 503, f"not ready: {reason}", headers={"Retry-After": "5"})


# Registered before the other /v2/models/{name}... routes (decorators apply bottom up):
# aiohttp tries the routes under one path prefix in registration order, and inference is
# the busy one.
@routes.post("/v2/models/{name}/versions/{version}/infer")
@routes.post("/v2/models/{name}/infer")
async def infer(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = request.match_info.get("version")
    request[MODEL] = name
    core = request.app[CORE]
    info = core.model(name, version)  # 404 before reading a large body for nothing
    if info.state is ModelState.READY and Capability.INFER not in info.capabilities:
        raise UnsupportedOperation(
            f"model {name!r} is a {info.runtime} language model; use /v1/chat/completions "
            "or /v1/completions",
            param="model",
        )
    raw = await request.read()
    header_length = request.headers.get(HEADER_LENGTH)
    is_msgpack = msgpack_request(request)  # once: each look parses Content-Type again
    if is_msgpack:
        # MessagePack: the JSON form's shape, with raw tensor bytes as ``data``.
        if header_length is not None:
            raise RequestError(f"{HEADER_LENGTH} does not apply to a MessagePack body")
        body, binary = oip_msgpack.binary_form(oip_msgpack.unpack(raw))
    elif header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise RequestError(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= split <= len(raw):
            raise RequestError(f"{HEADER_LENGTH} {split} is outside the body of {len(raw)} bytes")
        body, binary = parse_json(raw[:split]), raw[split:]
    else:
        body, binary = parse_json(raw), b""
    decoded = decode_request(body, binary)
    result = await core.infer(name, decoded.inputs, version=version, outputs=decoded.outputs)
    if answers_msgpack(request, is_msgpack):
        return _msgpack_answer(name, info.version, decoded.id, result.outputs)
    binary_names = decoded.binary_outputs
    if decoded.binary_default:
        binary_names = binary_names | set(result.outputs)
    tensors, blobs = encode_outputs(result.outputs, binary_names)
    answer: dict[str, Any] = {
        "model_name": name,
        "model_version": info.version,
        "outputs": tensors,
    }
    if decoded.id is not None:
        answer["id"] = decoded.id
    # orjson: the same document as json.dumps, compact, in a fraction of the time (floats
    # are written as their shortest round-trip form, as json does).
    header = orjson.dumps(answer)
    if not blobs:
        return web.Response(body=header, content_type="application/json")
    return web.Response(
        body=header + b"".join(blobs),
        headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
    )


@routes.get("/v2/models/{name}")
@routes.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: web.Request) -> web.Response:
    info = _info(request)
    meta = _metadata(info)
    if info.runtime != "pipeline":
        meta["versions"] = [v.version for v in request.app[CORE].versions(info.name)]
    return web.json_response(meta)


@routes.get("/v2/models/{name}/ready")
@routes.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    """200 when the model can serve now, else 400 (as Triton answers; the protocol asks
    for a 4xx). Not 503: that would read as the whole server being unavailable."""
    info = _info(request)
    if info.state is ModelState.READY:
        return web.json_response({"name": info.name, "ready": True})
    exc = ModelUnavailable(info.name, info.state.value, info.error)
    return error_response(request, 400, str(exc))


def _msgpack_answer(
    name: str, version: str, request_id: str | None, outputs: Mapping[str, Array]
) -> web.Response:
    answer: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "outputs": oip_msgpack.encode_outputs_msgpack(outputs),
    }
    if request_id is not None:
        answer["id"] = request_id
    return web.Response(body=oip_msgpack.pack(answer), content_type=oip_msgpack.CONTENT_TYPE)


def _info(request: web.Request) -> ModelInfo:
    return request.app[CORE].model(request.match_info["name"], request.match_info.get("version"))


def _metadata(info: ModelInfo) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": info.name,
        "versions": [info.version],
        "platform": _PLATFORMS.get(info.runtime, info.runtime),
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            for t in info.signature.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            for t in info.signature.outputs
        ],
        "state": info.state.value,
    }
    if info.error:
        meta["error"] = info.error
    return meta
