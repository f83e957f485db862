"""The import graph of ``src/devagent``, read with ``ast``: no cycles, and the layers import
only downwards (the CLI and the lab never import the daemon; the vocabulary imports only the
errors).

Every ``import`` and ``from … import`` counts, at module level or inside a function. An edge
goes to the module named (``from devagent.lab import procs`` is an edge to
``devagent.lab.procs``; ``from devagent.lab import Lab`` to the package ``devagent.lab``);
the parent packages an import runs on the way are not counted.

Imports under ``if TYPE_CHECKING:`` never run, so they cannot make an import-time cycle: the
**runtime graph** leaves them out and must have no cycle at all. They still couple modules,
so the **typing graph** (runtime + ``TYPE_CHECKING`` imports) is checked as well: the layer
rules apply to it, and its cycles must be the known ones only.

The allow-lists below name what exists today outside this change's scope (others are
rewriting those packages). The test fails when an entry no longer exists, too: strike it
out then, so the lists can only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "devagent"

#: Cycles of the typing graph (each as the set of modules in it), none in the runtime graph.
KNOWN_TYPING_CYCLES: set[frozenset[str]] = set()

#: Edges that break a layer rule, tolerated until their owners move the module.
KNOWN_EDGES: set[tuple[str, str]] = set()


# --- the graph --------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, typing_only: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement under ``node``, with whether it sits under TYPE_CHECKING."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, typing_only
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for stmt in child.body:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), True)
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), typing_only)
        else:
            yield from _imports(child, typing_only)


def _targets(name: str, path: Path, stmt: ast.stmt) -> set[str]:
    known = modules()
    found: set[str] = set()
    if isinstance(stmt, ast.Import):
        for alias in stmt.names:
            if alias.name in known:
                found.add(alias.name)
    elif isinstance(stmt, ast.ImportFrom):
        base = stmt.module or ""
        if stmt.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - stmt.level + 1]
            base = ".".join([*package, base] if base else package)
        for alias in stmt.names:
            sub = f"{base}.{alias.name}"
            if sub in known:
                found.add(sub)
            elif base in known:
                found.add(base)
    return found


@cache
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(runtime graph, typing graph): module → the devagent modules it imports."""
    runtime: dict[str, set[str]] = {}
    typing: dict[str, set[str]] = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        runtime[name], typing[name] = set(), set()
        for stmt, typing_only in _imports(tree):
            targets = _targets(name, path, stmt) - {name}
            typing[name] |= targets
            if not typing_only:
                runtime[name] |= targets
    return runtime, typing


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The cycles of ``graph``, each as its strongly connected set of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.add(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(frozenset(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def chain(graph: dict[str, set[str]], members: frozenset[str]) -> str:
    """One cycle through ``members`` as ``a -> b -> … -> a`` (a shortest one from the first
    module by name)."""
    start = min(members)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return " -> ".join([*paths[node], start])
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"no cycle through {sorted(members)}")


def edges_into(graph: dict[str, set[str]], source: str, target: str) -> set[tuple[str, str]]:
    """Edges from modules under ``source`` to modules under ``target`` (dotted prefixes)."""

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return {(a, b) for a, bs in graph.items() if under(a, source) for b in bs if under(b, target)}


# --- the rules ----------------------------------------------------------------------------


def test_the_graph_sees_imports_inside_functions_and_under_type_checking() -> None:
    runtime, typing = graphs()
    assert "devagent.lab.lab" in runtime["devagent.cli.common"]  # imported inside a function
    assert "devagent.lab.lab" in typing["devagent.cli.demo_common"]  # TYPE_CHECKING …
    assert "devagent.errors" in runtime["devagent.vocab"]


def test_no_import_cycle_at_runtime() -> None:
    runtime, _ = graphs()
    cycles = [chain(runtime, members) for members in strongly_connected(runtime)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_typing_cycles_are_the_known_ones_only() -> None:
    _, typing = graphs()
    found = set(strongly_connected(typing))
    new = [chain(typing, members) for members in found - KNOWN_TYPING_CYCLES]
    gone = [sorted(members) for members in KNOWN_TYPING_CYCLES - found]
    assert not new, "new import cycles (with TYPE_CHECKING imports):\n" + "\n".join(new)
    assert not gone, f"known cycles no longer there, strike them from KNOWN_TYPING_CYCLES: {gone}"


def _forbidden() -> set[tuple[str, str]]:
    _, typing = graphs()
    return edges_into(typing, "devagent.cli", "devagent.daemon") | edges_into(
        typing, "devagent.lab", "devagent.daemon"
    )


def test_the_cli_and_the_lab_import_no_daemon_module() -> None:
    new = sorted(_forbidden() - KNOWN_EDGES)
    assert not new, "forbidden imports:\n" + "\n".join(f"{a} -> {b}" for a, b in new)


def test_the_known_forbidden_edges_still_exist() -> None:
    gone = sorted(KNOWN_EDGES - _forbidden())
    assert not gone, f"edges no longer there, strike them from KNOWN_EDGES: {gone}"


def test_the_vocabulary_imports_only_the_errors() -> None:
    _, typing = graphs()
    assert typing["devagent.vocab"] == {"devagent.errors"}


def test_cycles_are_reported_as_chains() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    (members,) = strongly_connected(graph)
    assert members == {"a", "b", "c"}
    assert chain(graph, members) == "a -> b -> c -> a"
