"""The package's modules import downwards only: no import cycle, even through a lazy import,
and spin_core's layers (spin_core/__init__.py) imported only from above, but for a list of
exceptions that may only shrink.

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


# spin_core's imports against its layers today: each one a step that runs a report or builds
# the embedded default, or a model directory's tokenizer facts kept with generation and
# prompts. Fix one and delete its line; a new one is refused.
UPWARD_ALLOWED = {
    ("spin_core.storage.models", "spin_core.generation.decoding"),  # stop_token_ids
    ("spin_core.storage.models", "spin_core.prompts"),  # ensure_pad_token
    ("spin_core.steps", "spin_core.reports"),  # `from spin_core.reports import report, tracking`
    ("spin_core.steps", "spin_core.reports.report"),  # the write-report step
    ("spin_core.steps", "spin_core.toy"),  # the build-embedded-default step
    ("spin_core.steps", "spin_core.reports.tracking"),  # the track-experiment step
}


def test_spin_core_imports_its_layers_from_above_only():
    import spin_core

    modules = _modules()
    rank = {name: i for i, names in enumerate(spin_core.LAYERS.values()) for name in names}
    ours = {name for name in modules if name.startswith("spin_core.")}
    unplaced = sorted({name.split(".")[1] for name in ours} - set(rank))
    assert not unplaced, f"add these to spin_core.LAYERS: {unplaced}"

    def layer(name: str) -> int:
        return rank[name.split(".")[1]]

    upward = {
        (name, dependency)
        for name in ours
        for dependency in _imports(modules[name], modules)
        if dependency.startswith("spin_core.") and layer(dependency) > layer(name)
    }
    assert not upward - UPWARD_ALLOWED, (
        f"imports against the layers: {sorted(upward - UPWARD_ALLOWED)}"
    )
    assert not UPWARD_ALLOWED - upward, (
        f"fixed, delete from UPWARD_ALLOWED: {sorted(UPWARD_ALLOWED - upward)}"
    )
