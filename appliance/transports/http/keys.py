"""Typed keys for what the HTTP application shares with its handlers."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from appliance.config import Config
from appliance.core.service import Core

CORE = web.AppKey("core", Core)
CONFIG = web.AppKey("config", Config)

# The model a request is for, as the handler found it; the metrics middleware labels by it.
# aiohttp 3.14 added typed request keys and warns (NotAppKeyWarning) on plain string keys,
# which would turn the first request of each process into a 500 under ``-W error``; older
# aiohttp versions only take strings.
MODEL: Final[web.RequestKey[str] | str] = (
    web.RequestKey("model", str) if hasattr(web, "RequestKey") else "model"
)
