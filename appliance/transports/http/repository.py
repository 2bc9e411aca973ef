"""Model repository administration: Triton's model repository extension and /admin routes.

``POST /v2/repository/index`` lists every model version and its state;
``POST /v2/repository/models/{name}/load`` re-reads that model from the repository and
(re)loads it, hot-swapping a changed file without dropping a request;
``POST /v2/repository/models/{name}/unload`` unloads it until the next load.
``POST /admin/reload`` re-reads the whole repository (what SIGHUP does);
``POST /admin/models/{name}/promote`` and ``/rollback`` decide a running canary.
All of them need the ``admin`` scope (``scopes.py``). Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from appliance.core.types import ModelState
from appliance.errors import RequestError
from appliance.transports.http.errors import parse_json
from appliance.transports.http.keys import CORE, MODEL

routes = web.RouteTableDef()


@routes.post("/v2/repository/index")
async def index(request: web.Request) -> web.Response:
    core = request.app[CORE]
    raw = await request.read()
    body = parse_json(raw) if raw.strip() else {}
    if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
        raise RequestError('the body must be {"ready": true|false} or empty', param="ready")
    only_ready = bool(body.get("ready", False))
    rows: list[dict[str, Any]] = []
    for name in core.model_names():
        for info in core.versions(name):
            if only_ready and info.state is not ModelState.READY:
                continue
            row: dict[str, Any] = {
                "name": info.name,
                "version": info.version,
                "state": info.state.value.upper(),
            }
            if info.error:
                row["reason"] = info.error
            rows.append(row)
    return web.json_response(rows)


@routes.post("/v2/repository/models/{name}/load")
async def load(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    request[MODEL] = name
    core = request.app[CORE]
    await core.reload_models(only=name)
    states = {info.version: info.state.value for info in core.versions(name)}
    return web.json_response({"name": name, "versions": states})


@routes.post("/v2/repository/models/{name}/unload")
async def unload(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    request[MODEL] = name
    core = request.app[CORE]
    await core.unload(name)
    states = {info.version: info.state.value for info in core.versions(name)}
    return web.json_response({"name": name, "versions": states})


@routes.post("/admin/reload")
async def reload(request: web.Request) -> web.Response:
    core = request.app[CORE]
    await core.reload_models()
    return web.json_response(
        {
            name: {info.version: info.state.value for info in core.versions(name)}
            for name in core.model_names()
        }
    )


@routes.post("/admin/models/{name}/promote")
async def promote(request: web.Request) -> web.Response:
    return _decision(request, promote=True)


@routes.post("/admin/models/{name}/rollback")
async def rollback(request: web.Request) -> web.Response:
    return _decision(request, promote=False)


def _decision(request: web.Request, *, promote: bool) -> web.Response:
    name = request.match_info["name"]
    request[MODEL] = name
    canary = request.app[CORE].canary
    if canary is None:
        raise RequestError("canary releases are not enabled ([canary] enabled)")
    decision = canary.promote(name) if promote else canary.rollback(name)
    return web.json_response(
        {
            "model": decision.model,
            "stable": decision.stable,
            "canary": decision.canary,
            "decision": decision.decision,
            "reason": decision.reason,
        }
    )


__all__ = ["routes"]
