"""No import cycles between shrinkml's modules, read from the source with ``ast`` (nothing imported).

An edge A -> B means that executing module A imports shrinkml module B. Importing ``shrinkml.a.b``
imports the package ``shrinkml.a`` first, so the edge goes to both. A module's own parent packages
are not edges of its own: Python has imported them before the module runs (a package ``__init__``
that imports its submodules is the usual layout, not a cycle); an explicit import of one
(``from shrinkml.a import x`` inside ``shrinkml.a.b``) is an edge like any other.

The first test counts the imports that run when a module is imported (module scope, not inside
functions, not under ``if TYPE_CHECKING:``). The second adds the deferred ones (inside functions)
for the loading layers, ``shrinkml.data`` and ``shrinkml.models``: they are imported by almost
everything, so they must not reach back into what is built on them (techniques, measurement).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import shrinkml

ROOT = Path(shrinkml.__file__).parent
# the layers that must not sit on an import cycle even through deferred imports
FOUNDATIONS = ("shrinkml.data", "shrinkml.models")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module under shrinkml/: dotted name -> (file, is a package)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], *, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when ``body`` runs (and, with ``deferred``, those inside its
    functions and classes); never those under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _imports(node.body, deferred=deferred)
            yield from _imports(node.orelse, deferred=deferred)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _imports(block, deferred=deferred)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from _imports(node.body, deferred=deferred)
        elif isinstance(node, ast.ClassDef):  # a class body runs at import
            yield from _imports(node.body, deferred=deferred)
        elif deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _imports(node.body, deferred=deferred)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]  # what relative imports start from
        explicit: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body, deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from shrinkml.a import b` imports shrinkml.a, and shrinkml.a.b when that is a module
                targets = [source, *(f"{source}.{alias.name}" for alias in node.names)]
            explicit.update(t for t in targets if t in modules)
        own = set(_ancestors(name))
        implied = {a for t in explicit for a in _ancestors(t) if a in modules and a not in own}
        graph[name] = (explicit | implied) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import cycle from ``start`` back to it, or None (breadth-first search)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        reached = []
        for node in frontier:
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycle = [node]
                    while cycle[-1] != start:
                        cycle.append(came_from[cycle[-1]])
                    return [start, *reversed(cycle[:-1]), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    reached.append(nxt)
        frontier = reached
    return None


def test_module_imports_have_no_cycle():
    graph = import_graph()
    assert "shrinkml.techniques.base" in graph["shrinkml.techniques"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_and_models_are_on_no_cycle_even_through_deferred_imports():
    graph = import_graph(deferred=True)
    assert "shrinkml.models.hf" in graph["shrinkml.models.load"]  # deferred imports are seen
    for module in sorted(m for m in graph if any(m == f or m.startswith(f + ".") for f in FOUNDATIONS)):
        cycle = cycle_through(graph, module)
        assert cycle is None, "import cycle (deferred imports included): " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle():
    graph = {"shrinkml.a": {"shrinkml.b"}, "shrinkml.b": {"shrinkml.c"}, "shrinkml.c": {"shrinkml.a"}}
    assert find_cycle(graph) == ["shrinkml.a", "shrinkml.b", "shrinkml.c", "shrinkml.a"]
    assert find_cycle({"shrinkml.a": {"shrinkml.b"}, "shrinkml.b": set()}) is None
    assert cycle_through(graph, "shrinkml.b") == ["shrinkml.b", "shrinkml.c", "shrinkml.a", "shrinkml.b"]
    assert cycle_through({**graph, "shrinkml.d": {"shrinkml.a"}}, "shrinkml.d") is None
