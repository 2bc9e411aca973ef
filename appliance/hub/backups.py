"""Device backups on the hub: a device keeps its latest archive here, a new box fetches it.

| route | who | what |
|---|---|---|
| ``PUT /api/v1/devices/{id}/backup`` | that device's token | keep the archive (body) |
| ``GET /api/v1/devices/{id}/backup`` | that device's token | the archive, as uploaded |
| ``GET /api/v1/devices/{id}/backup/info`` | ``read`` key | time, size, versions |
| ``GET /api/v1/backups`` | ``read`` key | the same for every device |
| ``GET /api/v1/backups/{id}`` | ``admin`` key | the archive, for an operator |

The hub reads only the archive's plain header and manifest (format version, device,
versions, member list) to check it is a device backup for this device; the secret members
stay encrypted with the device's passphrase or key file. Errors are 4xx JSON naming the
problem, through the app's one error middleware.
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

from aiohttp import web

from appliance.backup.archive import BackupError, read_facts
from appliance.errors import Forbidden, RequestError
from appliance.hub.ingest import authenticate
from appliance.hub.keys import STORAGE
from appliance.hub.storage import backups as store
from appliance.hub.storage.base import Storage

routes = web.RouteTableDef()

CONTENT_TYPE = "application/x-appliance-backup"

# For app.ROUTE_SCOPES: None means the handler checks the device token itself.
SCOPES: dict[tuple[str, str], str | None] = {
    ("PUT", "/api/v1/devices/{device}/backup"): None,
    ("GET", "/api/v1/devices/{device}/backup"): None,
    ("GET", "/api/v1/devices/{device}/backup/info"): "read",
    ("GET", "/api/v1/backups"): "read",
}


async def _own_device(request: web.Request) -> str:
    device = await authenticate(request)
    wanted = request.match_info["device"]
    if device != wanted:
        raise Forbidden(f"this token belongs to device {device!r}, not {wanted!r}")
    return device


def _facts(body: bytes, device: str) -> dict[str, Any]:
    if not body:
        raise RequestError("the body is empty: send the backup archive (appliance backup)")
    try:
        header, manifest = read_facts(io.BytesIO(body))
    except BackupError as exc:
        raise RequestError(f"not a valid backup archive: {exc}") from None
    if manifest.get("kind") != "device":
        raise RequestError(f"the archive is a {manifest.get('kind')!r} backup, not a device's")
    named = manifest.get("device")
    named_id = named.get("id") if isinstance(named, dict) else None
    if named_id != device:
        raise RequestError(f"the archive is device {named_id!r}'s backup, not {device!r}'s")
    created = manifest.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise RequestError("the archive's manifest has no creation time")
    return {"header": header, "manifest": manifest}


@routes.put("/api/v1/devices/{device}/backup")
async def upload(request: web.Request) -> web.Response:
    """Keep the uploaded archive as the device's latest backup."""
    device = await _own_device(request)
    body = await request.read()
    facts = _facts(body, device)
    manifest = facts["manifest"]
    models = manifest.get("models")
    info = store.BackupInfo(
        device_id=device,
        created=float(manifest["created"]),
        received=time.time(),
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        format=int(facts["header"]["version"]),
        appliance_version=str(manifest.get("appliance_version", ""))[:64],
        models=[m for m in models if isinstance(m, dict)][:256] if isinstance(models, list) else [],
    )
    await store.put(request.app[STORAGE], info, body)
    return web.json_response(info.to_dict())


@routes.get("/api/v1/devices/{device}/backup")
async def download(request: web.Request) -> web.Response:
    """The device's latest backup, exactly as it was uploaded."""
    device = await _own_device(request)
    return _archive(device, await store.archive(request.app[STORAGE], device))


@routes.get("/api/v1/backups/{device}")
async def admin_download(request: web.Request) -> web.Response:
    """The device's latest backup for an operator (admin key): to keep elsewhere, or to
    restore a box that lost its token. Its secrets stay encrypted with the device's own
    passphrase or key file."""
    storage = request.app[STORAGE]
    device = request.match_info["device"]
    if await storage.device(device) is None:
        raise web.HTTPNotFound(text=f"no device {device!r}")
    return _archive(device, await store.archive(storage, device))


def _archive(device: str, data: bytes | None) -> web.Response:
    if data is None:
        raise web.HTTPNotFound(text=f"the hub keeps no backup of device {device!r}")
    return web.Response(
        body=data,
        content_type=CONTENT_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{device}-backup.tar"'},
    )


@routes.get("/api/v1/devices/{device}/backup/info")
async def backup_info(request: web.Request) -> web.Response:
    """When the device's latest backup was made, its size and versions; null if none."""
    storage = request.app[STORAGE]
    device = request.match_info["device"]
    if await storage.device(device) is None:
        raise web.HTTPNotFound(text=f"no device {device!r}")
    found = await store.info(storage, device)
    return web.json_response({"device": device, "backup": found[0].to_dict() if found else None})


@routes.get("/api/v1/backups")
async def all_backups(request: web.Request) -> web.Response:
    """The latest backup of every device that has one."""
    rows = await store.info(request.app[STORAGE])
    return web.json_response({"backups": [r.to_dict() for r in rows]})


def setup(app: web.Application, storage: Storage) -> None:
    """Add the routes, and create the table when the app starts."""

    async def schema(_: web.Application) -> None:
        await store.create_schema(storage)

    app.on_startup.append(schema)
    app.add_routes(routes)


__all__ = ["CONTENT_TYPE", "SCOPES", "routes", "setup"]
