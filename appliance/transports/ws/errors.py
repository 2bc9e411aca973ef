"""The one place where errors become WebSocket ``error`` messages.

``status`` is the HTTP status the same problem gets on the HTTP routes, so clients handle
both transports alike; busy answers carry ``retry_after`` like HTTP's ``Retry-After``.
Unexpected exceptions are logged with their traceback and answered with a message that
reveals nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from appliance.errors import (
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    ShuttingDown,
)

log = logging.getLogger(__name__)


def error_message(request_id: Any, exc: BaseException) -> dict[str, Any]:
    """The ``error`` reply for ``exc`` raised while serving request ``request_id``."""
    retry_after: float | None = None
    param: str | None = None
    if isinstance(exc, RequestError):
        status, param = (413 if isinstance(exc, PayloadTooLarge) else 400), exc.param
        text = exc.message
    elif isinstance(exc, ModelNotFound):
        status, param, text = 404, "model", str(exc)
    elif isinstance(exc, Overloaded):
        status, text, retry_after = 503, str(exc), exc.retry_after
    elif isinstance(exc, (ModelUnavailable, ShuttingDown)):
        status, text, retry_after = 503, str(exc), 5.0
    else:
        log.error("unhandled error on WebSocket request %r", request_id, exc_info=exc)
        status, text = 500, "internal error; see the appliance log"
    return reply(request_id, status, text, param=param, retry_after=retry_after)


def reply(
    request_id: Any,
    status: int,
    text: str,
    *,
    param: str | None = None,
    retry_after: float | None = None,
) -> dict[str, Any]:
    """An ``error`` message."""
    message: dict[str, Any] = {"type": "error", "id": request_id, "status": status, "error": text}
    if param is not None:
        message["param"] = param
    if retry_after is not None:
        message["retry_after"] = math.ceil(retry_after)
    return message
