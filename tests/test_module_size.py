"""No module of ``appliance`` is longer than 400 lines.

A module that grows past that has become more than one thing; splitting it by what each
part is for keeps every file one that can be read whole. The gRPC stubs are generated from
``grpc_service.proto`` and are not read, so they do not count.
"""

from __future__ import annotations

from pathlib import Path

import appliance

ROOT = Path(appliance.__file__).parent
LIMIT = 400


def _generated(path: Path) -> bool:
    return path.name.startswith("grpc_service_pb2")


def oversized(root: Path = ROOT, limit: int = LIMIT) -> dict[str, int]:
    """Every hand-written module under ``root`` longer than ``limit`` lines, with its count."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        if _generated(path):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            found[str(path.relative_to(root.parent))] = lines
    return found


def test_no_module_is_over_the_limit() -> None:
    found = oversized()
    assert not found, f"modules over {LIMIT} lines: " + ", ".join(
        f"{name} ({lines})" for name, lines in found.items()
    )


def test_the_check_sees_an_oversized_module(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "small.py").write_text("x = 1\n" * LIMIT)
    (package / "big.py").write_text("x = 1\n" * (LIMIT + 1))
    (package / "grpc_service_pb2.py").write_text("x = 1\n" * (LIMIT + 50))
    assert oversized(package) == {"pkg/big.py": LIMIT + 1}
