"""The modules of ``appliance`` import one another without a cycle.

Every import statement counts, those inside functions and ``TYPE_CHECKING`` blocks too: a
cycle hidden behind a lazy import is still two modules that cannot be understood, tested
or replaced one without the other.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

import appliance

ROOT = Path(appliance.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the ``appliance`` modules it imports (a name imported from a package
    that is one of its submodules counts as that submodule)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_appliance_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "appliance.core.service" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found(tmp_path: Path) -> None:
    package = tmp_path / "appliance"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from appliance.core import b\n")
    (package / "core" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"
    )
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and {"appliance.core.a", "appliance.core.b"} <= set(cycle)


@pytest.mark.parametrize("source", ["import appliance.core.b\n", "from . import b\n"])
def test_every_import_form_is_an_edge(tmp_path: Path, source: str) -> None:
    package = tmp_path / "appliance"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text(source)
    (package / "core" / "b.py").write_text("")
    assert "appliance.core.b" in import_graph(package)["appliance.core.a"]
