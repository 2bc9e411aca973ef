"""The box's own face: ``GET /`` for browsers, and ``GET /device``, the data it shows.

A person who browses to ``http://appliance.local:8080/`` gets a page of this device: its
models and their state, charts of the last hour (latency, throughput, tokens, CPU,
memory, temperature where there are sensors), its alerts and the MQTT topics it answers.
Ollama clients probe the same ``GET /`` and must keep reading "Ollama is running": the
page goes only to clients that ask for HTML (``Accept: text/html``, as browsers do).

The page is public and holds no data, like the hub's dashboard; it reads ``/device``,
which needs the ``read`` scope, and shows a sign-in form when that answers 401 (or takes
the key from ``#key=...`` for a kiosk).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from appliance import __version__
from appliance.config import Config
from appliance.ops.recent import Recent
from appliance.pages import read_page
from appliance.transports.http.keys import CONFIG, CORE

RECENT = web.AppKey("recent", Recent)
PAGE = web.AppKey("device_page", str)
# Read once at import, never on the event loop (an app is built inside Server.startup).
_PAGE = read_page("appliance.transports.http", "static/device.html")

routes = web.RouteTableDef()

HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def setup(app: web.Application) -> Recent:
    """Add ``/device`` and the page to ``app``; the returned :class:`Recent` is to be
    attached to the health units once they run."""
    app[RECENT] = recent = Recent()
    app[PAGE] = _PAGE
    app.add_routes(routes)
    return recent


def wants_html(request: web.Request) -> bool:
    """A browser: ``text/html`` named in Accept (Ollama clients send ``*/*`` or nothing)."""
    return "text/html" in request.headers.get("Accept", "")


def page(request: web.Request) -> web.Response:
    return web.Response(text=request.app[PAGE], content_type="text/html", headers=HEADERS)


@routes.get("/device")
async def device(request: web.Request) -> web.Response:
    """Everything the device page shows, in one document."""
    core = request.app[CORE]
    config = request.app[CONFIG]
    recent = request.app[RECENT]
    models = [
        {
            "name": m.name,
            "version": m.version,
            "runtime": m.runtime,
            "state": m.state.value,
            "error": m.error,
            "size_bytes": m.size,
            "description": m.description,
            "context_length": m.context_length,
            "capabilities": sorted(c.value for c in m.capabilities),
        }
        for m in core.list_models()
    ]
    return web.json_response(
        {
            "device": {"id": config.device.id, "name": config.device.name},
            "version": __version__,
            "now": time.time(),
            "uptime_s": round(time.time() - core.started, 3),
            "models": models,
            "history": recent.history(),
            "alerts": recent.alerts(),
            "mqtt": mqtt_topics(config, [m.name for m in core.list_models()]),
        }
    )


def mqtt_topics(config: Config, models: list[str]) -> dict[str, Any]:
    """The topics this device answers and publishes (docs/mqtt.md), for people."""
    mqtt = config.mqtt
    if not mqtt.enabled:
        return {"enabled": False, "broker": None, "topics": []}
    base = mqtt.base_topic or f"appliance/{config.device.id}"
    topics = [
        {
            "topic": f"{base}/infer/{name}",
            "kind": "request",
            "what": f"requests to {name} (JSON; …/msgpack for MessagePack)",
        }
        for name in models
    ]
    topics += [
        {
            "topic": f"{base}/result/<model>",
            "kind": "publish",
            "what": "replies to requests that named no reply topic",
        },
        {
            "topic": f"{base}/availability",
            "kind": "publish",
            "what": "retained online / offline (the last will)",
        },
        {"topic": f"{base}/info", "kind": "publish", "what": "retained: version, URL, models"},
        {"topic": f"{base}/stats", "kind": "publish", "what": "retained, periodic statistics"},
    ]
    if mqtt.shared_group:
        topics.append(
            {
                "topic": f"$share/{mqtt.shared_group}/{mqtt.fleet_topic}/infer/<model>",
                "kind": "request",
                "what": "fleet requests, shared with the group",
            }
        )
    for rule in mqtt.rules:
        topics.append(
            {
                "topic": rule.topic,
                "kind": "stream",
                "what": f"stream rule {rule.name}: windows of readings to {rule.model}",
            }
        )
    if mqtt.homeassistant:
        topics.append(
            {
                "topic": f"{mqtt.discovery_prefix}/…",
                "kind": "publish",
                "what": "Home Assistant discovery",
            }
        )
    return {"enabled": True, "broker": f"{mqtt.host}:{mqtt.port}", "topics": topics}


__all__ = ["PAGE", "RECENT", "device", "mqtt_topics", "page", "setup", "wants_html"]
