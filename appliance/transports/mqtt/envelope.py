"""Payload codecs and the reply envelope: the one place errors become MQTT error replies.

Every reply is one envelope, zigbee2mqtt style::

    {"status": "ok",    "id": <echoed>, "device": "<device id>", "data": {...}}
    {"status": "error", "id": <echoed>, "device": "<device id>",
     "error": {"code": "busy", "message": "...", "retry_after": 1.0}}

Streamed replies add ``seq`` (0, 1, 2 ...) and ``done`` (``true`` on the last message).
Payloads are JSON, or MessagePack when the request said so (MQTT 5 content type
``application/msgpack`` or the ``/msgpack`` topic suffix); replies use the request's format.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from appliance.errors import (
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    ShuttingDown,
)
from appliance.protocol import oip_msgpack, strictjson

log = logging.getLogger(__name__)

MSGPACK_SUFFIX = "msgpack"
# Seconds a client should wait before retrying a model that is loading or a daemon stopping.
UNAVAILABLE_RETRY_AFTER = 5.0


class Format(enum.Enum):
    """How a payload is encoded."""

    JSON = "application/json"
    MSGPACK = "application/msgpack"

    @property
    def content_type(self) -> str:
        return self.value

    @classmethod
    def from_content_type(cls, content_type: str | None) -> Format | None:
        """The format an MQTT 5 content type names; ``None`` for none or an unknown one."""
        if not content_type:
            return None
        media = content_type.split(";", 1)[0].strip().lower()
        if media in oip_msgpack.CONTENT_TYPES:
            return cls.MSGPACK
        if media == "application/json" or media.endswith("+json"):
            return cls.JSON
        return None


# ------------------------------------------------------------------------------ codecs

# A ``\uD800``-``\uDFFF`` escape: json accepts lone surrogates, which no UTF-8 text can hold.


def decode(raw: bytes, fmt: Format, *, allow_text: bool = False) -> Any:
    """The payload as Python values, or :class:`RequestError` naming what is wrong.

    With ``allow_text`` a payload that is not JSON and does not start like a JSON object or
    array is returned as plain text, so ``mosquitto_rr -m 'Once upon a time'`` works as a
    prompt.
    """
    if not raw:
        raise RequestError("the payload is empty", param="payload")
    if fmt is Format.MSGPACK:
        return oip_msgpack.unpack(raw)
    try:
        return strictjson.loads(raw, what="the payload", param="payload")
    except strictjson.Unparsable:
        # Not JSON (or digits past the int-string limit): a prompt, unless it looks like a
        # JSON document that went wrong.
        if allow_text and raw.lstrip()[:1] not in (b"{", b"["):
            return _text(raw)
        raise


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the payload is not UTF-8 text", param="payload") from None


def encode(value: Any, fmt: Format) -> bytes:
    if fmt is Format.MSGPACK:
        return oip_msgpack.pack(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- envelope


def ok(data: Mapping[str, Any], *, request_id: Any, device: str, **extra: Any) -> dict[str, Any]:
    """A success envelope; ``extra`` adds stream fields (``seq``, ``done``)."""
    envelope: dict[str, Any] = {"status": "ok"}
    if request_id is not None:
        envelope["id"] = request_id
    envelope["device"] = device
    envelope.update(extra)
    envelope["data"] = dict(data)
    return envelope


def failure(
    error: Mapping[str, Any], *, request_id: Any, device: str, **extra: Any
) -> dict[str, Any]:
    envelope: dict[str, Any] = {"status": "error"}
    if request_id is not None:
        envelope["id"] = request_id
    envelope["device"] = device
    envelope.update(extra)
    envelope["error"] = dict(error)
    return envelope


def error_body(exc: BaseException) -> dict[str, Any]:
    """Map an exception to the ``error`` member of a reply (the only place that does).

    ``code`` is one of ``bad_request``, ``too_large``, ``not_found``, ``busy``,
    ``unavailable`` and ``internal``; ``busy`` and ``unavailable`` carry ``retry_after``
    seconds. Unexpected exceptions are logged with their traceback and reveal nothing.
    """
    if isinstance(exc, PayloadTooLarge):
        return _error("too_large", exc.message, exc.param)
    if isinstance(exc, RequestError):
        return _error("bad_request", exc.message, exc.param)
    if isinstance(exc, ModelNotFound):
        return _error("not_found", str(exc), "model")
    if isinstance(exc, Overloaded):
        return _error("busy", str(exc), None, retry_after=exc.retry_after)
    if isinstance(exc, (ModelUnavailable, ShuttingDown)):
        return _error("unavailable", str(exc), None, retry_after=UNAVAILABLE_RETRY_AFTER)
    log.error("unhandled error on an MQTT request", exc_info=exc)
    return _error("internal", "internal error; see the appliance log", None)


def _error(
    code: str, message: str, param: str | None, *, retry_after: float | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if param is not None:
        body["param"] = param
    if retry_after is not None and math.isfinite(retry_after):
        body["retry_after"] = retry_after
    return body


RETRYABLE = frozenset({"busy", "unavailable", "internal"})
