"""What both backups share: SQLite snapshots, the files a configuration names, TOML pins.

SQLite files are copied with SQLite's online backup API (``Connection.backup``), which
reads a consistent snapshot while the daemon or the hub keeps writing in WAL mode; a plain
file copy could catch a page half-written or miss what still sits in the ``-wal`` file.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from appliance.backup.archive import BackupError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def sqlite_snapshot(path: Path) -> bytes:
    """A consistent copy of the SQLite database at ``path``, as one self-contained file."""
    if not path.is_file():
        raise BackupError(f"no database at {path}")
    with tempfile.TemporaryDirectory(prefix="appliance-backup-") as tmp:
        copy = Path(tmp) / "copy.db"
        try:
            # Read-only: a backup never changes the database it copies.
            uri = path.resolve().as_uri() + "?mode=ro"
            source = sqlite3.connect(uri, uri=True, timeout=30)
            try:
                target = sqlite3.connect(copy)
                try:
                    source.backup(target)
                    # One file, no -wal beside it: the copy is complete on its own.
                    target.execute("PRAGMA journal_mode=DELETE")
                finally:
                    target.close()
            finally:
                source.close()
        except sqlite3.Error as exc:
            raise BackupError(f"cannot copy the database {path}: {exc}") from None
        return copy.read_bytes()


def sqlite_edit(data: bytes, *statements: tuple[str, tuple[Any, ...]]) -> bytes:
    """``data`` (an SQLite file) with ``statements`` run on it, in one transaction."""
    with tempfile.TemporaryDirectory(prefix="appliance-restore-") as tmp:
        copy = Path(tmp) / "edit.db"
        copy.write_bytes(data)
        try:
            conn = sqlite3.connect(copy)
            try:
                with conn:
                    for sql, args in statements:
                        conn.execute(sql, args)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise BackupError(f"the archived database cannot be opened: {exc}") from None
        return copy.read_bytes()


def path_fields(
    config: BaseModel, skip: frozenset[str], prefix: str = ""
) -> Iterator[tuple[str, Path]]:
    """Every ``section.key`` of ``config`` holding a path to an existing file (keys, certs,
    token files), except the keys in ``skip``."""
    for name in type(config).model_fields:
        value = getattr(config, name)
        key = f"{prefix}{name}"
        if key in skip:
            continue
        if isinstance(value, BaseModel):
            yield from path_fields(value, skip, key + ".")
        elif isinstance(value, Path) and value.is_file():
            yield key, value


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None


def toml_has(text: str, table: str, key: str) -> bool:
    data = tomllib.loads(text) if text.strip() else {}
    section = data.get(table)
    return isinstance(section, dict) and key in section


def toml_pin(text: str, table: str, key: str, value: str) -> str:
    """``text`` with ``[table] key = value`` set, unless the file sets that key already.

    Inserted as one line (after the table's header, or in a new table at the end), so
    the rest of the operator's file, comments included, stays as it was.
    """
    if toml_has(text, table, key):
        return text
    line = f"{key} = {json.dumps(value)}"  # a JSON string is a valid TOML basic string
    header = re.search(rf"^[ \t]*\[{re.escape(table)}\][ \t]*(#.*)?$", text, re.MULTILINE)
    if header is not None:
        text = text[: header.end()] + "\n" + line + text[header.end() :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"[{table}]\n{line}\n"
    tomllib.loads(text)  # still valid
    return text


def state_file_names(directory: Path) -> list[str]:
    """The files in a state directory that say it is in use (the lock file does not)."""
    try:
        return sorted(n for n in os.listdir(directory) if n != "daemon.pid")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BackupError(f"cannot read {directory}: {exc.strerror or exc}") from None


__all__ = [
    "path_fields",
    "read_file",
    "sqlite_edit",
    "sqlite_snapshot",
    "state_file_names",
    "toml_has",
    "toml_pin",
]
