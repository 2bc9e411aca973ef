"""The files of an update on the device: statements checked, downloads verified, and
directories and small state files written durably (fsynced, renamed into place)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from appliance.core.repository import MANIFEST, valid_name

VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class Refused(Exception):
    """A statement or artifact the device will not act on; the message says why."""


def checked_files(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The statement's file entries, each with a safe path, a sha256 and a size."""
    files = st.get("files")
    if not isinstance(files, list) or not files:
        raise Refused("the statement lists no files")
    for entry in files:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and _FILE.fullmatch(entry["path"])
            and isinstance(entry.get("sha256"), str)
            and _SHA.fullmatch(entry["sha256"])
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
        )
        if not ok:
            raise Refused(f"file entry {entry!r} is not valid")
    return files


def checked_model(st: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    """(name, version, files) of a model install statement."""
    name, version = st.get("name"), st.get("version")
    if not isinstance(name, str) or not valid_name(name):
        raise Refused(f"model name {name!r} is not valid")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise Refused(f"version {version!r} is not valid")
    files = checked_files(st)
    if MANIFEST not in {f["path"] for f in files}:
        raise Refused(f"the artifact has no {MANIFEST}")
    return name, version, files


def matches(path: Path, entry: dict[str, Any]) -> bool:
    if not path.is_file() or path.stat().st_size != int(entry["size"]):
        return False
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return bool(digest.hexdigest() == entry["sha256"])


def verified(target: Path, files: list[dict[str, Any]]) -> bool:
    return target.is_dir() and all(matches(target / f["path"], f) for f in files)


def sync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(stage: Path, target: Path) -> None:
    """Rename the checked staging directory into the repository, durably."""
    for child in stage.iterdir():
        with child.open("rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, target)
    fsync_dir(target.parent)
    shutil.rmtree(stage.parent, ignore_errors=True)


def load_state(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def save_state(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(value, fh)
        sync(fh)
    os.replace(tmp, path)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that after power loss it holds the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        sync(fh)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def unpublish(target: Path, stage: Path) -> None:
    """Move an installed version back to its staging directory, durably: checked files
    that the repository does not serve until they are installed (and judged) again."""
    stage.parent.mkdir(parents=True, exist_ok=True)
    if stage.exists():
        shutil.rmtree(stage)
    os.replace(target, stage)
    fsync_dir(target.parent)
    fsync_dir(stage.parent)
