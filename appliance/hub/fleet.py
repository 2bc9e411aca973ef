"""The fleet REST API (read-only): devices, their history, records and alerts."""

from __future__ import annotations

import time

from aiohttp import web

from appliance.errors import RequestError
from appliance.hub.keys import CONFIG, STORAGE

routes = web.RouteTableDef()

MAX_POINTS = 5000
MAX_ROWS = 5000


def _number(
    request: web.Request, name: str, default: float, *, low: float = 0, high: float = float("inf")
) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RequestError(f"query parameter {name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise RequestError(f"query parameter {name}={raw!r} must be in [{low}, {high}]")
    return value


async def _device_or_404(request: web.Request) -> str:
    device_id = request.match_info["device"]
    if await request.app[STORAGE].device(device_id) is None:
        raise web.HTTPNotFound(text=f"no device {device_id!r}")
    return device_id


@routes.get("/api/v1/devices")
async def devices(request: web.Request) -> web.Response:
    """Every enrolled device with its status, last-seen time and newest heartbeat."""
    rows = await request.app[STORAGE].devices()
    return web.json_response(
        {
            "now": time.time(),
            "offline_after": request.app[CONFIG].fleet.offline_after,
            "devices": [d.to_dict() for d in rows],
        }
    )


@routes.get("/api/v1/devices/{device}")
async def device(request: web.Request) -> web.Response:
    """One device, with its firing alerts."""
    storage = request.app[STORAGE]
    row = await storage.device(request.match_info["device"])
    if row is None:
        raise web.HTTPNotFound(text=f"no device {request.match_info['device']!r}")
    firing = await storage.alerts(row.id, "firing", MAX_ROWS)
    return web.json_response({**row.to_dict(), "alerts": [a.to_dict() for a in firing]})


@routes.get("/api/v1/devices/{device}/heartbeats")
async def heartbeats(request: web.Request) -> web.Response:
    """Chart points: ``since``/``until`` (Unix seconds; default the last 6 hours), ``limit``."""
    device_id = await _device_or_404(request)
    now = time.time()
    until = _number(request, "until", now)
    since = _number(request, "since", until - 6 * 3600)
    limit = int(_number(request, "limit", 2000, low=1, high=MAX_POINTS))
    points = await request.app[STORAGE].points(device_id, since, until, limit)
    return web.json_response({"device": device_id, "points": [p.__dict__ for p in points]})


@routes.get("/api/v1/devices/{device}/records")
async def records(request: web.Request) -> web.Response:
    """Stored records in arrival order; page with ``after`` = the last ``id`` seen."""
    device_id = await _device_or_404(request)
    after = int(_number(request, "after", 0))
    limit = int(_number(request, "limit", 1000, low=1, high=MAX_ROWS))
    rows = await request.app[STORAGE].records(device_id, after, limit)
    return web.json_response(
        {
            "device": device_id,
            "records": [r.to_dict() for r in rows],
            "next": rows[-1].id if rows else after,
        }
    )


@routes.get("/api/v1/alerts")
async def alerts(request: web.Request) -> web.Response:
    """Alerts newest first; filter with ``device`` and ``state`` (firing | resolved)."""
    state = request.query.get("state") or None
    if state not in (None, "firing", "resolved"):
        raise RequestError(f"query parameter state={state!r}: use firing or resolved")
    device_id = request.query.get("device") or None
    limit = int(_number(request, "limit", 200, low=1, high=MAX_ROWS))
    rows = await request.app[STORAGE].alerts(device_id, state, limit)
    return web.json_response({"alerts": [a.to_dict() for a in rows]})
