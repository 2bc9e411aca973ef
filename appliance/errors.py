"""The error hierarchy shared by the core and every transport.

Each class also subclasses the stdlib error it resembles, so callers that only know the
stdlib can still catch it. Transports map these to protocol errors in exactly one place
(HTTP: ``transports/http/errors.py``); nothing else decides a status code.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError, ValueError):
    """The configuration is invalid; the message names the key, the value and what is allowed."""


class RequestError(ApplianceError, ValueError):
    """The client sent something invalid (HTTP 400).

    ``param`` names the offending field when there is one, so clients can point at it.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class PayloadTooLarge(RequestError):
    """The request body is larger than the configured limit (HTTP 413)."""


class ModelNotFound(ApplianceError, LookupError):
    """No model of that name (or version) is in the repository (HTTP 404)."""

    def __init__(self, name: str, version: str | None = None) -> None:
        what = f"model {name!r}" if version is None else f"model {name!r} version {version!r}"
        super().__init__(f"{what} not found")
        self.name = name
        self.version = version


class ModelUnavailable(ApplianceError, RuntimeError):
    """The model exists but is not ready: still loading, or failed to load (HTTP 503)."""

    def __init__(self, name: str, state: str, reason: str | None = None) -> None:
        msg = f"model {name!r} is not ready (state: {state})"
        if reason:
            msg += f": {reason}"
        super().__init__(msg)
        self.name = name
        self.state = state


class UnsupportedOperation(RequestError):
    """The model cannot do what was asked, e.g. chat on an ONNX classifier (HTTP 400)."""


class Overloaded(ApplianceError, RuntimeError):
    """The model's queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"model {name!r} is busy: its request queue is full, retry later")
        self.name = name
        self.retry_after = retry_after


class ModelLoadError(ApplianceError, RuntimeError):
    """A model could not be loaded (missing file, bad checksum, corrupt file)."""


class ShuttingDown(ApplianceError, RuntimeError):
    """The daemon is stopping and accepts no new work (HTTP 503)."""


class Unauthenticated(ApplianceError, PermissionError):
    """No valid API key came with a request that needs one (HTTP 401)."""


class Forbidden(ApplianceError, PermissionError):
    """The client may not do this: a key without the scope, an address outside the
    allow-list, a Host header that names another site (HTTP 403)."""


class RateLimited(ApplianceError, RuntimeError):
    """The client or key used up its request budget; retry after ``retry_after`` (HTTP 429)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(ApplianceError, TimeoutError):
    """The client took too long to send its request (HTTP 408)."""
