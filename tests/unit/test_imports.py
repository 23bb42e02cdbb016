"""No import cycles between the modules of ``ptsparse``.

The sources are parsed with :mod:`ast`, never imported. Every import that can run counts, function-local ones
included (a deferred import hides a cycle, it does not break it); imports under ``if TYPE_CHECKING:`` never run
and are left out. ``from X import name`` is an edge to ``X.name`` when that is a module of the tree, else to
``X``; a package is its ``__init__``. No implicit edges from a module to its parent packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping, Set
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "ptsparse"


def module_name(path: Path, root: Path = SRC) -> str:
    """``root/ptsparse/a/b.py`` -> ``ptsparse.a.b``; ``root/ptsparse/a/__init__.py`` -> ``ptsparse.a``."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, skipping the bodies of ``if TYPE_CHECKING:`` (not their ``else``)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _runtime_import_nodes(child)


def _known(name: str, modules: Set[str]) -> str | None:
    """``name`` or its longest prefix that is a module of the tree; None for outside modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, source: str, modules: Set[str], is_package: bool = False) -> set[str]:
    """The modules of the tree that ``module`` (whose text is ``source``) imports at run time."""
    found: set[str] = set()
    for node in _runtime_import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        found.update(name for name in (_known(target, modules) for target in targets) if name is not None)
    return found


def import_graph(root: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports, for every ``.py`` file of ``root/package``."""
    paths = sorted((root / package).rglob("*.py"))
    modules = {module_name(path, root) for path in paths}
    return {module_name(path, root): imports_of(module_name(path, root), path.read_text(), modules,
                                                path.name == "__init__.py")
            for path in paths}


def cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module, and modules
    importing themselves; each sorted, largest first (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found, key=lambda component: (-len(component), component))


def describe(graph: Mapping[str, Set[str]], found: list[list[str]]) -> str:
    """Each cycle's modules, sorted, with the imports that stay inside the cycle (the edges to break)."""
    lines = [f"{len(found)} import cycle(s) in {PACKAGE}:"]
    for number, component in enumerate(found, 1):
        lines.append(f"cycle {number} ({len(component)} modules): {', '.join(component)}")
        members = set(component)
        lines += [f"    {module} -> {', '.join(sorted(graph[module] & members))}" for module in component]
    return "\n".join(lines)


def test_cycle_finder_on_hand_made_graphs():
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}) == [
        ["a", "b", "c"], ["d", "e"]]


def test_imports_are_resolved_from_source():
    modules = {"p", "p.a", "p.b", "p.sub", "p.sub.c", "p.sub.d"}
    source = """
from __future__ import annotations
import os
from typing import TYPE_CHECKING
from . import d, helper
from .. import a
from ..b import thing
import p.sub.c.attribute
if TYPE_CHECKING:
    from p import b
else:
    from p.sub import d
def later():
    from p.sub import c
"""
    assert imports_of("p.sub.c", source, modules) == {"p.sub.d", "p.sub", "p.a", "p.b", "p.sub.c"}
    assert imports_of("p.sub", "from . import c\nfrom .d import x\nfrom .. import b", modules, is_package=True) == {
        "p.sub.c", "p.sub.d", "p.b"}
    assert imports_of("p.a", "if TYPE_CHECKING:\n    from .b import B\n", modules) == set()
    assert module_name(SRC / PACKAGE / "allocation" / "__init__.py") == "ptsparse.allocation"
    assert module_name(SRC / PACKAGE / "allocation" / "erk.py") == "ptsparse.allocation.erk"


def test_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 10 and f"{PACKAGE}.config" in graph
    found = cycles(graph)
    assert not found, describe(graph, found)
