"""aiohttp's server log, with clients' framing errors kept to one rate-limited line.

aiohttp answers what its HTTP parser cannot take (a header with a NUL byte, a bad request
line) with a 400 before any application code runs, and logs it with ``logger.exception``
on ``aiohttp.server``: a full traceback. A body whose Content-Encoding does not decode is
answered by the application, but aiohttp then tries to drain the rest of that body and
logs the same error again, with a traceback. Both are the client's doing, so any client
could write tracebacks into the log at will.

:class:`ServerLog` is the ``logger`` aiohttp's request handler is given (an ``AppRunner``
option, see ``security.runner_options``): errors a client caused become one WARNING line
without a traceback, at most one per :data:`INTERVAL` seconds, saying how many were left
out meanwhile; everything else passes through unchanged, tracebacks included.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

INTERVAL = 60.0  # seconds between two warnings about clients' bad framing
_LONGEST = 200  # characters of the error shown; its text can quote what the client sent


def client_fault(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a client's malformed request rather than a fault of the server."""
    if isinstance(exc, web.RequestPayloadError):  # the body's encoding or chunking is broken
        return True
    return isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``aiohttp.server`` as aiohttp's request handler uses it, minus clients' tracebacks."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(logger, {})
        self.interval = interval
        self._clock = clock
        # Per kind of error (a handful of exception classes): when the next line may go
        # out, and how many were left out since the last one.
        self._next: dict[type[BaseException], float] = {}
        self._left_out: dict[type[BaseException], int] = {}

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if exc is None or not client_fault(exc):
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)  # what .exception does
            return
        kind, now = type(exc), self._clock()
        if now < self._next.get(kind, 0.0):
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        self._next[kind] = now + self.interval
        left_out = self._left_out.pop(kind, 0)
        # One line: the message quotes raw header bytes over several lines.
        text = _STATUS.sub("", " ".join(str(exc).split()))
        if len(text) > _LONGEST:
            text = text[: _LONGEST - 3] + "..."
        more = f" ({left_out} more like it in the last {self.interval:g} s)" if left_out else ""
        self.logger.warning("bad request from a client, answered 400: %s%s", text, more)


_STATUS = re.compile(r"^\d{3}, message: ")  # how aiohttp's errors print their status


__all__ = ["INTERVAL", "ServerLog", "client_fault"]
