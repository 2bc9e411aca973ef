"""A device's backup: what goes into the archive, and where a restore puts it back.

Members (all encrypted but the models):

=========================  ============================================================
``config/appliance.toml``  the configuration file, as the operator wrote it
``files/<section.key>``    every file the configuration names (hub token file, data key,
                           API key file, TLS certificates and keys, CA files)
``state/api-key``          the generated admin API key, when there is one
``state/outbox.db``        the hub outbox, copied with SQLite's online backup API
``enrolment.json``         device id and name, hub URL and the device's hub token
``models/...``             the model repository's manifests (every file with
                           ``--with-models``), in plain: models are not secret
=========================  ============================================================

A restore puts the configuration where ``--config`` (or ``$APPLIANCE_CONFIG``, else where
it came from) says, the named files back at their paths, the state into this box's state
directory and the models into the restored configuration's ``models.dir``. The device id
is pinned into the restored file when it was derived from the old box's machine id, so
the new box is the same device. The restored outbox keeps its stream (encrypted records
are bound to it) and skips its next sequence numbers ahead by :data:`SEQUENCE_GAP`, so
records the old box may have numbered after the backup never shadow new ones at the hub.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance import config as config_mod
from appliance.backup.archive import BackupError, Member, Secret, Written, open_archive
from appliance.backup.archive import write_archive as _write
from appliance.backup.place import Placement, apply, conflicts
from appliance.backup.sources import (
    path_fields,
    read_file,
    sqlite_edit,
    sqlite_snapshot,
    toml_has,
    toml_pin,
)
from appliance.config import Config
from appliance.errors import ConfigError

KIND = "device"
SEQUENCE_GAP = 2**32
CONFIG_MEMBER = "config/appliance.toml"
ENROLMENT = "enrolment.json"
API_KEY = "api-key"
OUTBOX = "outbox.db"
HUB_TOKEN = "hub-token"
# Paths that are not files to keep: models travel as models/, the outbox as state/.
_NOT_FILES = frozenset({"models.dir", "models.files", "hub.outbox_path"})


@dataclass(frozen=True)
class Source:
    """The device as it runs: its resolved configuration and where things are."""

    config: Config
    config_path: Path | None
    state_dir: Path
    outbox: Path
    env: Mapping[str, str]


def create(
    source: Source,
    out: Path,
    secret: Secret,
    *,
    with_models: bool = False,
    with_outbox: bool = True,
) -> Written:
    """Write the device's backup to ``out``; without the outbox it is the configuration
    backup the hub keeps (what waits in the outbox is bound for the hub anyway)."""
    cfg = source.config
    members: list[Member] = []
    if source.config_path is not None and source.config_path.is_file():
        members.append(
            Member(
                CONFIG_MEMBER,
                read_file(source.config_path),
                meta={"role": "config", "path": str(source.config_path)},
            )
        )
    for key, path in path_fields(cfg, _NOT_FILES):
        members.append(
            Member(
                f"files/{key}",
                read_file(path),
                meta={"role": "file", "key": key, "path": str(path)},
            )
        )
    if (source.state_dir / API_KEY).is_file():
        members.append(Member(f"state/{API_KEY}", read_file(source.state_dir / API_KEY)))
    if with_outbox and source.outbox.is_file():
        members.append(Member(f"state/{OUTBOX}", sqlite_snapshot(source.outbox)))
    members.append(Member(ENROLMENT, json.dumps(_enrolment(source)).encode("utf-8")))
    models = _models(cfg, with_models=with_models)
    members.extend(models)
    facts = {
        "kind": KIND,
        "appliance_version": __version__,
        "device": {"id": cfg.device.id, "name": cfg.device.name},
        "hub_url": cfg.hub.url,
        "with_models": with_models,
        "models": _model_versions(cfg),
    }
    return _write(out, members, facts, secret)


def _enrolment(source: Source) -> dict[str, Any]:
    from appliance.ops.hubsync import resolve_token

    cfg = source.config
    token = ""
    if cfg.hub.url:
        try:
            token = resolve_token(cfg, source.env)
        except ConfigError:
            token = ""  # not enrolled yet: the backup still holds everything else
    return {
        "device_id": cfg.device.id,
        "name": cfg.device.name,
        "hub_url": cfg.hub.url,
        "token": token,
    }


def _repository(cfg: Config) -> Path | None:
    """The configured model repository; None for the models shipped with the package."""
    directory = cfg.models.dir
    if directory is None or not directory.is_dir():
        return None
    if directory.resolve() == config_mod.default_models_dir().resolve():
        return None
    return directory


def _models(cfg: Config, *, with_models: bool) -> list[Member]:
    root = _repository(cfg)
    if root is None:
        return []
    members = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        if with_models or path.name == "manifest.toml":
            members.append(
                Member(f"models/{rel}", path=path, encrypted=False, meta={"role": "model"})
            )
    return members


def _model_versions(cfg: Config) -> list[dict[str, str]]:
    from appliance.core.repository import collect

    return [
        {"name": s.name, "version": s.version, "runtime": s.runtime}
        for s in collect(cfg.models.dir, cfg.models.files)
        if s.problem is None
    ]


# ---------------------------------------------------------------------------- restore


@dataclass(frozen=True)
class Target:
    """Where this box keeps things: the restore's destinations come from here."""

    env: Mapping[str, str]
    state_dir: Path
    config_path: Path | None = None  # --config; else $APPLIANCE_CONFIG; else the original
    models_dir: Path | None = None  # --models-dir; else the restored models.dir


