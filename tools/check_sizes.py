#!/usr/bin/env python3
"""Size limits of devagent's source, for ``make sizes`` (stdlib only).

* every module under ``src/`` has at most ``MAX_MODULE_LINES`` lines;
* every function (sync or async, methods and nested functions included) in the packages of
  ``FUNCTION_PACKAGES`` has at most ``MAX_FUNCTION_LINES`` lines, counted from its ``def``
  (decorators excluded) to its last line: ``end_lineno - lineno + 1``.

Prints each offender with its line count and exits 1 if there is one. ``--root`` chooses
the tree to check (the repository by default; the tests point it at made-up files).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
#: Where the function limit applies, relative to the root.
FUNCTION_PACKAGES = ("src/devagent/daemon", "src/devagent/agent")


def module_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_functions(path: Path, limit: int) -> Iterator[tuple[str, int, int]]:
    """(qualified name, first line, line count) of each function over ``limit`` lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                assert child.end_lineno is not None
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    yield name, child.lineno, lines
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def offenders(
    root: Path,
    *,
    max_module: int = MAX_MODULE_LINES,
    max_function: int = MAX_FUNCTION_LINES,
    function_packages: Sequence[str] = FUNCTION_PACKAGES,
) -> list[str]:
    """One line per module or function over its limit, paths relative to ``root``."""
    found: list[str] = []
    for path in sorted((root / "src").rglob("*.py")):
        shown = path.relative_to(root).as_posix()
        lines = module_lines(path)
        if lines > max_module:
            found.append(f"{shown}: module of {lines} lines (limit {max_module})")
        if any(shown.startswith(package.rstrip("/") + "/") for package in function_packages):
            for name, first, count in long_functions(path, max_function):
                found.append(
                    f"{shown}:{first}: function {name} of {count} lines (limit {max_function})"
                )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    found = offenders(args.root)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} over the size limits", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
