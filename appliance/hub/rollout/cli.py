"""``appliance hub publish|rollout|tag|public-key``: rollouts from the command line.

They work on the hub's database and artifact directory directly, like ``enroll``; a
running hub picks up what they change on its next check (``rollout.interval``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TYPE_CHECKING, Any

# The rollout machinery (storage, artifacts, numpy via the model repository) is imported
# when a rollout command runs, never for `appliance --help` (tests/test_cli_imports.py).
if TYPE_CHECKING:
    from appliance.hub.rollout.service import Rollouts

COMMANDS = ("publish", "rollout", "tag", "public-key")


def add_parsers(sub: Any, flags: Any) -> None:
    """The rollout commands, under ``appliance hub``."""
    publish = sub.add_parser(
        "publish", help="publish a model version or a configuration fragment for rollouts"
    )
    flags(publish)
    publish.add_argument(
        "path", nargs="?", help="a model directory with manifest.toml, or a model file"
    )
    publish.add_argument(
        # Not --config: on every hub command that names the hub's own hub.toml.
        "--fragment",
        metavar="FILE",
        help="a TOML configuration fragment (models, mqtt rules, alerts, logging) instead",
    )
    publish.add_argument("--name", help="name (default: the manifest's, file's, or 'config')")
    publish.add_argument(
        "--version", help="version (default: the manifest's; a fragment's content hash)"
    )
    tag = sub.add_parser("tag", help="add or remove tags of a device")
    flags(tag)
    tag.add_argument("device", metavar="DEVICE_ID")
    tag.add_argument("tags", nargs="*", help="tags to add")
    tag.add_argument("--remove", nargs="*", default=[], help="tags to remove")
    key = sub.add_parser("public-key", help="print the hub's signing key for hub.public_key")
    flags(key)
    rollout = sub.add_parser("rollout", help="start, watch, halt and roll back rollouts")
    actions = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="roll an artifact out")
    flags(start)
    start.add_argument("artifact", help="artifact id or name:version")
    who = start.add_mutually_exclusive_group(required=True)
    who.add_argument("--all", action="store_true", help="every enrolled device")
    who.add_argument("--devices", help="comma-separated device ids")
    who.add_argument("--tag", help="devices with this tag")
    start.add_argument("--waves", default="100%", help="cumulative waves, e.g. 1,25%%,100%%")
    start.add_argument("--soak", type=float, default=60.0, help="seconds healthy per wave")
    start.add_argument("--max-failures", type=int, default=0, help="failures before halting")
    start.add_argument(
        "--offline",
        choices=["wait", "skip", "catch-up"],
        default="wait",
        help="devices away when their wave starts: waited for, skipped, or skipped and "
        "installed once back",
    )
    for name in ("status", "halt", "resume", "rollback"):
        action = actions.add_parser(name, help=f"{name} a rollout")
        flags(action)
        action.add_argument("id", metavar="ROLLOUT_ID")
        action.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", help="list rollouts")
    flags(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")


async def run(command: str, args: argparse.Namespace, storage: Any, cfg: Any) -> int:
    from appliance.hub.rollout.artifacts import PublishError
    from appliance.hub.rollout.plan import PlanError
    from appliance.hub.rollout.service import NotFound, open_rollouts

    rollouts = await asyncio.to_thread(open_rollouts, storage, cfg)
    try:
        return await _run(command, args, rollouts)
    except (NotFound, PlanError, PublishError) as exc:
        print(f"appliance hub: {exc}", file=sys.stderr)
        return 1


async def enrolled(device: str, tags: list[str], storage: Any, cfg: Any) -> str:
    """Tags of a device just enrolled; returns the hub's public key to print with its token."""
    from appliance.hub.rollout.service import open_rollouts

    rollouts = await asyncio.to_thread(open_rollouts, storage, cfg)
    await rollouts.store.add_tags(device, tags)
    return rollouts.public_key


async def _run(command: str, args: argparse.Namespace, rollouts: Rollouts) -> int:
    from pathlib import Path

    from appliance.hub.rollout.artifacts import PublishError, publish_config, publish_model
    from appliance.hub.rollout.service import NotFound

    if command == "public-key":
        print(rollouts.public_key)
        return 0
    if command == "publish":
        if (args.path is None) == (args.fragment is None):
            raise PublishError("give a model (PATH) or --fragment FILE, one of them")
        how = publish_model if args.fragment is None else publish_config
        artifact = await asyncio.to_thread(
            how,
            rollouts.blobs,
            Path(args.path or args.fragment),
            name=args.name,
            version=args.version,
        )
        try:
            await rollouts.store.put_artifact(artifact)
        except ValueError as exc:
            raise PublishError(str(exc)) from None
        print(artifact.id)
        print(
            f"published {artifact.name} {artifact.version} ({artifact.size} bytes, "
            f"{len(artifact.files)} files)",
            file=sys.stderr,
        )
        return 0
    if command == "tag":
        if not any(d.id == args.device for d in await rollouts.devices()):
            raise NotFound(f"no device {args.device!r}")
        await rollouts.store.add_tags(args.device, args.tags)
        await rollouts.store.remove_tags(args.device, args.remove)
        print(" ".join((await rollouts.store.tags()).get(args.device, [])))
        return 0
    action = args.rollout_command
    if action == "start":
        target: dict[str, Any] = (
            {"all": True}
            if args.all
            else {"devices": args.devices.split(",")}
            if args.devices
            else {"tag": args.tag}
        )
        doc = await rollouts.create(
            {
                "artifact": args.artifact,
                "target": target,
                "waves": [w for w in args.waves.split(",") if w],
                "soak": args.soak,
                "max_failures": args.max_failures,
                "offline": args.offline,
            }
        )
        print(doc["id"])
        return 0
    if action == "list":
        docs = [await rollouts.status(r.id) for r in await rollouts.store.rollouts()]
        if args.json:
            print(json.dumps(docs, indent=2))
        for doc in [] if args.json else docs:
            art = doc["artifact"] or {}
            print(f"{doc['id']}  {doc['state']:<11} {art.get('name')} {art.get('version')}")
        return 0
    calls = {
        "status": rollouts.status,
        "halt": rollouts.halt,
        "resume": rollouts.resume,
        "rollback": rollouts.rollback,
    }
    doc = await calls[action](args.id)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    art = doc["artifact"] or {}
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["created"]))
    print(f"rollout {doc['id']} of {art.get('name')} {art.get('version')}, started {started}")
    print(f"state {doc['state']}, wave {doc['wave'] + 1} of {doc['wave_count']} {doc['reason']}")
    for d in doc["devices"]:
        print(f"  wave {d['wave'] + 1}  {d['device_id']:<32} {d['state']:<12} {d['reason']}")
    return 0
