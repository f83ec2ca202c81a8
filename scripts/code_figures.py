"""Size figures of the code: lines per module, the largest functions, and `Any` in function signatures.

    python scripts/code_figures.py [--top N] [--root DIR] [package ...]   (default: shared gateway worker cli client)

Reads the source with `ast` only (nothing is imported), so it runs on any checkout: compare two with --root
(e.g. a `git worktree add /tmp/before main`). A function's lines run from its `def` (decorators excluded) to its
last line.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGES = ("shared", "gateway", "worker", "cli", "client")


def _mentions_any(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    return any(
        (isinstance(node, ast.Name) and node.id == "Any")
        or (isinstance(node, ast.Attribute) and node.attr == "Any")
        or (isinstance(node, ast.Constant) and isinstance(node.value, str) and "Any" in node.value)
        for node in ast.walk(annotation)
    )


def _signature_has_any(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    a = function.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p is not None)]
    return _mentions_any(function.returns) or any(_mentions_any(p.annotation) for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--top", type=int, default=10, help="how many modules and functions to list")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = parser.parse_args()

    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    with_any = total_functions = 0
    for package in args.packages:
        for path in sorted((args.root / package).rglob("*.py")):
            name = str(path.relative_to(args.root))
            source = path.read_text()
            modules.append((len(source.splitlines()), name))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    total_functions += 1
                    with_any += _signature_has_any(node)
                    functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))  # type: ignore[operator]
    modules.sort(reverse=True)
    functions.sort(reverse=True)
    lines = sum(n for n, _ in modules)
    print(f"packages: {' '.join(args.packages)}")
    print(f"modules: {len(modules)}, lines: {lines}, mean lines per module: {lines / len(modules):.0f}")
    print(f"functions: {total_functions}, with Any in their signature: {with_any}")
    print(f"functions over 50 lines: {sum(1 for n, _ in functions if n > 50)}")
    print("largest modules (lines):")
    for n, name in modules[: args.top]:
        print(f"  {n:5d}  {name}")
    print("largest functions (lines):")
    for n, name in functions[: args.top]:
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
