"""The package's modules import downwards only: no import cycle, even through a lazy import.

A cycle (a module importing, inside a function, one that imports it) works until someone
moves that import to the top; it also means two modules share one responsibility.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("spin_core", "tasks", "flows", "benchmarks")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # top-level and function-level alike
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    cycles = []

    def visit(name: str, path: list[str], done: set[str]) -> None:
        for dependency in sorted(graph[name]):
            if dependency in path:
                cycles.append(" -> ".join(path[path.index(dependency) :] + [dependency]))
            elif dependency not in done:
                done.add(dependency)
                visit(dependency, [*path, dependency], done)

    for name in sorted(graph):
        visit(name, [name], {name})
    assert not cycles, "\n".join(sorted(set(cycles)))
    assert "flows.pipeline" in graph and "spin_core.generation" in graph  # the walk saw the package
