"""The one place where errors become HTTP responses.

OpenAI routes answer in OpenAI's error shape (``{"error": {"message", "type", "param",
"code"}}``) so the official client raises the right exception; every other route answers
``{"error": "..."}`` as the Open Inference Protocol asks. Unexpected exceptions are logged
with their traceback and answered with a generic 500 that reveals nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from aiohttp import web

from appliance.errors import (
    Forbidden,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    RequestTimeout,
    ShuttingDown,
    Unauthenticated,
)
from appliance.protocol import oip_msgpack, strictjson
from appliance.transports.http.keys import CONFIG
from appliance.transports.http.negotiation import answers_msgpack

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


def error_response(
    request: web.Request,
    status: int,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in the shape the route's protocol expects."""
    body: dict[str, Any]
    if request.path.startswith("/v1/"):
        body = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error"),
                "param": param,
                "code": None,
            }
        }
    else:
        body = {"error": message}
    if (
        request.path.startswith("/v2/")
        and request.path.endswith("/infer")
        and (answers_msgpack(request))
    ):
        # The inference routes negotiate MessagePack; so do their errors.
        packed = {**(headers or {}), "Content-Type": oip_msgpack.CONTENT_TYPE}
        return web.Response(body=oip_msgpack.pack(body), status=status, headers=packed)
    return web.json_response(body, status=status, headers=headers)


def from_exception(request: web.Request, exc: BaseException) -> web.StreamResponse:
    """Map an exception raised while handling ``request`` to a response."""
    if isinstance(exc, Unauthenticated):
        challenge = 'Bearer realm="appliance"'
        if "Authorization" in request.headers or "X-API-Key" in request.headers:
            challenge += ', error="invalid_token"'
        return error_response(
            request, 401, str(exc), param="Authorization", headers={"WWW-Authenticate": challenge}
        )
    if isinstance(exc, Forbidden):
        return error_response(request, 403, str(exc))
    if isinstance(exc, RateLimited):
        return error_response(
            request, 429, str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        )
    if isinstance(exc, RequestTimeout):
        return error_response(request, 408, str(exc), headers={"Connection": "close"})
    if isinstance(exc, PayloadTooLarge):
        return error_response(request, 413, str(exc), param=exc.param)
    if isinstance(exc, RequestError):
        return error_response(request, 400, exc.message, param=exc.param)
    if isinstance(exc, ModelNotFound):
        return error_response(request, 404, str(exc), param="model")
    if isinstance(exc, Overloaded):
        return error_response(
            request, 503, str(exc), headers={"Retry-After": str(math.ceil(exc.retry_after))}
        )
    if isinstance(exc, (ModelUnavailable, ShuttingDown)):
        return error_response(request, 503, str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, web.RequestPayloadError):
        # The body's Content-Encoding or chunked framing is broken (raised by request.read()).
        cause = getattr(exc.__cause__, "message", "") or "malformed body"
        return error_response(
            request, 400, f"the request body cannot be decoded: {cause}", param="body"
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[CONFIG].http.max_body_bytes
        return error_response(
            request,
            413,
            f"request body is larger than the limit of {limit} bytes",
            param="body",
        )
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            return error_response(request, 404, f"no route for {request.method} {request.path}")
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            return error_response(
                request,
                405,
                f"method {request.method} is not allowed for {request.path}; allowed: {allowed}",
                headers={"Allow": allowed},
            )
        text = exc.text or exc.reason
        # The exception's own Content-Type/Length describe its plain-text body, not ours.
        skip = ("content-type", "content-length")
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in skip}
        return error_response(request, exc.status, text, headers=headers)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(request, 500, "internal error; see the appliance log")


async def read_json(request: web.Request) -> Any:
    """The request body parsed as JSON, or a 400 naming what is wrong."""
    raw = await request.read()
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed by the strict reader (``appliance.protocol.strictjson``)."""
    if not raw:
        raise RequestError("the request body is empty; a JSON object is expected", param="body")
    return strictjson.loads(raw)
