"""Report the project's size bar: package files over 500 lines, functions over 60 lines, the longest five.

Usage: ``python scripts/code_size.py [PATH ...]`` (default ``medeyes medeyes_env``, from the repository root).

A file's length is its physical line count; a function's is ``end_lineno - lineno + 1`` of its ``def`` (docstring
included, decorators not). Nested functions are counted on their own as well as inside their parent. This is a
report, not a gate: an exception that reads better whole says why in its docstring (see ``--why``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

FILE_LIMIT = 500
FUNCTION_LIMIT = 60


def functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length)`` of every function and method in ``tree``."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                out.append((name, child.lineno, (child.end_lineno or child.lineno) - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the report; always exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["medeyes", "medeyes_env"])
    parser.add_argument("--top", type=int, default=5, help="how many of the longest functions to list")
    args = parser.parse_args(argv)
    files: list[tuple[Path, int]] = []
    funcs: list[tuple[int, str]] = []
    for root in args.paths:
        for path in sorted(Path(root).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            files.append((path, len(text.splitlines())))
            for name, line, length in functions(ast.parse(text, filename=str(path))):
                funcs.append((length, f"{path}:{line} {name}"))
    big_files = sorted((f for f in files if f[1] > FILE_LIMIT), key=lambda f: -f[1])
    long_funcs = sorted((f for f in funcs if f[0] > FUNCTION_LIMIT), reverse=True)
    print(f"files over {FILE_LIMIT} lines: {len(big_files)}")
    for path, n in big_files:
        print(f"  {n:5d}  {path}")
    print(f"functions over {FUNCTION_LIMIT} lines: {len(long_funcs)}")
    for n, where in long_funcs:
        print(f"  {n:5d}  {where}")
    print(f"longest {args.top} functions:")
    for n, where in sorted(funcs, reverse=True)[: args.top]:
        print(f"  {n:5d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
