"""``appliance hub ...``: run the fleet hub and manage device enrolment. Parses and calls only.

appliance hub [run]            serve (the long-running service; SIGTERM stops gracefully)
appliance hub enroll DEVICE    create a device (or re-key it) and print its token once
appliance hub revoke DEVICE    revoke a device's token: its uploads get 401 from now on
appliance hub devices          list devices and their status
appliance hub config           print the resolved configuration (--toml, --reference)
appliance hub keys create NAME a new API key for the fleet API and dashboard
appliance hub backup FILE      the hub's database, configuration and keys in one archive
appliance hub restore FILE     a fresh hub from such an archive
appliance hub backup-download DEVICE FILE   a device's latest backup, kept by the hub
appliance hub publish PATH     publish a model version for rollouts
appliance hub rollout ...      start, watch, halt, resume and roll back rollouts
appliance hub tag DEVICE TAG   tag devices for rollouts; public-key: the signing key
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.hub.rollout import cli as rollout_cli


def add_parser(subparsers: Any) -> None:
    """Add the ``hub`` command to the ``appliance`` parser's subcommands."""
    hub = subparsers.add_parser("hub", help="the fleet hub appliances report to")
    sub = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    run = sub.add_parser("run", help="serve the hub (the default)")
    _flags(run)
    run.add_argument("--host", help="address to bind (http.host)")
    run.add_argument("--port", type=int, help="HTTP port, 0 for any free one (http.port)")
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="logging.level"
    )
    enroll = sub.add_parser("enroll", help="enrol a device and print its token")
    _flags(enroll)
    enroll.add_argument("device", metavar="DEVICE_ID", help="the device's [device] id")
    enroll.add_argument("--name", default="", help="a human name for the fleet view")
    enroll.add_argument("--tag", action="append", default=[], help="a tag for rollouts")
    revoke = sub.add_parser("revoke", help="revoke a device's token")
    _flags(revoke)
    revoke.add_argument("device", metavar="DEVICE_ID")
    devices = sub.add_parser("devices", help="list enrolled devices")
    _flags(devices)
    devices.add_argument("--json", action="store_true", help="print JSON")
    config = sub.add_parser("config", help="validate the hub configuration and print it")
    _flags(config)
    shown = config.add_mutually_exclusive_group()
    shown.add_argument(
        "--toml",
        action="store_true",
        help="print TOML that can be saved as hub.toml (default: JSON)",
    )
    shown.add_argument(
        "--reference", action="store_true", help="print the Markdown reference of every key instead"
    )
    download = sub.add_parser(
        "backup-download", help="save the latest backup a device keeps on the hub"
    )
    _flags(download)
    download.add_argument("device", metavar="DEVICE_ID")
    download.add_argument("file", metavar="FILE", help="where to write the archive ('-': stdout)")
    download.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    rollout_cli.add_parsers(sub, _flags)
    keys = sub.add_parser("keys", help="create API keys for the fleet API and dashboard")
    from appliance.security.cli import add_create

    add_create(keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True))
    from appliance.backup.cli import add_hub_parsers

    add_hub_parsers(sub, _flags)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="hub.toml (default: $APPLIANCE_HUB_CONFIG)"
    )
    parser.add_argument(
        "--storage", metavar="URL", help="sqlite:///PATH or postgresql://... (storage.url)"
    )


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    pairs = {
        ("http", "host"): getattr(args, "host", None),
        ("http", "port"): getattr(args, "port", None),
        ("storage", "url"): getattr(args, "storage", None),
        ("logging", "level"): getattr(args, "log_level", None),
    }
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Carry out ``appliance hub ...``; returns the exit status."""
    from appliance.hub import config as hub_config

    command = args.hub_command or "run"
    if command == "keys":  # needs no configuration: it prints what goes into one
        from appliance.security.cli import create_key

        return create_key(
            args.name, args.scope, config_file="hub.toml", command="appliance hub keys"
        )
    if command == "config" and args.reference:
        print(hub_config.hub_reference(), end="")
        return 0
    if command in ("backup", "restore"):
        from appliance.backup import hubside

        return hubside.run(
            args,
            lambda: hub_config.load(
                path=getattr(args, "config", None), env=os.environ, overrides=_overrides(args)
            ),
        )
    try:
        cfg = hub_config.load(
            path=getattr(args, "config", None), env=os.environ, overrides=_overrides(args)
        )
    except ConfigError as exc:
        print(f"appliance hub: {exc}", file=sys.stderr)
        return 2
    if command == "config":
        from appliance.config import to_toml

        print(
            to_toml(cfg, header="# hub.toml: the resolved hub configuration")
            if args.toml
            else json.dumps(cfg.model_dump(mode="json"), indent=2)
        )
        return 0
    if command == "run":
        from appliance.hub import server
        from appliance.ops import logs

        logs.setup(cfg.logging.level)
        return server.run(
            cfg,
            load_config=lambda: hub_config.load(
                path=getattr(args, "config", None), env=os.environ, overrides=_overrides(args)
            ),
        )
    try:
        return asyncio.run(_manage(command, args, cfg))
    except (ConfigError, OSError) as exc:
        print(f"appliance hub: {exc}", file=sys.stderr)
        return 1


async def _manage(command: str, args: argparse.Namespace, cfg: Any) -> int:
    import re

    from appliance.hub.config import storage_url
    from appliance.hub.storage import from_url
    from appliance.hub.tokens import hash_token, new_token

    if command in ("enroll", "revoke") and not re.fullmatch(
        r"[a-z0-9][a-z0-9-]{0,62}", args.device
    ):
        print(
            f"appliance hub: device id {args.device!r} is not valid: lower-case letters, "
            "digits and '-', at most 63 characters",
            file=sys.stderr,
        )
        return 2
    storage = from_url(storage_url(cfg), pool_size=2)
    await storage.open()
    try:
        if command in rollout_cli.COMMANDS:
            return await rollout_cli.run(command, args, storage, cfg)
        if command == "enroll":
            token = new_token()
            await storage.enroll(args.device, args.name, hash_token(token), time.time())
            public_key = await rollout_cli.enrolled(args.device, args.tag, storage, cfg)
            print(token)
            print(
                f"enrolled {args.device}; give the device this token as hub.token, "
                "hub.token_file or the systemd credential 'hub-token' (it is shown once), "
                f"and the hub's signing key as hub.public_key = {public_key!r}",
                file=sys.stderr,
            )
            return 0
        if command == "backup-download":
            return await _backup_download(storage, args)
        if command == "revoke":
            if not await storage.revoke(args.device, time.time()):
                print(f"appliance hub: no device {args.device!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.device}", file=sys.stderr)
            return 0
        rows = await storage.devices()
        if args.json:
            print(json.dumps([d.to_dict() for d in rows], indent=2))
        else:
            for d in rows:
                seen = (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.last_seen))
                    if d.last_seen
                    else "-"
                )
                print(f"{d.id:<32} {d.status():<10} last seen {seen}  {d.name}")
        return 0
    finally:
        await storage.close()


async def _backup_download(storage: Any, args: argparse.Namespace) -> int:
    """Write the device's latest hub-kept backup to ``args.file`` (what
    ``GET /api/v1/backups/{id}`` answers); restore it with ``appliance restore``."""
    from appliance.hub.storage import backups

    if await storage.device(args.device) is None:
        print(f"appliance hub: no device {args.device!r}", file=sys.stderr)
        return 1
    await backups.create_schema(storage)
    data = await backups.archive(storage, args.device)
    if data is None:
        print(f"appliance hub: the hub keeps no backup of {args.device!r}", file=sys.stderr)
        return 1
    if args.file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    target = Path(args.file)
    if await asyncio.to_thread(target.exists) and not args.force:
        print(f"appliance hub: {target} exists; give --force to overwrite it", file=sys.stderr)
        return 1
    tmp = target.with_name(f".{target.name}.part")
    await asyncio.to_thread(tmp.write_bytes, data)
    await asyncio.to_thread(os.replace, tmp, target)
    (info,) = await backups.info(storage, args.device)
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    print(f"wrote {target}: {args.device}'s backup of {made}, {len(data)} bytes", file=sys.stderr)
    return 0
