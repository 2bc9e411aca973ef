"""Print the image manifest (JSON): what went into the image, for the release notes."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    rootfs, image, arch, mirror, gguf = sys.argv[1:6]
    root = Path(rootfs)
    packages = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n"],
        capture_output=True, text=True, check=True).stdout.split("\n")
    wanted = ("linux-image", "raspi-firmware", "mosquitto", "python3", "systemd")
    site = subprocess.run(
        ["chroot", rootfs, "/opt/appliance/bin/python", "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    with open(image, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    manifest: dict[str, object] = {
        "image": Path(image).name,
        "sha256": digest.hexdigest(),
        "size": Path(image).stat().st_size,
        "arch": arch,
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "debian": "bookworm",
        "apt_source": mirror,
        "gguf": gguf == "yes",
        "packages": dict(p.split(" ", 1) for p in packages
                         if p and p.split(" ", 1)[0].startswith(wanted)),
        "python": {p["name"]: p["version"] for p in json.loads(site)},
        "llama_cpp_python": llama_cpp(root),
        "partitions": [{"label": "APPBOOT", "type": "vfat", "mount": "/boot/firmware"},
                       {"label": "appliance-root", "type": "ext4", "mount": "/"}],
    }
    json.dump(manifest, sys.stdout, indent=2)
    print()
    return 0


def llama_cpp(root: Path) -> dict[str, object] | None:
    """llama-cpp-python as installed: version, wheel tag, the machine its libraries are
    built for (readelf) and the CPU backend variants ggml picks from at run time."""
    site = "opt/appliance/lib/python3*/site-packages"
    infos = sorted(root.glob(f"{site}/llama_cpp_python-*.dist-info"))
    if not infos:
        return None
    wheel = (infos[-1] / "WHEEL").read_text()
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    lib = infos[-1].parent / "llama_cpp" / "lib"
    header = subprocess.run(["readelf", "-h", str(lib / "libllama.so")], capture_output=True,
                            text=True, check=True).stdout
    machine = next(line.split(":", 1)[1].strip() for line in header.splitlines()
                   if line.strip().startswith("Machine:"))
    return {
        "version": infos[-1].name.removeprefix("llama_cpp_python-").removesuffix(".dist-info"),
        "wheel_tags": tags,
        "machine": machine,
        "cpu_variants": sorted(p.name.removeprefix("libggml-cpu-").removesuffix(".so")
                               for p in lib.glob("libggml-cpu-*.so")),
    }


if __name__ == "__main__":
    sys.exit(main())
