"""Operations routes: health, Prometheus metrics, the API description and its docs page."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from appliance import __version__
from appliance.core.types import ModelState
from appliance.transports.http import openapi
from appliance.transports.http.keys import CONFIG, CORE

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 when serving, 503 while loading, stopping, or with no model able to serve."""
    core = request.app[CORE]
    config = request.app[CONFIG]
    models = core.list_models()
    failed = [m for m in models if m.state is ModelState.FAILED]
    if core.loading:
        status = "loading"
    elif not core.ready:
        status = "unavailable"
    elif failed:
        status = "degraded"
    else:
        status = "ok"
    body: dict[str, Any] = {
        "status": status,
        "version": __version__,
        "device": {"id": config.device.id, "name": config.device.name},
        "uptime_s": round(time.time() - core.started, 3),
        "models": {
            m.name: {
                "state": m.state.value,
                "runtime": m.runtime,
                "version": m.version,
                **({"error": m.error} if m.error else {}),
            }
            for m in models
        },
        "units": core.unit_status(),  # health, alerts, hub sync ... as each unit reports
    }
    code = 200 if status in ("ok", "degraded") else 503
    return web.json_response(body, status=code)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    data = request.app[CORE].render_metrics()
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document, built once, when first asked for (``openapi.publish``)."""
    published = await request.app[openapi.PUBLISHED].get()
    return web.Response(body=published.json, content_type="application/json")


@routes.get("/docs")
async def docs(request: web.Request) -> web.Response:
    """The human docs page rendered from the same document."""
    page = (await request.app[openapi.PUBLISHED].get()).page
    return web.Response(
        text=page.render(request.scheme, request.host),
        content_type="text/html",
        headers=page.headers,
    )
