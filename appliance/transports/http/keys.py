"""Typed keys for what the HTTP application shares with its handlers."""

from __future__ import annotations

from aiohttp import web

from appliance.config import Config
from appliance.core.service import Core

CORE = web.AppKey("core", Core)
CONFIG = web.AppKey("config", Config)
