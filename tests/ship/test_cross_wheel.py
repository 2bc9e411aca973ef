"""The arm64 llama-cpp-python wheel cross-compiled on this amd64 host (lib/cross-wheel).

Checks the wheel's name and tags, that every shared object in it is AArch64 (readelf),
and runs llama.cpp from it under qemu-aarch64 (user mode, Debian's arm64 cross libraries
as the system root): a small C program (llama_generate.c, cross-compiled here) loads the
model ``../shared/models/stories260K.gguf`` and generates greedily. Emulating a Pi 4's
Cortex-A72 must load the ARMv8.0 CPU variant, a Pi 5's Cortex-A76 the ARMv8.2 one with
dotprod and fp16.

Builds the wheel when the cache (/var/cache/appliance-ci/wheels/arm64, shared with the
image test) has none: ~15 minutes of compiling on 2 cores. Runs with
``APPLIANCE_TEST_IMAGE=1`` (.ci/run sets it), like the image test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.image,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        os.environ.get("APPLIANCE_TEST_IMAGE") != "1",
        reason="cross build: set APPLIANCE_TEST_IMAGE=1 (.ci/run does)",
    ),
]

CACHE = Path(os.environ.get("APPLIANCE_TEST_IMAGE_CACHE", "/var/cache/appliance-ci"))
VERSION = re.search(r"llama-cpp-python==([0-9.]+)", (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
SYSROOT = Path("/usr/aarch64-linux-gnu")
MODEL = ROOT.parent / "shared" / "models" / "stories260K.gguf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = CACHE / "wheels" / "arm64"
    result = subprocess.run(
        [str(ROOT / "firmware_images/lib/cross-wheel"), VERSION, str(wheels), str(CACHE / "src")],
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*-py3-none-linux_aarch64.whl"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(out)
    return out


def test_wheel_is_tagged_for_aarch64_linux(wheel: Path, unpacked: Path) -> None:
    info = unpacked / f"llama_cpp_python-{VERSION}.dist-info"
    tags = [
        line.split(":", 1)[1].strip()
        for line in (info / "WHEEL").read_text().splitlines()
        if line.startswith("Tag:")
    ]
    assert tags == ["py3-none-linux_aarch64"]
    assert (unpacked / "llama_cpp" / "llama_cpp.py").is_file()  # the ctypes bindings


def test_every_shared_object_is_aarch64(unpacked: Path) -> None:
    libs = sorted(p for p in unpacked.rglob("*.so*") if p.is_file())
    names = {p.name for p in libs}
    assert {
        "libllama.so",
        "libggml.so",
        "libggml-base.so",
        "libggml-cpu-armv8.0_1.so",
        "libggml-cpu-armv8.2_2.so",
    } <= names, names
    for lib in libs:
        header = subprocess.run(
            ["readelf", "-h", str(lib)], capture_output=True, text=True, check=True
        ).stdout
        assert re.search(r"Machine:\s+AArch64", header), (lib, header)
        assert re.search(r"Class:\s+ELF64", header), lib


@pytest.fixture(scope="module")
def generate(unpacked: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama_generate.c cross-compiled against the wheel's libllama.so."""
    work = tmp_path_factory.mktemp("generate")
    with tarfile.open(CACHE / "src" / f"llama_cpp_python-{VERSION}.tar.gz") as sdist:
        headers = [
            m
            for m in sdist.getmembers()
            if re.search(r"vendor/llama\.cpp/(include|ggml/include)/[^/]+\.h$", m.name)
        ]
        sdist.extractall(work, members=headers, filter="data")
    vendor = work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    lib = unpacked / "llama_cpp" / "lib"
    program = work / "llama_generate"
    subprocess.run(
        [
            "aarch64-linux-gnu-gcc",
            "-O1",
            "-o",
            str(program),
            str(ROOT / "tests/ship/llama_generate.c"),
            f"-I{vendor / 'include'}",
            f"-I{vendor / 'ggml' / 'include'}",
            f"-L{lib}",
            "-lllama",
            f"-Wl,-rpath,{lib}",
        ],
        check=True,
    )
    return program


@pytest.mark.parametrize(
    ("cpu", "variant"), [("cortex-a72", "armv8.0_1"), ("cortex-a76", "armv8.2_2")]
)
def test_generates_under_qemu_aarch64_with_the_variant_for_the_cpu(
    generate: Path, unpacked: Path, cpu: str, variant: str
) -> None:
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    assert qemu, "qemu-user-static is not installed (scripts/setup image)"
    lib = unpacked / "llama_cpp" / "lib"
    # ggml looks for its CPU variants in the image's site-packages and in the current
    # directory: here the wheel's lib directory.
    result = subprocess.run(
        [
            qemu,
            "-cpu",
            cpu,
            "-L",
            str(SYSROOT),
            str(generate),
            str(MODEL),
            "Once upon a time",
            "24",
        ],
        cwd=lib,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"variant: libggml-cpu-{variant}.so" in result.stdout, result.stdout
    generated = int(re.search(r"generated: (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    text = re.search(r"text: (.*)\ngenerated", result.stdout, re.S).group(1)  # type: ignore[union-attr]
    assert generated > 0 and text.strip(), result.stdout
