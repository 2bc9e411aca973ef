"""``appliance discover``: list the appliances announcing themselves on the LAN.

Browses ``_appliance._tcp`` over mDNS for a while and prints what answered, as a table or
(``--json``) a JSON list of :meth:`appliance.protocol.dnssd.Appliance.to_json` objects. Finding none
is not an error: the list is empty and the exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Sequence

from appliance.protocol.dnssd import Appliance, parse_interface_list

ENV_INTERFACES = "APPLIANCE_MDNS__INTERFACES"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("discover", help="find appliances on the LAN (mDNS/DNS-SD)")
    parser.add_argument(
        "--timeout", type=_seconds, default=3.0, metavar="S", help="seconds to browse (default: 3)"
    )
    parser.add_argument(
        "--interfaces",
        metavar="LIST",
        help="comma-separated interface names or IPv4 addresses to browse on "
        f"(default: ${ENV_INTERFACES}, else every non-loopback interface)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: use more than 0 and at most 3600 seconds")
    return value


def run(args: argparse.Namespace) -> int:
    """Browse, print, and return the exit status."""
    from appliance.client import DiscoveryError, discover

    spec = args.interfaces if args.interfaces is not None else os.environ.get(ENV_INTERFACES, "")
    try:
        found = asyncio.run(discover(timeout=args.timeout, interfaces=parse_interface_list(spec)))
    except DiscoveryError as exc:
        print(f"appliance discover: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"appliance discover: cannot use mDNS: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([a.to_json() for a in found], indent=2))
    elif found:
        print(table(found))
    else:
        print("no appliances found", file=sys.stderr)
    return 0


def table(appliances: Sequence[Appliance]) -> str:
    """A plain-text table: name, id, address:port, version, ready, models."""
    rows = [["NAME", "ID", "ADDRESS", "VERSION", "READY", "MODELS"]]
    for a in appliances:
        host = f"[{a.address}]" if ":" in a.address else a.address
        models = ",".join(a.models) + ("" if a.models_complete else ",…")
        rows.append(
            [
                a.name,
                a.device_id,
                f"{host}:{a.port}",
                a.version,
                "yes" if a.ready else "no",
                models or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )


__all__ = ["add_parser", "run", "table"]
