"""Boot-partition configuration for the appliance image (appliance-firstboot.service).

Runs as root on every boot, before the network, Mosquitto and the appliance start:

- once: grow the root partition and its ext4 file system to the whole card;
- once: create SSH host keys (the image ships none, so no two devices share them);
- ``appliance.toml`` on the boot partition: validated with ``appliance config`` and
  installed as /etc/appliance/appliance.toml. An invalid file is not installed: the
  previous configuration (on a new card: the defaults) stays, the console (serial and
  HDMI) says which keys were wrong, and the error goes to CONFIG_ERROR, which the daemon
  logs and shows in /health (``appliance run --config-error``);
- ``hub-token``, ``mqtt-password``, ``api-keys``, ``data-key``: moved to /etc/credstore
  (0600), where the unit's
  ``LoadCredential=`` finds them, and removed from the FAT partition;
- ``authorized_keys``: root's SSH keys (there are no passwords to log in with);
- ``network.toml``: host name, Wi-Fi and an optional fixed address, written as
  systemd-networkd / wpa_supplicant files; removed afterwards (it holds the Wi-Fi key).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomllib

BOOT = Path(os.environ.get("APPLIANCE_BOOT_DIR", "/boot/firmware"))
STAMPS = Path("/var/lib/appliance-firstboot")
APPLIANCE = os.environ.get("APPLIANCE_BIN", "/opt/appliance/bin/appliance")
# Read by the daemon (--config-error in appliance.service.d/boot-config.conf); on /run, so
# every boot checks the boot partition's file afresh.
CONFIG_ERROR = Path(os.environ.get("APPLIANCE_CONFIG_ERROR",
                                   "/run/appliance-firstboot/config-error"))
HDMI = Path(os.environ.get("APPLIANCE_FIRSTBOOT_HDMI", "/dev/tty1"))


def log(message: str) -> None:
    print(f"appliance-firstboot: {message}", flush=True)


def shout(message: str) -> None:
    """An error the person at the box must see: the log/serial console, and the HDMI
    screen (the kernel's /dev/console is the serial port when both are configured)."""
    for line in message.splitlines():
        log(line)
    try:
        with HDMI.open("w") as tty:
            tty.write("".join(f"appliance-firstboot: {line}\n" for line in message.splitlines()))
    except OSError:
        pass  # no display (a VM, a headless board)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def once(name: str) -> bool:
    """True the first time ``name`` is asked for (a stamp file remembers it)."""
    stamp = STAMPS / name
    if stamp.exists():
        return False
    STAMPS.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    return True


def grow_root() -> None:
    source = run("findmnt", "-no", "SOURCE", "/").stdout.strip()
    disk = run("lsblk", "-no", "PKNAME", source).stdout.strip()
    number = Path(f"/sys/class/block/{Path(source).name}/partition").read_text().strip()
    result = run("growpart", f"/dev/{disk}", number, check=False)
    if result.returncode not in (0, 1):  # 1: NOCHANGE, already the whole disk
        log(f"growpart failed: {result.stdout}{result.stderr}")
        return
    run("resize2fs", source)
    log(f"root file system {source} grown to the whole of /dev/{disk}")


def install_file(src: Path, dest: Path, mode: int, group: str = "root") -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".new")
    tmp.write_bytes(src.read_bytes())
    shutil.chown(tmp, "root", group)
    tmp.chmod(mode)
    tmp.replace(dest)


def apply_config() -> None:
    CONFIG_ERROR.unlink(missing_ok=True)
    src = BOOT / "appliance.toml"
    if not src.is_file():
        return
    dest = Path("/etc/appliance/appliance.toml")
    if dest.is_file() and dest.read_bytes() == src.read_bytes():
        return
    # Validated in a clean environment: the daemon's APPLIANCE_* variables are not here.
    check = run(APPLIANCE, "config", "--config", str(src), check=False)
    if check.returncode != 0:
        problem = check.stderr.strip().removeprefix("appliance: ") or f"exit {check.returncode}"
        fallback = "the previous configuration" if dest.is_file() else "the defaults"
        shout(f"{src} rejected, the appliance starts on {fallback}: {problem}")
        CONFIG_ERROR.parent.mkdir(parents=True, exist_ok=True)
        tmp = CONFIG_ERROR.with_name(CONFIG_ERROR.name + ".new")
        tmp.write_text(f"{src} rejected, running on {fallback}: {problem}\n")
        tmp.chmod(0o640)  # it may quote values from the file: root and the daemon only
        try:
            shutil.chown(tmp, "root", "appliance")
        except LookupError:
            tmp.chmod(0o644)  # no service user (not the image): nobody else to keep out
        tmp.replace(CONFIG_ERROR)
        return
    install_file(src, dest, 0o640, group="appliance")
    log(f"installed {src} as {dest}")


