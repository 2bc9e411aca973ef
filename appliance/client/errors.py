"""Errors of the discovery client; each also subclasses the stdlib error it resembles."""

from __future__ import annotations

from appliance.errors import ApplianceError


class DiscoveryError(ApplianceError):
    """Base of every error the discovery client raises on purpose."""


class InterfaceNotFound(DiscoveryError, OSError):
    """A requested network interface does not exist or has no IPv4 address."""


class DiscoveryTimeout(DiscoveryError, TimeoutError):
    """What was waited for did not show up on the network in time."""


class NoApplianceAvailable(DiscoveryError, LookupError):
    """No ready appliance (serving the requested model) is known right now."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


__all__ = ["DiscoveryError", "DiscoveryTimeout", "InterfaceNotFound", "NoApplianceAvailable"]
