"""The Python layer's modules form a layered graph: no module imports one that imports it
back. Every import counts — at module level, inside functions, under ``TYPE_CHECKING``,
and ``importlib.import_module("gmem.…")`` with a literal name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gmem

PACKAGE = Path(gmem.__file__).resolve().parent


def _module_names(package: Path) -> set[str]:
    names = {"gmem"}
    for path in package.glob("*.py"):
        if path.stem != "__init__":
            names.add(f"gmem.{path.stem}")
    # the compiled core: its stub always, its shared object where it was built
    names.update(f"gmem.{path.stem}" for path in package.glob("*.pyi"))
    names.update(f"gmem.{path.name.split('.')[0]}" for path in package.glob("_gmem*.so"))
    return names


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The modules of the package that ``tree`` imports, wherever the import sits."""
    out: set[str] = set()

    def add(name: str) -> None:
        if name in modules:
            out.add(name)
        elif name.startswith("gmem."):
            out.add(name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in modules else "gmem")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "gmem" if node.level == 1 else ""
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "gmem":
                for alias in node.names:
                    sub = f"gmem.{alias.name}"
                    add(sub if sub in modules else "gmem")
            else:
                add(target)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (itself left out)."""
    modules = _module_names(package)
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        name = "gmem" if path.stem == "__init__" else f"gmem.{path.stem}"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = _imports(tree, modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path whose first and last node are the same, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert {"gmem", "gmem.cli", "gmem.sweep", "gmem.policies"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("source", "edges"),
    [
        ("import gmem.policies\n", {"gmem.policies"}),
        ("from gmem import policies, Op\n", {"gmem.policies", "gmem"}),
        ("from gmem.runner import Runner\n", {"gmem.runner"}),
        ("from . import reports\n", {"gmem.reports"}),
        ("def f():\n    from gmem.cli import main\n", {"gmem.cli"}),
        ("if TYPE_CHECKING:\n    from gmem.runner import RunResult\n", {"gmem.runner"}),
        ("importlib.import_module('gmem.sweep')\n", {"gmem.sweep"}),
        ("import numpy as np\n", set()),
    ],
)
def test_every_kind_of_import_is_an_edge(source, edges):
    modules = _module_names(PACKAGE)
    assert _imports(ast.parse(source), modules) == edges


def test_find_cycle_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
