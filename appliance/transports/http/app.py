"""The aiohttp application: routes of every API family, error mapping and request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from appliance.config import Config
from appliance.core.service import Core
from appliance.errors import Overloaded
from appliance.security.access import AccessPolicy, daemon_policy
from appliance.transports import ws
from appliance.transports.http import (
    device_page,
    oip,
    ollama,
    openai,
    openapi,
    ops,
    repository,
    security,
)
from appliance.transports.http.errors import from_exception
from appliance.transports.http.keys import CONFIG, CORE, MODEL
from appliance.transports.http.scopes import scope_of

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every exception to a response (the only place that does) and count the request."""
    started = time.perf_counter()
    shed = False
    try:
        response = await handler(request)
    except Exception as exc:
        response = from_exception(request, exc)
        shed = isinstance(exc, Overloaded)  # backpressure: a 503 that is no failure
    core = request.app[CORE]
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    core.count_request(
        "http",
        route_name,
        request.get(MODEL, ""),
        str(response.status),
        time.perf_counter() - started,
        shed=shed,
    )
    return response


def build_app(core: Core, config: Config, access: AccessPolicy | None = None) -> web.Application:
    """The HTTP application for one daemon; ``access`` defaults to the configured policy."""
    if access is None:
        access = daemon_policy(config)
    app = web.Application(
        client_max_size=config.http.max_body_bytes,
        middlewares=[
            _errors_and_metrics,
            *security.middlewares(access, scope_of, config.limits, config.http.max_body_bytes),
        ],
    )
    app[CORE] = core
    app[CONFIG] = config
    app[security.POLICY] = access
    app.add_routes(ops.routes)
    app.add_routes(openai.routes)
    app.add_routes(oip.routes)
    app.add_routes(repository.routes)  # admin scope: load, unload, reload, canaries
    app.add_routes(ollama.routes)  # also GET /: Ollama clients probe it, browsers see the box
    device_page.setup(app)  # /device: the data of the page GET / shows browsers
    ws.setup(app)
    app.on_startup.append(openapi.publish)  # once the router is complete
    return app
