"""Typed keys for what the hub's application shares with its handlers."""

from __future__ import annotations

from aiohttp import web

from appliance.hub.config import HubConfig
from appliance.hub.metrics import HubMetrics
from appliance.hub.storage.base import Storage

STORAGE = web.AppKey("storage", Storage)
CONFIG = web.AppKey("config", HubConfig)
METRICS = web.AppKey("metrics", HubMetrics)
STARTED = web.AppKey("started", float)
