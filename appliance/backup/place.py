"""Putting a verified archive's members in place: plan first, refuse conflicts, then write.

Each file is written to a temporary file beside its destination, fsynced and renamed over
it, so a reader never sees half a file; secrets get mode 0600. A restore only gets here
after :func:`~appliance.backup.archive.open_archive` checked the whole archive.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from appliance.backup.archive import Archive, BackupError


@dataclass(frozen=True)
class Placement:
    """Where one file goes: an archive ``member``'s content, or ``data`` (patched)."""

    dest: Path
    member: str | None = None
    data: bytes | None = None
    secret: bool = True
    # Files that belong to the old one and must go with it (an SQLite file's -wal, -shm).
    companions: tuple[Path, ...] = ()


def conflicts(placements: Sequence[Placement]) -> list[Path]:
    """Destinations that already exist (a restore overwrites them only with --force)."""
    found: list[Path] = []
    for place in placements:
        found.extend(p for p in (place.dest, *place.companions) if p.exists())
    return found


def apply(archive: Archive, placements: Sequence[Placement]) -> None:
    """Write every placement; streamed members (model files) are hashed again on the way."""
    streamed: dict[str, Placement] = {
        p.member: p for p in placements if p.member and not archive.in_memory(p.member)
    }
    for place in placements:
        if place.member in streamed:
            continue
        data = place.data if place.data is not None else archive.data(str(place.member))
        _write(place, [data])
    if streamed:
        for entry, reader in archive.stream():
            found = streamed.pop(entry["name"], None)
            if found is not None:
                _write(found, _chunks(reader), entry["sha256"])
    if streamed:
        raise BackupError(f"members vanished from the archive: {', '.join(map(str, streamed))}")


def _chunks(reader: IO[bytes]) -> Iterator[bytes]:
    while chunk := reader.read(1024 * 1024):
        yield chunk


def _write(place: Placement, chunks: Iterable[bytes], sha256: str | None = None) -> None:
    dest = place.dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.restore-{os.getpid()}")
        digest = hashlib.sha256()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if place.secret else 0o644)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if sha256 is not None and digest.hexdigest() != sha256:
                raise BackupError(f"{place.member} changed while it was restored")
            for companion in place.companions:
                companion.unlink(missing_ok=True)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc.strerror or exc}") from None


__all__ = ["Placement", "apply", "conflicts"]
