"""Build the C++ ``llama-server`` from the llama.cpp that the pinned llama-cpp-python vendors.

The benchmark compares the appliance with llama.cpp's own server on the same engine version,
so the server is compiled from the ``vendor/llama.cpp`` folder of the llama-cpp-python sdist
pinned in ``pyproject.toml``. The sdist comes from PyPI through pip; the binary goes into a
fixed cache folder, and a second call finds it there::

    python -m benchmarks.llama_server          # build (several minutes on two cores)
    python -m benchmarks.llama_server --print  # print the path, build only if missing
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("APPLIANCE_BENCH_CACHE", "/var/cache/appliance-bench"))


def server_path(version: str = VERSION) -> Path:
    return CACHE / f"llama-server-{version}" / "llama-server"


def build(version: str = VERSION, jobs: int | None = None) -> Path:
    """Download the sdist, configure llama.cpp with cmake, build only ``llama-server``."""
    target = server_path(version)
    if target.exists():
        return target
    out = target.parent
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"llama-cpp-python=={version}",
                "-d",
                str(work),
            ],
            check=True,
        )
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build_dir = work / "build"
        subprocess.run(
            [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(build_dir),
                "-G",
                "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DGGML_NATIVE=ON",
            ],
            check=True,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build_dir),
                "--target",
                "llama-server",
                "-j",
                str(jobs or os.cpu_count() or 1),
            ],
            check=True,
        )
        built = next(build_dir.rglob("llama-server"))
        shutil.copy2(built, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--print", action="store_true", help="print the binary's path")
    args = parser.parse_args()
    path = build(args.version, args.jobs)
    print(path)


if __name__ == "__main__":
    main()
