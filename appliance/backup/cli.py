"""``appliance backup`` and ``appliance restore``: parse, find the secret, call, report.

appliance backup FILE [--with-models] [--to-hub]    write this device's archive
appliance restore FILE [--force]                    bring a device back from it
appliance restore --from-hub URL --device ID --token-file F   ... from the hub's copy

The secret: ``--key-file FILE``, ``--passphrase-file FILE``, ``$APPLIANCE_BACKUP_PASSPHRASE``,
or a prompt on a terminal. Exit status 0 done, 1 refused or failed (the message names
why), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

PASSPHRASE_ENV = "APPLIANCE_BACKUP_PASSPHRASE"


def add_parsers(subparsers: Any, config_flags: Any) -> None:
    """Add ``backup`` and ``restore``; ``config_flags`` adds --config, --models-dir, ..."""
    backup = subparsers.add_parser("backup", help="write this device's backup archive")
    config_flags(backup)
    backup.add_argument("file", type=Path, nargs="?", metavar="FILE", help="the archive to write")
    backup.add_argument(
        "--with-models", action="store_true", help="include the model files, not only manifests"
    )
    backup.add_argument(
        "--to-hub", action="store_true", help="also keep it on the hub as this device's latest"
    )
    secret_flags(backup)
    restore = subparsers.add_parser("restore", help="restore this device from a backup archive")
    config_flags(restore)
    restore.add_argument("file", type=Path, nargs="?", metavar="FILE", help="the archive")
    restore.add_argument("--force", action="store_true", help="replace what is already there")
    restore.add_argument(
        "--from-hub", metavar="URL", help="fetch the device's backup from this hub"
    )
    restore.add_argument("--device", metavar="ID", help="with --from-hub: the device id")
    restore.add_argument("--token-file", type=Path, metavar="FILE", help="the device's hub token")
    restore.add_argument("--hub-ca", type=Path, metavar="FILE", help="CA of an https hub")
    secret_flags(restore)


def add_hub_parsers(subparsers: Any, flags: Any) -> None:
    """Add ``hub backup`` and ``hub restore`` (carried out by :mod:`.hubside`)."""
    backup = subparsers.add_parser("backup", help="write the hub's backup archive")
    flags(backup)
    backup.add_argument("file", type=Path, metavar="FILE")
    backup.add_argument(
        "--without-database",
        action="store_true",
        help="configuration and keys only (a PostgreSQL database is backed up with pg_dump)",
    )
    secret_flags(backup)
    restore = subparsers.add_parser("restore", help="restore the hub from a backup archive")
    flags(restore)
    restore.add_argument("file", type=Path, metavar="FILE")
    restore.add_argument("--force", action="store_true", help="replace what is already there")
    secret_flags(restore)


def secret_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--key-file", type=Path, metavar="FILE", help="a file of random bytes")
    group.add_argument(
        "--passphrase-file", type=Path, metavar="FILE", help="a passphrase in a file"
    )


def secret(args: argparse.Namespace, env: Mapping[str, str], *, confirm: bool) -> Any:
    from appliance.backup.archive import BackupError, Secret

    if args.key_file is not None:
        return Secret.from_key_file(args.key_file)
    if args.passphrase_file is not None:
        try:
            return Secret.from_passphrase(args.passphrase_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise BackupError(
                f"cannot read {args.passphrase_file}: {exc.strerror or exc}"
            ) from None
    if env.get(PASSPHRASE_ENV):
        return Secret.from_passphrase(env[PASSPHRASE_ENV])
    if not sys.stdin.isatty():
        raise BackupError(
            f"no secret for the backup: give --key-file, --passphrase-file or ${PASSPHRASE_ENV}"
        )
    text = getpass.getpass("backup passphrase: ")
    if confirm and getpass.getpass("again: ") != text:
        raise BackupError("the passphrases differ")
    return Secret.from_passphrase(text)


def run(args: argparse.Namespace, load: Any) -> int:
    """``load()`` gives the resolved configuration (or raises ConfigError)."""
    from appliance.backup.archive import BackupError

    try:
        if args.command == "backup":
            return _backup(args, load)
        return _restore(args)
    except ConfigError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    except BackupError as exc:
        print(f"appliance {args.command}: {exc}", file=sys.stderr)
        return 1


def _backup(args: argparse.Namespace, load: Any) -> int:
    from appliance.backup import device, hubclient
    from appliance.backup.archive import BackupError
    from appliance.ops.hubsync import outbox_path, resolve_token
    from appliance.ops.instance import state_directory

    if args.file is None and not args.to_hub:
        raise BackupError("name the archive to write (FILE), or pass --to-hub")
    cfg = load()
    config_path = args.config or (
        Path(os.environ["APPLIANCE_CONFIG"]) if os.environ.get("APPLIANCE_CONFIG") else None
    )
    source = device.Source(
        cfg, config_path, state_directory(os.environ), outbox_path(cfg, os.environ), os.environ
    )
    key = secret(args, os.environ, confirm=True)
    if args.file is not None:
        written = device.create(source, args.file, key, with_models=args.with_models)
        print(f"wrote {written.path} ({written.size} bytes, {written.members} members)")
    if args.to_hub:
        if not cfg.hub.url:
            raise BackupError("--to-hub needs hub.url (this device is not set up for a hub)")
        with tempfile.TemporaryDirectory(prefix="appliance-backup-") as tmp:
            # The hub keeps the configuration backup: no models, no outbox.
            config_only = device.create(source, Path(tmp) / "backup.tar", key, with_outbox=False)
            answer = hubclient.upload(
                cfg.hub.url,
                cfg.device.id,
                resolve_token(cfg, os.environ),
                config_only.path,
                ca_file=cfg.hub.tls_ca_file,
                cert_file=cfg.hub.tls_cert_file,
                key_file=cfg.hub.tls_key_file,
                timeout=cfg.hub.timeout * 4,
            )
        print(
            f"kept on the hub {cfg.hub.url} as {cfg.device.id}'s backup "
            f"({answer.get('size')} bytes)"
        )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from appliance.backup import device, hubclient
    from appliance.backup.archive import BackupError
    from appliance.ops.instance import state_directory

    if (args.file is None) == (args.from_hub is None):
        raise BackupError("give the archive (FILE) or --from-hub URL, one of them")
    key = secret(args, os.environ, confirm=False)
    target = device.Target(
        env=os.environ,
        state_dir=state_directory(os.environ),
        config_path=args.config,
        models_dir=args.models_dir,
    )
    with tempfile.TemporaryDirectory(prefix="appliance-restore-") as tmp:
        path = args.file
        if args.from_hub is not None:
            if not args.device or args.token_file is None:
                raise BackupError("--from-hub needs --device ID and --token-file FILE")
            try:
                token = args.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise BackupError(f"cannot read {args.token_file}: {exc.strerror or exc}") from None
            path = Path(tmp) / "backup.tar"
            hubclient.download(args.from_hub, args.device, token, path, ca_file=args.hub_ca)
        for line in device.restore(path, key, target, force=args.force):
            print(line)
    return 0


__all__ = ["PASSPHRASE_ENV", "add_hub_parsers", "add_parsers", "run", "secret", "secret_flags"]
