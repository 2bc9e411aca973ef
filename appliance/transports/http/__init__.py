"""The HTTP transport: OpenAI-compatible, Open Inference Protocol v2 and ops routes on one
aiohttp application."""

from __future__ import annotations

from appliance.transports.http.app import build_app
from appliance.transports.http.keys import CORE

__all__ = ["CORE", "build_app"]
