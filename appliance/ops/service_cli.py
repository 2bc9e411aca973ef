"""``appliance service install|uninstall|status``: run the appliance (or hub) under systemd.

``install`` writes the unit shipped in ``systemd/`` (with ``ExecStart`` pointing at this
installation), creates the system user, the configuration file and the credential store,
and enables the unit (``--no-start``: enable only, as the image build does in a chroot).
``uninstall`` disables and removes the unit and keeps configuration and state unless
``--purge``. ``status`` is ``systemctl status``. ``--root DIR`` acts on an offline root
file system (an image being built) instead of the running system.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

IMAGE_EXECUTABLE = "/opt/appliance/bin/appliance"  # the path the shipped units name


@dataclass(frozen=True)
class Service:
    """What one unit needs: its name, user, directories and a starter configuration."""

    unit: str
    user: str
    config_dir: str
    config_file: str
    state_dir: str
    starter: str


APPLIANCE = Service(
    unit="appliance.service",
    user="appliance",
    config_dir="/etc/appliance",
    config_file="appliance.toml",
    state_dir="/var/lib/appliance",
    starter="# The appliance's configuration; every key: `appliance config --reference`.\n"
    "# Secrets: /etc/credstore/hub-token and /etc/credstore/mqtt-password (0600).\n"
    '# Apply changes with `systemctl restart appliance`.\n\n[device]\nname = ""\n',
)
HUB = Service(
    unit="appliance-hub.service",
    user="appliance-hub",
    config_dir="/etc/appliance-hub",
    config_file="hub.toml",
    state_dir="/var/lib/appliance-hub",
    starter="# The fleet hub's configuration; every key: `appliance hub config --reference`.\n"
    "# Apply changes with `systemctl restart appliance-hub`.\n\n[http]\nport = 8090\n",
)


class ServiceError(Exception):
    """A step of install/uninstall failed; the message says which and why."""


def add_parser(subparsers: Any) -> None:
    """Add ``service`` to the ``appliance`` command."""
    service = subparsers.add_parser("service", help="install or remove the systemd service")
    sub = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    for name, text in (
        ("install", "install, create user and directories, enable and start"),
        ("uninstall", "stop, disable and remove the unit"),
        ("status", "systemctl status of the unit"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument(
            "--hub",
            action="store_true",
            help="the fleet hub's unit (appliance-hub) instead of the appliance",
        )
        if name != "status":
            action.add_argument(
                "--root",
                type=Path,
                metavar="DIR",
                help="act on this offline root file system (image builds)",
            )
    install = sub.choices["install"]
    install.add_argument("--no-start", action="store_true", help="enable, but do not start")
    install.add_argument(
        "--force",
        action="store_true",
        help="install even if the executable is where the unit cannot see it",
    )
    sub.choices["uninstall"].add_argument(
        "--purge", action="store_true", help="also delete configuration, state and the user"
    )


def run(args: argparse.Namespace) -> int:
    service = HUB if args.hub else APPLIANCE
    try:
        if args.service_command == "install":
            install(service, root=args.root, start=not args.no_start, force=args.force)
        elif args.service_command == "uninstall":
            uninstall(service, root=args.root, purge=args.purge)
        else:
            return subprocess.call(["systemctl", "status", "--no-pager", service.unit])
    except ServiceError as exc:
        print(f"appliance service: {exc}", file=sys.stderr)
        return 1
    return 0


def unit_text(service: Service, executable: str) -> str:
    """The shipped unit with ``ExecStart`` pointing at ``executable``."""
    return unit_source(service).read_text().replace(IMAGE_EXECUTABLE, executable)


def unit_source(service: Service) -> Path:
    """The shipped unit: inside the wheel (``appliance/ops/units``, see pyproject.toml) or,
    in a source checkout, ``systemd/``."""
    packaged = Path(str(resources.files("appliance.ops"))) / "units" / service.unit
    if packaged.is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "systemd" / service.unit
    if checkout.is_file():
        return checkout
    raise ServiceError(f"{service.unit} is not part of this installation")


def current_executable() -> str:
    """The ``appliance`` script of this installation (the venv's, under systemd too)."""
    candidate = Path(sys.prefix) / "bin" / "appliance"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("appliance")
    if found is None:
        raise ServiceError("cannot find the appliance executable of this installation")
    return str(Path(found).absolute())


def install(
    service: Service, *, root: Path | None = None, start: bool = True, force: bool = False
) -> None:
    offline = root is not None or not Path("/run/systemd/system").is_dir()
    base = root or Path("/")
    executable = IMAGE_EXECUTABLE if root is not None else current_executable()
    if not force:
        check_visible(executable)
    if os.geteuid() != 0 and root is None:
        raise ServiceError("run as root (it writes /etc/systemd/system and adds a user)")

    _ensure_user(service.user, service.state_dir, root=root)
    config_dir = base / service.config_dir.lstrip("/")
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / service.config_file
    if not config.exists():
        config.write_text(service.starter)
        config.chmod(0o640)
        _chown(config, "root", service.user, root=root)
    credstore = base / "etc/credstore"
    credstore.mkdir(mode=0o700, exist_ok=True)
    unit_path = base / "etc/systemd/system" / service.unit
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit_text(service, executable))
    print(f"installed {unit_path} (ExecStart {executable}), configuration {config}")

    systemctl = ["systemctl"] + ([f"--root={root}"] if root is not None else [])
    if not offline:
        _call(*systemctl, "daemon-reload")
    enable = [*systemctl, "enable"]
    if start and not offline:
        enable.append("--now")
    _call(*enable, service.unit)
    if start and offline:
        print(f"systemd is not running here: {service.unit} starts on the next boot")