def restore(
    archive_path: Path, secret: Secret, target: Target, *, force: bool = False
) -> list[str]:
    """Check the whole archive, then put it in place; returns what was restored (lines)."""
    archive = open_archive(archive_path, secret)
    if archive.manifest.get("kind") != KIND:
        raise BackupError(
            f"{archive_path} is a {archive.manifest.get('kind')!r} backup, not a device's"
        )
    enrolment = json.loads(archive.data(ENROLMENT))
    config_dest, text = _config_text(archive, target, enrolment)
    cfg = _load(text, target.env)
    places: list[Placement] = []
    token_file = _token_file(cfg, enrolment, target)
    if token_file is not None:
        text = toml_pin(text, "hub", "token_file", str(token_file))
        cfg = _load(text, target.env)
        places.append(Placement(token_file, data=enrolment["token"].encode("utf-8") + b"\n"))
    places.append(Placement(config_dest, data=text.encode("utf-8")))
    for entry in archive.entries:
        name = entry["name"]
        if name.startswith("files/"):
            places.append(Placement(Path(entry["path"]), member=name))
    if archive.in_memory(f"state/{API_KEY}"):
        places.append(Placement(target.state_dir / API_KEY, member=f"state/{API_KEY}"))
    if archive.in_memory(f"state/{OUTBOX}"):
        from appliance.ops.hubsync import outbox_path

        dest = outbox_path(cfg, target.env)
        places.append(
            Placement(
                dest,
                data=_advance(archive.data(f"state/{OUTBOX}")),
                companions=(dest.with_name(dest.name + "-wal"), dest.with_name(dest.name + "-shm")),
            )
        )
    models_root = target.models_dir or cfg.models.dir
    model_entries = [e for e in archive.entries if e["name"].startswith("models/")]
    if model_entries:
        if (
            models_root is None
            or models_root.resolve() == config_mod.default_models_dir().resolve()
        ):
            raise BackupError(
                "the archive holds models but no models.dir to restore them to; give --models-dir"
            )
        for entry in model_entries:
            dest = models_root / entry["name"].removeprefix("models/")
            places.append(Placement(dest, member=entry["name"], secret=False))
    existing = conflicts(places)
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise BackupError(
            f"refusing to overwrite what is already there ({shown}); restore onto a fresh "
            "box, or pass --force to replace it"
        )
    from appliance.ops.instance import AlreadyRunning, StateLock

    try:
        with StateLock(target.state_dir):  # no daemon may start while the state is written
            apply(archive, places)
    except AlreadyRunning as exc:
        raise BackupError(str(exc)) from None
    device = archive.manifest.get("device", {})
    return [
        f"restored device {device.get('id')!r} ({len(places)} files): configuration {config_dest}, "
        f"state {target.state_dir}" + (f", models {models_root}" if model_entries else "")
    ]


def _config_text(archive: Any, target: Target, enrolment: Mapping[str, Any]) -> tuple[Path, str]:
    entry = archive.entry(CONFIG_MEMBER)
    dest = target.config_path
    if dest is None and target.env.get(config_mod.ENV_CONFIG_FILE):
        dest = Path(target.env[config_mod.ENV_CONFIG_FILE])
    if dest is None and entry is not None:
        dest = Path(entry["path"])
    if dest is None:
        raise BackupError(
            "the backup holds no configuration file; name one to create with --config"
        )
    text = archive.data(CONFIG_MEMBER).decode("utf-8") if entry is not None else ""
    try:
        # The old box's id may have come from its machine id: the new box must keep it.
        text = toml_pin(text, "device", "id", str(enrolment["device_id"]))
        if enrolment.get("name") and not toml_has(text, "device", "name"):
            text = toml_pin(text, "device", "name", str(enrolment["name"]))
        if enrolment.get("hub_url"):
            text = toml_pin(text, "hub", "url", str(enrolment["hub_url"]))
    except ValueError as exc:
        raise BackupError(f"the archived configuration is not valid TOML: {exc}") from None
    return dest, text


def _load(text: str, env: Mapping[str, str]) -> Config:
    """The restored configuration as this box will read it (its environment included)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", encoding="utf-8", delete=False) as tmp:
        tmp.write(text)
    try:
        env = {k: v for k, v in env.items() if k != config_mod.ENV_CONFIG_FILE}
        return config_mod.load(path=Path(tmp.name), env=env)
    except ConfigError as exc:
        raise BackupError(f"the restored configuration does not load here: {exc}") from None
    finally:
        os.unlink(tmp.name)


def _token_file(cfg: Config, enrolment: Mapping[str, Any], target: Target) -> Path | None:
    """Where to keep the hub token when nothing in the restored configuration holds it."""
    if not enrolment.get("token") or not cfg.hub.url:
        return None
    if cfg.hub.token.get_secret_value() or cfg.hub.token_file is not None:
        return None
    creds = target.env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / HUB_TOKEN).is_file():
        return None
    return target.state_dir / HUB_TOKEN


def _advance(outbox: bytes) -> bytes:
    """The outbox with its next sequence number moved :data:`SEQUENCE_GAP` ahead."""
    return sqlite_edit(
        outbox,
        ("UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'records'", (SEQUENCE_GAP,)),
        (
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'records', ? WHERE NOT EXISTS "
            "(SELECT 1 FROM sqlite_sequence WHERE name = 'records')",
            (SEQUENCE_GAP,),
        ),
    )


__all__ = ["KIND", "SEQUENCE_GAP", "Source", "Target", "create", "restore"]
