"""Find appliances on the LAN and spread requests over them.

Appliances announce themselves over mDNS/DNS-SD (``_appliance._tcp``, see
:mod:`appliance.protocol.dnssd` for the TXT record). A browser keeps the set current as they come,
change (readiness, models) and go, and picks a ready one serving a model::

    from openai import OpenAI
    from appliance.client import ApplianceBrowser

    with ApplianceBrowser() as fleet:
        fleet.wait_for("qwen2.5-0.5b-instruct-q4_k_m", timeout=10)
        client = OpenAI(base_url=fleet.base_url("qwen2.5-0.5b-instruct-q4_k_m"), api_key="-")

``AsyncApplianceBrowser`` is the asyncio version; ``lease(model)`` spreads concurrent
requests least-outstanding first. This package needs only zeroconf (and aiohttp to complete
a trimmed model list), never the daemon's runtimes.
"""

from __future__ import annotations

from appliance.client.browser import ApplianceBrowser, AsyncApplianceBrowser, discover
from appliance.client.errors import (
    DiscoveryError,
    DiscoveryTimeout,
    InterfaceNotFound,
    NoApplianceAvailable,
)
from appliance.client.pool import AppliancePool
from appliance.protocol.dnssd import Appliance

__all__ = [
    "Appliance",
    "ApplianceBrowser",
    "AppliancePool",
    "AsyncApplianceBrowser",
    "DiscoveryError",
    "DiscoveryTimeout",
    "InterfaceNotFound",
    "NoApplianceAvailable",
    "discover",
]
