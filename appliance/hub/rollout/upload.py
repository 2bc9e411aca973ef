"""``POST /api/v1/artifacts``: publish a model version over HTTP, as ``appliance hub
publish`` does from the hub's own disk.

The body is ``multipart/form-data``, what ``curl -F`` sends: optional text fields ``name``
and ``version``, and one ``file`` part per file. One file part that is not a manifest is a
single model file (``version`` needed); parts with a ``manifest.toml`` among them are a
model directory. A ``fragment`` part instead (``-F fragment=@fragment.toml``) publishes a
configuration fragment, checked as ``appliance hub publish --fragment`` checks it. Each part
is written to a directory of its own under the artifact
directory as it arrives (never held whole in memory), bounded by ``rollout.max_upload_bytes``
in all, then published like a directory on disk and removed. The security middleware
leaves this route's body alone (``STREAMED``); the API-key guard still runs first, so a
refused client's upload is never read.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, web

from appliance.core.repository import MANIFEST, read_manifest
from appliance.errors import PayloadTooLarge, RequestError, RequestTimeout
from appliance.hub.rollout.artifacts import FRAGMENT, PublishError, publish_config, publish_model
from appliance.hub.rollout.service import ROLLOUTS, Rollouts
from appliance.hub.storage.rollouts import Artifact

PATH = "/api/v1/artifacts"
STREAMED = frozenset({("POST", PATH)})
MAX_FILES = 64
_FIELDS = ("name", "version")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FLUSH = 1 << 20  # bytes gathered before one write off the loop

routes = web.RouteTableDef()


class Conflict(ValueError):
    """The name and version are published already, with other content (409)."""


@routes.post(PATH)
async def publish(request: web.Request) -> web.Response:
    """Publish the uploaded model version; 201 with the artifact (id, files, sha256s)."""
    rollouts = request.app[ROLLOUTS]
    limit: int = request.app[MAX_UPLOAD]
    if request.content_type != "multipart/form-data":
        raise web.HTTPUnsupportedMediaType(
            text=f"send multipart/form-data (curl -F file=@model.onnx -F version=2), "
            f"not {request.content_type or 'no Content-Type'}"
        )
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the upload is larger than rollout.max_upload_bytes ({limit})")
    staging = rollouts.blobs.root / "uploads" / secrets.token_hex(8)
    await asyncio.to_thread(staging.mkdir, parents=True)
    try:
        fields, files = await _receive(request, staging, limit, request.app[READ_TIMEOUT])
        artifact = await asyncio.to_thread(_prepare, rollouts, staging, fields, files)
        try:
            await rollouts.store.put_artifact(artifact)
        except ValueError as exc:
            raise Conflict(str(exc)) from None
    except Conflict as exc:
        raise web.HTTPConflict(text=str(exc)) from None
    except RequestError:
        raise
    except (ValueError, AssertionError) as exc:  # PublishError, TOML, multipart framing
        # Messages name the path they were about: here, the staging directory.
        text = str(exc).replace(f"{staging}/", "").replace(str(staging), "the upload")
        raise RequestError(text or f"not a valid upload ({type(exc).__name__})") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    return web.json_response(artifact.to_dict(), status=201)


async def _receive(
    request: web.Request, staging: Path, limit: int, timeout: float
) -> tuple[dict[str, str], list[str]]:
    reader = await request.multipart()
    fields: dict[str, str] = {}
    files: list[str] = []
    total = 0
    while True:
        part = await _within(timeout, reader.next())
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise RequestError("nested multipart bodies are not taken")
        if part.name in _FIELDS and part.filename is None:
            value = (await _within(timeout, part.read(decode=True)))[:200]
            fields[str(part.name)] = value.decode("utf-8", "replace").strip()
            continue
        if part.name not in ("file", "fragment"):
            raise RequestError(f"unknown form field {part.name!r}: file, fragment, name or version")
        if (part.name == "fragment") != (FRAGMENT in files) and files:
            raise RequestError("a fragment part is published alone, without file parts")
        filename = FRAGMENT if part.name == "fragment" else Path(part.filename or "").name
        if not _FILE.fullmatch(filename):
            raise RequestError(
                f"file name {part.filename!r}: letters, digits, '.', '_' and '-' only"
            )
        if filename in files:
            raise RequestError(f"file {filename!r} is in the upload twice")
        if len(files) >= MAX_FILES:
            raise RequestError(f"at most {MAX_FILES} files in one artifact")
        files.append(filename)
        out: BinaryIO = await asyncio.to_thread((staging / filename).open, "wb")
        try:
            pending: list[bytes] = []
            size = 0
            while chunk := await _within(timeout, part.read_chunk(1 << 16)):
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(
                        f"the upload is larger than rollout.max_upload_bytes ({limit})"
                    )
                pending.append(chunk)
                size += len(chunk)
                if size >= _FLUSH:
                    await asyncio.to_thread(out.write, b"".join(pending))
                    pending, size = [], 0
            await asyncio.to_thread(out.write, b"".join(pending))
        finally:
            await asyncio.to_thread(out.close)
    if not files:
        raise RequestError(
            "no file part: send a model as -F file=@PATH or a configuration fragment as "
            "-F fragment=@PATH"
        )
    return fields, files


async def _within(seconds: float, work: Any) -> Any:
    """One read of the body; a client that stalls longer gets 408."""
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the upload stalled for {seconds:g} s") from None


def _prepare(
    rollouts: Rollouts, staging: Path, fields: dict[str, str], files: list[str]
) -> Artifact:
    """Blocking: check the upload looks like a model, then store its blobs."""
    name, version = fields.get("name") or None, fields.get("version") or None
    if files == [FRAGMENT]:
        return publish_config(rollouts.blobs, staging / FRAGMENT, name=name, version=version)
    if MANIFEST in files:
        spec = read_manifest(staging / MANIFEST)
        if spec.problem:
            raise PublishError(f"{MANIFEST}: {spec.problem}")
        if spec.path.name not in files:
            raise PublishError(f"{MANIFEST} names {spec.path.name!r}, which is not in the upload")
        model, source = spec.path, staging
    elif len(files) > 1:
        raise PublishError(f"several files without a {MANIFEST}: upload the manifest too")
    else:
        model = source = staging / files[0]
    if model.is_file():
        _looks_like_a_model(model)
    return publish_model(rollouts.blobs, source, name=name, version=version)


def _looks_like_a_model(path: Path) -> None:
    """A cheap check of the first bytes: GGUF's magic, or ONNX's ModelProto (protobuf,
    which starts with field 1, ``ir_version``, a varint: byte 0x08)."""
    with path.open("rb") as f:
        head = f.read(4)
    suffix = path.suffix.lower()
    if suffix == ".gguf" and head != b"GGUF":
        raise PublishError(f"{path.name} is not a GGUF model (no GGUF magic)")
    if suffix == ".onnx" and not head.startswith(b"\x08"):
        raise PublishError(f"{path.name} is not an ONNX model (not a ModelProto)")


MAX_UPLOAD = web.AppKey("max_upload_bytes", int)
READ_TIMEOUT = web.AppKey("upload_read_timeout", float)


def setup(app: web.Application, max_upload_bytes: int, read_timeout: float) -> None:
    app[MAX_UPLOAD] = max_upload_bytes
    app[READ_TIMEOUT] = read_timeout
    app.add_routes(routes)
