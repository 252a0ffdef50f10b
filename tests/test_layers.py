"""The layers hold: medeyes_env loads without torch, no module cycle, no import from a lower layer to a higher one.

The import graph is read from the source (every ``import`` statement, module level or inside a function),
so a lazy import that would close a cycle at run time is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medeyes_env", "medeyes")

# Lower number = lower layer. A module may import its own layer and the ones below it.
LAYERS = (
    ("medeyes_env", 0),
    ("medeyes.safe_yaml", 1),
    ("medeyes.models", 1),
    ("medeyes.trajectories", 1),
    ("medeyes.agents", 2),
    ("medeyes.rollout", 3),
    ("medeyes.rollout_summary", 3),
    ("medeyes.evaluation", 4),
    ("medeyes.training", 4),
    ("medeyes.report", 4),
    ("medeyes.cli", 5),
    ("medeyes", 5),
)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `from pkg.mod import name` -> pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert _cycles(_import_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    graph = _import_graph()
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if target != "medeyes" and _layer(target) > _layer(module)
    )
    assert upward == []


# Inside medeyes.agents: the interface, then the policy agent, then who generates its turns, then the expert
# (whose VLM oracle asks a server through a backend). A backend never reaches into the expert.
AGENT_LAYERS = (
    ("medeyes.agents.base", 0),
    ("medeyes.agents.policy", 1),
    ("medeyes.agents.random_agent", 1),
    ("medeyes.agents.backends", 2),
    ("medeyes.agents.expert", 3),
    ("medeyes.agents", 4),  # the package map
)


def test_agents_import_downward_only() -> None:
    def layer(module: str) -> int:
        return next(n for prefix, n in AGENT_LAYERS if module == prefix or module.startswith(prefix + "."))

    graph = _import_graph()
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("medeyes.agents.")
        for target in targets
        if target.startswith("medeyes.agents.") and layer(target) > layer(module)
    )
    assert upward == []


@pytest.mark.parametrize(
    "statement",
    [
        "import medeyes_env",
        "import medeyes.models.chat",
        # `medeyes rollout --train-config` reads a training config and opens its data
        "import medeyes.training.config; from medeyes_env.sources import open_cases",
    ],
)
def test_torch_free_imports(statement: str) -> None:
    code = f"import sys; {statement}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
