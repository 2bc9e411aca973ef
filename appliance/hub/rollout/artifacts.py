"""Published artifacts: model versions and configuration fragments stored once, by content
(sha256).

An artifact is a model version: its ``manifest.toml`` and the files beside it (a model
directory), or a single ``.gguf``/``.onnx`` file for which the hub writes the manifest;
or a configuration fragment (kind ``config``: one file, ``fragment.toml``, holding only
keys that may change remotely, see ``appliance.config.remote``).
Each file is a blob named by its sha256 under ``<rollout.dir>/blobs/``; the artifact's id
is the sha256 of its canonical description (kind, name, version, files), so publishing
the same thing twice stores nothing new. Blocking file work: call off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from appliance.config import validate_fragment
from appliance.config.remote import parse
from appliance.core.repository import MANIFEST, read_manifest
from appliance.errors import ConfigError
from appliance.hub.storage.rollouts import Artifact
from appliance.runtimes import SUFFIXES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FRAGMENT = "fragment.toml"


class PublishError(ValueError):
    """What cannot be published, and why."""


class BlobStore:
    """Content-addressed files: ``blobs/<sha256>``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"

    def path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a sha256")
        return self.blobs / sha256

    def put(self, data_path: Path | None = None, data: bytes | None = None) -> tuple[str, int]:
        """Store a file (or bytes); returns (sha256, size)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
        digest = hashlib.sha256()
        size = 0
        with tmp.open("wb") as out:
            if data is not None:
                digest.update(data)
                out.write(data)
                size = len(data)
            else:
                assert data_path is not None
                with data_path.open("rb") as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        final = self.blobs / sha
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)
        return sha, size


def artifact_id(kind: str, name: str, version: str, files: list[dict[str, Any]]) -> str:
    text = json.dumps(
        {"kind": kind, "name": name, "version": version, "files": files},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def publish_model(
    store: BlobStore, source: Path, *, name: str | None = None, version: str | None = None
) -> Artifact:
    """Store a model directory (with its manifest) or a single model file."""
    if source.is_dir():
        files, name, version = _directory(store, source, name, version)
    elif source.is_file():
        files, name, version = _single(store, source, name, version)
    else:
        raise PublishError(f"{source} is neither a model file nor a model directory")
    files.sort(key=lambda f: str(f["path"]))
    return Artifact(
        id=artifact_id("model", name, version, files),
        kind="model",
        name=name,
        version=version,
        files=files,
        size=sum(int(f["size"]) for f in files),
        created=time.time(),
    )


def publish_config(
    store: BlobStore, source: Path, *, name: str | None = None, version: str | None = None
) -> Artifact:
    """Store a configuration fragment, refused unless every key may change remotely and
    every value is one the configuration accepts."""
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PublishError(f"cannot read {source}: {exc}") from None
    try:
        validate_fragment(parse(text, origin=str(source)), origin=str(source))
    except ConfigError as exc:
        raise PublishError(str(exc)) from None
    data = text.encode()
    name = name or "config"
    if not _NAME.fullmatch(name):
        raise PublishError(f"name {name!r}: letters, digits, '.', '_' and '-' only")
    sha, size = store.put(data=data)
    version = version or sha[:12]  # the content names it unless the operator does
    _check_version(version)
    files = [{"path": FRAGMENT, "sha256": sha, "size": size}]
    return Artifact(
        id=artifact_id("config", name, version, files),
        kind="config",
        name=name,
        version=version,
        files=files,
        size=size,
        created=time.time(),
    )


def _directory(
    store: BlobStore, source: Path, name: str | None, version: str | None
) -> tuple[list[dict[str, Any]], str, str]:
    manifest = source / MANIFEST
    if not manifest.is_file():
        raise PublishError(f"{source} has no {MANIFEST}")
    data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    stated = data.get("version")
    version = version or (str(stated) if stated is not None else None)
    if version is None:
        raise PublishError(f"{manifest} names no version; give --version")
    if stated is not None and str(stated) != version:
        raise PublishError(f"{manifest} says version {stated!r}, not {version!r}")
    spec = read_manifest(manifest)
    if spec.problem:
        raise PublishError(f"{manifest}: {spec.problem}")
    if name is not None and name != spec.name:
        raise PublishError(f"{manifest} names model {spec.name!r}, not {name!r}")
    if spec.path.parent != source.resolve():
        raise PublishError(f"{manifest}: the model file must sit beside the manifest")
    _check_version(version)
    files = []
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if not _FILE.fullmatch(path.name):
            raise PublishError(f"file name {path.name!r} is not allowed in an artifact")
        sha, size = store.put(path)
        files.append({"path": path.name, "sha256": sha, "size": size})
    return files, spec.name, version


def _single(
    store: BlobStore, source: Path, name: str | None, version: str | None
) -> tuple[list[dict[str, Any]], str, str]:
    runtime = SUFFIXES.get(source.suffix.lower())
    if runtime is None:
        raise PublishError(f"{source.name}: not a model file ({', '.join(sorted(SUFFIXES))})")
    name = name or source.stem
    if version is None:
        raise PublishError("a single model file needs --version")
    _check_version(version)
    if not _FILE.fullmatch(source.name):
        raise PublishError(f"file name {source.name!r} is not allowed in an artifact")
    sha, size = store.put(source)
    manifest = (
        f'name = "{name}"\nruntime = "{runtime}"\nfile = "{source.name}"\n'
        f'version = "{version}"\nsha256 = "{sha}"\n'
    ).encode()
    msha, msize = store.put(data=manifest)
    return (
        [
            {"path": source.name, "sha256": sha, "size": size},
            {"path": MANIFEST, "sha256": msha, "size": msize},
        ],
        name,
        version,
    )


def _check_version(version: str) -> None:
    if not _VERSION.fullmatch(version):
        raise PublishError(f"version {version!r}: letters, digits, '.', '_' and '-' only")