def move_secrets() -> None:
    for name in ("hub-token", "mqtt-password", "api-keys", "data-key"):
        src = BOOT / name
        if src.is_file():
            Path("/etc/credstore").mkdir(mode=0o700, exist_ok=True)
            install_file(src, Path("/etc/credstore") / name, 0o600)
            src.unlink()
            log(f"moved {name} into /etc/credstore")
    keys = BOOT / "authorized_keys"
    if keys.is_file():
        ssh = Path("/root/.ssh")
        ssh.mkdir(mode=0o700, exist_ok=True)
        install_file(keys, ssh / "authorized_keys", 0o600)
        keys.unlink()
        log("installed root's SSH authorized_keys")


def apply_network() -> None:
    src = BOOT / "network.toml"
    if not src.is_file():
        return
    try:
        net: dict[str, Any] = tomllib.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log(f"{src} is not valid TOML, ignored: {exc}")
        return
    hostname = str(net.get("hostname", "")).strip()
    if hostname:
        Path("/etc/hostname").write_text(hostname + "\n")
        hosts = Path("/etc/hosts").read_text().splitlines()
        hosts = [f"127.0.1.1\t{hostname}" if h.startswith("127.0.1.1") else h for h in hosts]
        Path("/etc/hosts").write_text("\n".join(hosts) + "\n")
        run("hostname", hostname, check=False)
        log(f"host name {hostname}")
    wifi = net.get("wifi") or {}
    if wifi.get("ssid"):
        conf = Path("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf")
        conf.parent.mkdir(parents=True, exist_ok=True)
        psk = wifi.get("psk", "")
        security = f'psk="{psk}"' if psk else "key_mgmt=NONE"
        conf.write_text(
            "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\nupdate_config=0\n"
            f"country={wifi.get('country', 'US')}\n"
            f'network={{\n    ssid="{wifi["ssid"]}"\n    {security}\n}}\n')
        conf.chmod(0o600)
        Path("/etc/systemd/network/70-appliance-wifi.network").write_text(
            "[Match]\nName=wlan*\n\n[Network]\nDHCP=yes\nMulticastDNS=no\nLLMNR=no\n")
        run("systemctl", "enable", "wpa_supplicant@wlan0.service", check=False)
        run("systemctl", "start", "--no-block", "wpa_supplicant@wlan0.service", check=False)
        log(f"Wi-Fi network {wifi['ssid']!r}")
    eth = net.get("ethernet") or {}
    if eth.get("address"):
        lines = ["[Match]", "Name=en* eth*", "", "[Network]", f"Address={eth['address']}"]
        if eth.get("gateway"):
            lines.append(f"Gateway={eth['gateway']}")
        lines += [f"DNS={d}" for d in eth.get("dns", [])]
        lines += ["MulticastDNS=no", "LLMNR=no"]
        Path("/etc/systemd/network/80-appliance-wired.network").write_text(
            "\n".join(lines) + "\n")
        log(f"fixed address {eth['address']} on wired interfaces")
    src.unlink()


def main() -> int:
    failed = False
    steps = [("grow root", grow_root, "grow-root"), ("ssh host keys", ssh_keys, "ssh-keys"),
             ("config", apply_config, None), ("secrets", move_secrets, None),
             ("network", apply_network, None)]
    for name, step, stamp in steps:
        if stamp is not None and not once(stamp):
            continue
        try:
            step()
        except Exception as exc:  # one failed step must not keep the others from running
            log(f"{name} failed: {exc}")
            failed = True
    os.sync()  # the FAT partition and /etc survive a pull of the plug right after boot
    return 1 if failed else 0


def ssh_keys() -> None:
    if shutil.which("ssh-keygen"):
        run("ssh-keygen", "-A")
        log("created SSH host keys")


if __name__ == "__main__":
    sys.exit(main())
