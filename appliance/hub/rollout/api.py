"""REST routes of rollouts: artifacts, rollouts, device tags, and the blob downloads
devices make (with their device token; HTTP Range, so a cut download resumes).

Errors raise the hub's request errors, which the hub's middleware turns into JSON.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from appliance.errors import RequestError
from appliance.hub.ingest import authenticate
from appliance.hub.rollout.plan import PlanError
from appliance.hub.rollout.service import ROLLOUTS, NotFound, Rollouts
from appliance.protocol import strictjson

routes = web.RouteTableDef()

# API-key scopes of these routes (the rest need admin); None: a device token.
SCOPES: dict[tuple[str, str], str | None] = {
    ("GET", "/api/v1/artifacts"): "read",
    ("GET", "/api/v1/artifacts/blobs/{sha256}"): None,
    ("GET", "/api/v1/rollouts"): "read",
    ("GET", "/api/v1/rollouts/{rollout}"): "read",
    ("GET", "/api/v1/signing-key"): "read",
    ("GET", "/api/v1/devices/{device}/rollouts"): "read",
}
_TAG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


async def _body(request: web.Request) -> Any:
    try:
        return strictjson.loads(await request.read())
    except RequestError as exc:
        raise RequestError(f"the body is not JSON: {exc.message}") from None


async def _call(work: Any) -> web.Response:
    try:
        result = await work
    except NotFound as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except PlanError as exc:
        raise RequestError(str(exc)) from None
    return web.json_response(result)


@routes.get("/api/v1/signing-key")
async def signing_key(request: web.Request) -> web.Response:
    """The hub's public key, for `hub.public_key` (over a channel you trust)."""
    return web.json_response({"public_key": request.app[ROLLOUTS].public_key})


@routes.get("/api/v1/artifacts")
async def artifacts(request: web.Request) -> web.Response:
    found = await request.app[ROLLOUTS].store.artifacts()
    return web.json_response({"artifacts": [a.to_dict() for a in found]})


@routes.get("/api/v1/artifacts/blobs/{sha256}")
async def blob(request: web.Request) -> web.StreamResponse:
    """One stored file, for devices (their token); Range requests resume a download."""
    await authenticate(request)
    try:
        path = request.app[ROLLOUTS].blobs.path(request.match_info["sha256"])
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if not path.is_file():
        raise web.HTTPNotFound(text=f"no blob {request.match_info['sha256']}")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


@routes.get("/api/v1/rollouts")
async def list_rollouts(request: web.Request) -> web.Response:
    rollouts = request.app[ROLLOUTS]
    found = await rollouts.store.rollouts()
    return web.json_response({"rollouts": [await rollouts.status(r.id) for r in found[:50]]})


@routes.post("/api/v1/rollouts")
async def create(request: web.Request) -> web.Response:
    body = await _body(request)
    response = await _call(request.app[ROLLOUTS].create(body))
    response.set_status(201)
    return response


@routes.get("/api/v1/rollouts/{rollout}")
async def get(request: web.Request) -> web.Response:
    return await _call(request.app[ROLLOUTS].status(request.match_info["rollout"]))


@routes.post("/api/v1/rollouts/{rollout}/{action}")
async def act(request: web.Request) -> web.Response:
    rollouts, rollout_id = request.app[ROLLOUTS], request.match_info["rollout"]
    action = request.match_info["action"]
    if action == "halt":
        return await _call(rollouts.halt(rollout_id))
    if action == "resume":
        return await _call(rollouts.resume(rollout_id))
    if action == "rollback":
        return await _call(rollouts.rollback(rollout_id))
    raise web.HTTPNotFound(text=f"no action {action!r}: halt, resume or rollback")


@routes.get("/api/v1/devices/{device}/rollouts")
async def device_rollouts(request: web.Request) -> web.Response:
    """The device's part in each rollout (newest first): the model name and version
    rolled out, the version it had before, and how far it got; and its tags."""
    device = request.match_info["device"]
    store = request.app[ROLLOUTS].store
    if not any(d.id == device for d in await request.app[ROLLOUTS].devices()):
        raise web.HTTPNotFound(text=f"no device {device!r}")
    rows = []
    for rollout, row in (await store.device_rollouts(device, None))[:50]:
        artifact = await store.artifact(rollout.artifact_id)
        rows.append(
            {
                "rollout": rollout.id,
                "rollout_state": rollout.state,
                "name": artifact.name if artifact else None,
                "version": artifact.version if artifact else None,
                **row.to_dict(),
            }
        )
    return web.json_response(
        {"device": device, "tags": (await store.tags()).get(device, []), "rollouts": rows}
    )


@routes.post("/api/v1/devices/{device}/tags")
async def tags(request: web.Request) -> web.Response:
    """``{"add": [...], "remove": [...]}``; answers the device's tags."""
    body = await _body(request)
    if not isinstance(body, dict) or set(body) - {"add", "remove"}:
        raise RequestError('body: expected {"add": [tags], "remove": [tags]}')
    device = request.match_info["device"]
    store = request.app[ROLLOUTS].store
    if not any(d.id == device for d in await request.app[ROLLOUTS].devices()):
        raise web.HTTPNotFound(text=f"no device {device!r}")
    lists: dict[str, list[str]] = {}
    for key in ("add", "remove"):
        value = body.get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(t, str) and _TAG.fullmatch(t) for t in value
        ):
            raise RequestError(f"{key}: a list of tags (lower-case letters, digits, . _ -)")
        lists[key] = value
    await store.add_tags(device, lists["add"])
    await store.remove_tags(device, lists["remove"])
    return web.json_response({"device": device, "tags": (await store.tags()).get(device, [])})


def setup(app: web.Application, rollouts: Rollouts) -> None:
    app[ROLLOUTS] = rollouts
    app.add_routes(routes)
