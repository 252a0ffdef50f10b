"""Report the house's seams: re-export modules and names, cross-module private imports, files per folder.

Usage: ``python scripts/house_report.py [--root DIR] [--verbose]`` (default: this checkout).

- A *re-exported name* is one a package module binds by ``from X import Y`` (not by ``def``, ``class`` or
  assignment) and that another module imports from it, or that it lists in ``__all__``. A package ``__init__``
  that is a public facade (``FACADES``) is counted apart: those re-exports are the API.
- A *re-export module* is one whose top level holds nothing but imports, ``__all__`` and a docstring, and that
  re-exports at least one name.
- A *cross-module private import* is ``from M import _name`` where ``M`` is another module of the project, found
  anywhere in the project's Python files (packages, tests, experiments, benchmarks, scripts).
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter, defaultdict
from pathlib import Path

PACKAGES = ("medeyes", "medeyes_env", "medeyes_verifiers")
OTHER_TREES = ("tests", "experiments", "benchmarks", "scripts", "examples")
FACADES = {"medeyes_env", "medeyes_env.protocol", "medeyes.trajectories", "medeyes_verifiers"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: Path) -> dict[str, object]:
    trees: dict[str, tuple[Path, ast.Module]] = {}
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    files += [p for tree in OTHER_TREES if (root / tree).is_dir() for p in (root / tree).rglob("*.py")]
    files += [p for p in root.glob("*.py")]
    for path in files:
        if "__pycache__" in path.parts:
            continue
        trees[module_name(root, path)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    package_modules = {m for m in trees if m.split(".")[0] in PACKAGES}

    imported_binds: dict[str, set[str]] = defaultdict(set)  # module -> names bound by from-import at top level
    defined: dict[str, set[str]] = defaultdict(set)
    exported: dict[str, set[str]] = defaultdict(set)  # __all__
    only_imports: dict[str, bool] = {}
    for module, (_path, tree) in trees.items():
        plain = True
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                imported_binds[module].update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                pass
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined[module].add(node.name)
                plain = False
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if names == {"__all__"} and isinstance(node.value, ast.List | ast.Tuple):
                    exported[module].update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
                else:
                    defined[module].update(names)
                    plain = False
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                pass  # docstring
            elif isinstance(node, ast.If | ast.Try):
                plain = False
            else:
                plain = False
        only_imports[module] = plain

    used_through: dict[str, set[str]] = defaultdict(set)  # module -> names others import from it
    private: list[tuple[str, str, str]] = []
    for module, (path, tree) in trees.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = resolve(module, node, is_package)
            if source not in trees or source == module:
                continue
            for alias in node.names:
                used_through[source].add(alias.name)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append((str(path.relative_to(root)), source, alias.name))

    reexports: dict[str, set[str]] = {}
    for module in package_modules:
        if module in FACADES:
            continue
        names = (used_through[module] | exported[module]) & imported_binds[module] - defined[module]
        if names:
            reexports[module] = names
    shim_modules = sorted(m for m, names in reexports.items() if only_imports[m] and not m.endswith("__init__"))
    folders = Counter(str(path.parent.relative_to(root)) for m, (path, _) in trees.items() if m in package_modules)
    return {
        "reexports": reexports,
        "shim_modules": shim_modules,
        "private": private,
        "folders": folders,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    found = scan(args.root.resolve())
    reexports: dict[str, set[str]] = found["reexports"]  # type: ignore[assignment]
    private: list[tuple[str, str, str]] = found["private"]  # type: ignore[assignment]
    folders: Counter[str] = found["folders"]  # type: ignore[assignment]
    print("| measure | count |")
    print("|---|---|")
    print(f"| modules that re-export (facades {len(FACADES)} excluded) | {len(reexports)} |")
    print(f"| re-exported names | {sum(len(v) for v in reexports.values())} |")
    print(f"| modules that only re-export | {len(found['shim_modules'])} |")  # type: ignore[arg-type]
    print(f"| cross-module private imports | {len(private)} |")
    print(f"| files with one | {len({p for p, _, _ in private})} |")
    print()
    print("| folder | package files |")
    print("|---|---|")
    for folder, count in sorted(folders.items()):
        print(f"| {folder} | {count} |")
    if args.verbose:
        print("\nre-exports:")
        for module, names in sorted(reexports.items()):
            print(f"  {module}: {', '.join(sorted(names))}")
        print("\nprivate imports:")
        for path, source, name in private:
            print(f"  {path}: {source}.{name}")


if __name__ == "__main__":
    main()
