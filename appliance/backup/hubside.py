"""``appliance hub backup FILE`` / ``appliance hub restore FILE``: the hub's own backup.

Members (all encrypted): ``config/hub.toml`` (the configuration file), ``files/<key>``
(the files it names: TLS certificate and key, client CA, API key file),
``state/hub-api-key`` (the generated admin key) and ``database/hub.db``, the SQLite
database copied with SQLite's online backup API, so the copy is consistent while the hub
runs and ingests. Devices, their token hashes, history, alerts and kept device backups
are all in it.

A PostgreSQL database is backed up with PostgreSQL's own tools (``pg_dump`` /
``pg_restore``); this command says so instead of pretending, and with
``--without-database`` keeps the configuration and keys only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.backup.archive import BackupError, Member, Secret, Written, open_archive
from appliance.backup.archive import write_archive as _write
from appliance.backup.place import Placement, apply, conflicts
from appliance.backup.sources import path_fields, read_file, sqlite_snapshot
from appliance.errors import ConfigError

KIND = "hub"
CONFIG_MEMBER = "config/hub.toml"
DATABASE = "database/hub.db"
API_KEY = "hub-api-key"
CONFIG_ENV = "APPLIANCE_HUB_CONFIG"
PG_ADVICE = (
    "the hub's database is PostgreSQL: back it up with PostgreSQL's tools, e.g. "
    '`pg_dump --format=custom --file=hub.dump "$URL"` (a consistent snapshot while the hub '
    'runs) and on the new server `pg_restore --clean --if-exists --dbname="$URL" hub.dump`; '
    "`appliance hub backup --without-database FILE` keeps the hub's configuration and keys"
)


def run(args: argparse.Namespace, load: Any) -> int:
    from appliance.backup.cli import secret

    try:
        key = secret(args, os.environ, confirm=args.hub_command == "backup")
        if args.hub_command == "backup":
            written = create(
                load(),
                _config_path(args.config, os.environ),
                args.file,
                key,
                with_database=not args.without_database,
            )
            print(f"wrote {written.path} ({written.size} bytes, {written.members} members)")
        else:
            print(
                restore(
                    args.file,
                    key,
                    os.environ,
                    config_path=args.config,
                    storage=args.storage,
                    force=args.force,
                )
            )
    except ConfigError as exc:
        print(f"appliance hub: {exc}", file=sys.stderr)
        return 2
    except BackupError as exc:
        print(f"appliance hub {args.hub_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _config_path(given: Path | None, env: Mapping[str, str]) -> Path | None:
    if given is not None:
        return given
    return Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None


def _state_dir(env: Mapping[str, str]) -> Path:
    from appliance.ops.instance import default_state_dir

    return default_state_dir(env, is_root=os.geteuid() == 0, home=Path.home())


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    return Path("/" + url.removeprefix("sqlite://").lstrip("/"))


def create(
    cfg: Any, config_path: Path | None, out: Path, secret: Secret, *, with_database: bool = True
) -> Written:
    """Write the hub's backup to ``out``."""
    from appliance.hub.config import storage_url

    members: list[Member] = []
    if config_path is not None and config_path.is_file():
        meta = {"role": "config", "path": str(config_path)}
        members.append(Member(CONFIG_MEMBER, read_file(config_path), meta=meta))
    for key, path in path_fields(cfg, frozenset({"storage.url"})):
        meta = {"role": "file", "key": key, "path": str(path)}
        members.append(Member(f"files/{key}", read_file(path), meta=meta))
    state = _state_dir(os.environ)
    if (state / API_KEY).is_file():
        members.append(Member(f"state/{API_KEY}", read_file(state / API_KEY)))
    url = storage_url(cfg)
    database = _sqlite_path(url)
    if with_database:
        if database is None:
            raise BackupError(PG_ADVICE)
        members.append(Member(DATABASE, sqlite_snapshot(database)))
    facts = {
        "kind": KIND,
        "appliance_version": __version__,
        "storage": "sqlite" if database is not None else "postgresql",
        "with_database": with_database,
    }
    return _write(out, members, facts, secret)


def restore(
    path: Path,
    secret: Secret,
    env: Mapping[str, str],
    *,
    config_path: Path | None = None,
    storage: str | None = None,
    force: bool = False,
) -> str:
    """Check the whole archive, then put the hub's files in place; a one-line summary."""
    from appliance.hub import config as hub_config

    archive = open_archive(path, secret)
    if archive.manifest.get("kind") != KIND:
        raise BackupError(f"{path} is a {archive.manifest.get('kind')!r} backup, not the hub's")
    entry = archive.entry(CONFIG_MEMBER)
    dest = _config_path(config_path, env) or (Path(entry["path"]) if entry else None)
    places: list[Placement] = []
    text = b""
    if entry is not None:
        if dest is None:
            raise BackupError("name the configuration file to restore with --config")
        text = archive.data(CONFIG_MEMBER)
        places.append(Placement(dest, data=text))
    # The restored configuration as this hub will read it (its environment included).
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as tmp:
        tmp.write(text)
    try:
        env_now = {k: v for k, v in env.items() if k != CONFIG_ENV}
        overrides = {"storage": {"url": storage}} if storage else None
        cfg = hub_config.load(path=Path(tmp.name), env=env_now, overrides=overrides)
    except ConfigError as exc:
        raise BackupError(f"the restored hub configuration does not load here: {exc}") from None
    finally:
        os.unlink(tmp.name)
    for item in archive.entries:
        if item["name"].startswith("files/"):
            places.append(Placement(Path(item["path"]), member=item["name"]))
    if archive.in_memory(f"state/{API_KEY}"):
        places.append(Placement(_state_dir(env) / API_KEY, member=f"state/{API_KEY}"))
    database = _sqlite_path(hub_config.storage_url(cfg, env))
    if archive.in_memory(DATABASE):
        if database is None:
            raise BackupError(
                "the archive holds an SQLite database but this hub's storage.url is "
                "PostgreSQL; load PostgreSQL with pg_restore, or restore to sqlite:///PATH"
            )
        companions = (
            database.with_name(database.name + "-wal"),
            database.with_name(database.name + "-shm"),
        )
        places.append(Placement(database, member=DATABASE, companions=companions))
    existing = conflicts(places)
    if existing and not force:
        raise BackupError(
            f"refusing to overwrite {', '.join(map(str, existing[:5]))}: restore into a fresh "
            "hub, or stop the hub and pass --force"
        )
    apply(archive, places)
    return f"restored the hub ({len(places)} files)" + (
        f": database {database}" if database else ""
    )


__all__ = ["KIND", "PG_ADVICE", "create", "restore", "run"]
