"""The schema modules import one another without a cycle (counting type-only imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import sentinel.schemas

PACKAGE = "sentinel.schemas"
ROOT = Path(sentinel.schemas.__file__).parent


def _module(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path) -> set[str]:
    """The sentinel.schemas modules `path` imports anywhere, `if TYPE_CHECKING:` included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from . import x` and `from .x import y` resolve against the package
            base = ".".join(filter(None, [PACKAGE if node.level else "", node.module or ""]))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.glob("*.py")}
    return {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_among_schema_modules() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.chat" in graph[f"{PACKAGE}.task"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_sees_a_type_only_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
