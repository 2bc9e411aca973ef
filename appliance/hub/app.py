"""The hub's aiohttp application: ingest, fleet API, dashboard, /health and /metrics.

Errors become JSON ``{"error": "..."}`` responses in exactly one place (the middleware).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from appliance import __version__, errors
from appliance.hub import backups, fleet, ingest
from appliance.hub.config import HubConfig
from appliance.hub.keys import CONFIG, METRICS, STARTED, STORAGE
from appliance.hub.metrics import HubMetrics
from appliance.hub.rollout import api as rollout_api
from appliance.hub.rollout import upload
from appliance.hub.rollout.service import Rollouts
from appliance.hub.storage.base import Storage
from appliance.pages import read_page
from appliance.security.access import AccessPolicy, hub_policy
from appliance.security.ratelimit import retry_after
from appliance.transports.http import security

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
routes = web.RouteTableDef()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def from_exception(request: web.Request, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, errors.Unauthenticated):
        return _error(401, str(exc), {"WWW-Authenticate": 'Bearer realm="appliance-hub"'})
    if isinstance(exc, errors.Forbidden):
        return _error(403, str(exc))
    if isinstance(exc, errors.RateLimited):
        return _error(429, str(exc), {"Retry-After": retry_after(exc.retry_after)})
    if isinstance(exc, errors.RequestTimeout):
        return _error(408, str(exc), {"Connection": "close"})
    if isinstance(exc, errors.PayloadTooLarge):
        return _error(413, str(exc))
    if isinstance(exc, errors.RequestError):
        return _error(400, str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _error(413, "the request body is larger than http.max_body_bytes")
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            return _error(
                404,
                exc.text
                if exc.text and not exc.text.startswith("404")
                else f"no route for {request.method} {request.path}",
            )
        if exc.status == 405:
            return _error(
                405,
                f"method {request.method} is not allowed for {request.path}",
                {"Allow": exc.headers.get("Allow", "")},
            )
        return _error(exc.status, exc.text or exc.reason)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return _error(500, "internal error; see the hub log")


@web.middleware
async def _errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except Exception as exc:
        response = from_exception(request, exc)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[METRICS]
    metrics.http_requests.labels(route, str(response.status)).inc()
    if route == "/api/v1/ingest":
        metrics.ingest_batches.labels(str(response.status)).inc()
    return response


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 while the storage answers, else 503."""
    storage = request.app[STORAGE]
    body = {
        "status": "ok",
        "version": __version__,
        "storage": storage.kind,
        "uptime_s": round(time.time() - request.app[STARTED], 3),
    }
    try:
        await storage.ping()
    except Exception as exc:
        log.warning("storage ping failed: %s", exc)
        return web.json_response({**body, "status": "unavailable", "error": str(exc)}, status=503)
    return web.json_response(body)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@routes.get("/")
async def dashboard(request: web.Request) -> web.Response:
    """The fleet dashboard: one self-contained page (no CDN; the hub may be offline)."""
    return web.Response(
        text=request.app[PAGE],
        content_type="text/html",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src 'self' data:",
        },
    )


PAGE = web.AppKey("page", str)
# Read once at import, never on the event loop (the hub builds its app inside its loop).
_DASHBOARD = read_page("appliance.hub", "static/dashboard.html")


# The API-key scope of each hub route (see appliance/transports/http/scopes.py); None: the
# route checks its callers itself (ingest: device tokens). Unlisted routes need admin.
ROUTE_SCOPES: dict[tuple[str, str], str | None] = {
    ("GET", "/"): "read",
    ("GET", "/health"): "read",
    ("GET", "/metrics"): "read",
    ("POST", "/api/v1/ingest"): None,
    ("GET", "/api/v1/devices"): "read",
    ("GET", "/api/v1/devices/{device}"): "read",
    ("GET", "/api/v1/devices/{device}/heartbeats"): "read",
    ("GET", "/api/v1/devices/{device}/records"): "read",
    ("GET", "/api/v1/alerts"): "read",
    **backups.SCOPES,
    **rollout_api.SCOPES,
}


def scope_of(method: str, template: str) -> str | None:
    method = "GET" if method == "HEAD" else method
    return ROUTE_SCOPES.get((method, template), "admin")


def build_app(
    storage: Storage,
    config: HubConfig,
    metrics: HubMetrics,
    access: AccessPolicy | None = None,
    rollouts: Rollouts | None = None,
) -> web.Application:
    """The hub's application; ``access`` defaults to the configured policy; without
    ``rollouts`` it has no rollout routes."""
    if access is None:
        access = hub_policy(config)
    app = web.Application(
        client_max_size=config.http.max_body_bytes,
        middlewares=[
            _errors_and_metrics,
            *security.middlewares(
                access,
                scope_of,
                config.limits,
                config.http.max_body_bytes,
                streamed=upload.STREAMED if rollouts is not None else frozenset(),
            ),
        ],
    )
    app[security.POLICY] = access
    app[STORAGE] = storage
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STARTED] = time.time()
    app[PAGE] = _DASHBOARD
    app.add_routes(routes)
    app.add_routes(ingest.routes)
    app.add_routes(fleet.routes)
    backups.setup(app, storage)
    if rollouts is not None:
        rollout_api.setup(app, rollouts)
        upload.setup(app, config.rollout.max_upload_bytes, config.limits.request_timeout)
    return app