def check_visible(executable: str) -> None:
    """ProtectHome=/PrivateTmp= hide /home, /root and /tmp from the service: an executable
    there could never start, so say so now rather than in the journal."""
    if executable.startswith(("/home/", "/root/", "/tmp/", "/var/tmp/")):
        raise ServiceError(
            f"{executable} is under /home, /root or /tmp, which the hardened unit cannot see "
            "(ProtectHome=, PrivateTmp=); install into /opt/appliance "
            "(APPLIANCE_VENV=/opt/appliance scripts/setup), or pass --force and relax "
            "ProtectHome= in a drop-in"
        )


def uninstall(service: Service, *, root: Path | None = None, purge: bool = False) -> None:
    offline = root is not None or not Path("/run/systemd/system").is_dir()
    base = root or Path("/")
    if os.geteuid() != 0 and root is None:
        raise ServiceError("run as root")
    unit_path = base / "etc/systemd/system" / service.unit
    systemctl = ["systemctl"] + ([f"--root={root}"] if root is not None else [])
    if unit_path.exists():
        _call(*systemctl, "disable", *([] if offline else ["--now"]), service.unit)
        unit_path.unlink()
        print(f"removed {unit_path}")
    if not offline:
        _call(*systemctl, "daemon-reload")
    if purge:
        for directory in (service.config_dir, service.state_dir):
            shutil.rmtree(base / directory.lstrip("/"), ignore_errors=True)
        if _user_exists(service.user, root):
            _call("userdel", *_prefix(root), service.user)
        print(f"deleted {service.config_dir}, {service.state_dir} and user {service.user}")


def _ensure_user(user: str, home: str, *, root: Path | None) -> None:
    if _user_exists(user, root):
        return
    _call(
        "useradd",
        *_prefix(root),
        "--system",
        "--user-group",
        "--home-dir",
        home,
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--comment",
        "Appliance",
        user,
    )


def _user_exists(user: str, root: Path | None) -> bool:
    if root is None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return False
        return True
    passwd = root / "etc/passwd"
    return passwd.is_file() and any(
        line.split(":", 1)[0] == user for line in passwd.read_text().splitlines()
    )


def _chown(path: Path, user: str, group: str, *, root: Path | None) -> None:
    if root is None:
        shutil.chown(path, user, grp.getgrnam(group).gr_name)
        return
    gid = next(
        (
            int(line.split(":")[2])
            for line in (root / "etc/group").read_text().splitlines()
            if line.split(":", 1)[0] == group
        ),
        None,
    )
    if gid is not None:
        os.chown(path, 0, gid)


def _prefix(root: Path | None) -> list[str]:
    return [] if root is None else ["--prefix", str(root)]


def _call(*cmd: str) -> None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ServiceError(f"{cmd[0]} is not installed") from None
    if result.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed: {(result.stderr or result.stdout).strip()}")


__all__ = ["APPLIANCE", "HUB", "Service", "ServiceError", "install", "uninstall", "unit_text"]
