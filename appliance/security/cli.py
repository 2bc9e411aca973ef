"""``appliance certs ...`` and ``appliance keys ...``: the LAN PKI and API keys. Parses and
calls only.

    appliance certs init [--dir DIR]                 a local CA (ca.pem, ca-key.pem)
    appliance certs device [--dir DIR] [--name N] [HOST ...]
                                                     a certificate for this box (or a broker)
    appliance certs client NAME [--dir DIR]          a client certificate (CN NAME) for
                                                     mutual TLS
    appliance keys create NAME [--scope S ...]       a new API key: the key once, and the
                                                     config entry holding only its hash
    appliance keys hash                              the hash of a key read from stdin
    appliance keys data-key                          a fresh data key for encryption at rest
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError

DEFAULT_DIR = Path("certs")


def add_create(parent: Any) -> None:
    """``create NAME [--scope S ...]`` under a ``keys`` command (the appliance's, the hub's)."""
    create = parent.add_parser("create", help="a new API key, printed once")
    create.add_argument("name", metavar="NAME", help="the key's name, e.g. homeassistant")
    create.add_argument(
        "--scope",
        action="append",
        choices=["read", "infer", "admin"],
        help="what it may do; repeatable (default: read and infer)",
    )


def add_parsers(subparsers: Any) -> None:
    """Add ``certs`` and ``keys`` to the ``appliance`` parser's subcommands."""
    certs = subparsers.add_parser("certs", help="create a local CA and device certificates")
    sub = certs.add_subparsers(dest="certs_command", metavar="CERTS_COMMAND", required=True)
    init = sub.add_parser("init", help="create the local certificate authority")
    init.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help="where ca.pem and ca-key.pem go (default: ./certs)",
    )
    init.add_argument("--name", default="Appliance local CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650)
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    device = sub.add_parser("device", help="issue a certificate signed by the local CA")
    device.add_argument(
        "hosts",
        nargs="*",
        metavar="HOST",
        help="DNS names and IP addresses it is valid for (default: this "
        "host's name, NAME.local, localhost, 127.0.0.1, ::1)",
    )
    device.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="the CA's directory (default: ./certs)"
    )
    device.add_argument(
        "--out", type=Path, default=None, help="where NAME.pem and NAME-key.pem go (default: --dir)"
    )
    device.add_argument("--name", default="device", help="file name stem (default: device)")
    device.add_argument("--days", type=int, default=730)
    device.add_argument("--force", action="store_true", help="replace existing files")
    client = sub.add_parser("client", help="issue a client certificate for mutual TLS")
    client.add_argument(
        "name",
        metavar="NAME",
        help="the client's name: the certificate's CN (security.client_certs "
        "maps it to scopes) and the file name stem",
    )
    client.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="the CA's directory (default: ./certs)"
    )
    client.add_argument(
        "--out", type=Path, default=None, help="where NAME.pem and NAME-key.pem go (default: --dir)"
    )
    client.add_argument("--days", type=int, default=730)
    client.add_argument("--force", action="store_true", help="replace existing files")

    keys = subparsers.add_parser("keys", help="create API keys and data keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    add_create(ksub)
    ksub.add_parser("hash", help="hash a key read from standard input (for keys you bring)")
    ksub.add_parser("data-key", help="print a fresh 256-bit data key (security.data_key_file)")


def run(args: argparse.Namespace) -> int:
    """Carry out ``appliance certs|keys ...``; returns the exit status."""
    try:
        if args.command == "certs":
            return _certs(args)
        return _keys(args)
    except ConfigError as exc:
        print(f"appliance {args.command}: {exc}", file=sys.stderr)
        return 1


def _certs(args: argparse.Namespace) -> int:
    from appliance.security import tls

    if args.certs_command == "init":
        made = tls.init_ca(args.dir, name=args.name, days=args.days, force=args.force)
        print(
            f"CA certificate {made.cert} (give it to clients and the MQTT broker as "
            f"their CA file)\nCA key {made.key} (keep it offline; mode 0600)"
        )
        return 0
    if args.certs_command == "client":
        made = tls.issue_client(
            args.dir, args.out or args.dir, name=args.name, days=args.days, force=args.force
        )
        print(
            f"client certificate {made.cert} (CN {args.name})\nkey {made.key}\n"
            f"the appliance accepts it with: [http] tls_client_ca = "
            f'"{args.dir / tls.CA_CERT}"; to let it stand in for an API key:\n\n'
            f'[[security.client_certs]]\nname = "{args.name}"\nscopes = ["infer", '
            f'"read"]\n\nclients: curl --cert {made.cert} --key {made.key} '
            f"--cacert {args.dir / tls.CA_CERT} https://..."
        )
        return 0
    hosts = args.hosts or _default_hosts()
    made = tls.issue(
        args.dir,
        args.out or args.dir,
        name=args.name,
        hosts=hosts,
        days=args.days,
        force=args.force,
    )
    print(
        f"certificate {made.cert} for {', '.join(hosts)}\nkey {made.key}\n"
        f'serve HTTPS with: [http] tls_cert_file = "{made.cert}", tls_key_file = '
        f'"{made.key}"\nthe same pair authenticates the box to a TLS MQTT broker '
        f"(mqtt.tls_cert_file, mqtt.tls_key_file, "
        f'mqtt.tls_ca_file = "{args.dir / tls.CA_CERT}")'
    )
    return 0


def _default_hosts() -> list[str]:
    short = socket.gethostname().split(".")[0] or "appliance"
    return [short, f"{short}.local", "localhost", "127.0.0.1", "::1"]


def _keys(args: argparse.Namespace) -> int:
    from appliance.security import crypto, keys

    if args.keys_command == "data-key":
        print(crypto.new_data_key())
        return 0
    if args.keys_command == "hash":
        value = sys.stdin.readline().strip()
        if len(value) < keys.MIN_KEY_LENGTH:
            print(
                f"appliance keys: a key needs at least {keys.MIN_KEY_LENGTH} characters "
                "(better: 'appliance keys create')",
                file=sys.stderr,
            )
            return 2
        print(keys.hash_key(value))
        return 0
    return create_key(args.name, args.scope, config_file="appliance.toml")


def create_key(
    name: str, scopes_asked: list[str] | None, *, config_file: str, command: str = "appliance keys"
) -> int:
    """Print a new API key once, and the configuration entry holding only its hash."""
    from appliance.security import keys

    args = argparse.Namespace(name=name)
    scopes = sorted(set(scopes_asked or ["read", "infer"]))
    try:
        keys.parse_key_file(f"{args.name} {','.join(scopes)} sha256:{'0' * 64}", "NAME")
    except ConfigError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    key = keys.new_key()
    digest = keys.hash_key(key)
    print(key)
    print(
        f"\nthe key above is shown once. Configure its hash, in {config_file}:\n\n"
        f'[[security.keys]]\nname = "{args.name}"\nscopes = {json.dumps(scopes)}\n'
        f"hash = \"{digest}\"\n\nor as a line of security.keys_file / the 'api-keys' "
        f"credential:\n\n{args.name} {','.join(scopes)} {digest}",
        file=sys.stderr,
    )
    return 0
