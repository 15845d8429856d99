"""The kernel layer's own structure (issue 20): no import cycle inside ncfast.backend, nothing
there imports the package root (the version lives in ncfast._version), and the state layout has
one home that production code imports."""

from __future__ import annotations

import ast
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[2] / "ncfast" / "backend"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def backend_graph() -> dict[str, set[str]]:
    modules = {f"ncfast.backend.{p.stem}": p for p in BACKEND.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph as a list of modules, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_cycle_inside_backend():
    graph = backend_graph()
    assert "ncfast.backend.state" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_search_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_backend_never_imports_the_package_root():
    for path in BACKEND.glob("*.py"):
        bad = {m for m in imports_of(path) if m == "ncfast" or m.startswith("ncfast.__")}
        bad |= {m for m in imports_of(path) if m.startswith("ncfast.") and m.count(".") == 1}
        bad -= {"ncfast.backend", "ncfast._version", "ncfast._C", "ncfast.errors"}  # leaves
        assert not bad, f"{path.name} imports {sorted(bad)} from the package root"
    # ncfast.errors stays a leaf (the error types and user_stacklevel, stdlib only).
    errors = BACKEND.parent / "errors.py"
    assert not [m for m in imports_of(errors) if m.startswith("ncfast")], "errors.py imports ncfast"


def test_state_layout_has_one_home():
    from ncfast.backend import reference, state

    assert reference.new_state is state.new_state
    assert reference.STATE_KEYS is state.STATE_KEYS
    for path in BACKEND.parent.rglob("*.py"):
        if path.parent == BACKEND:
            continue
        text = path.read_text(encoding="utf-8")
        for name in ("STATE_KEYS", "new_state", "INVALID_LABEL"):
            assert f"from ncfast.backend.reference import {name}" not in text, path
