"""The code the docs show must run: the README's environment example and the env tour."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_environment_example_runs_and_pays_the_grammar_reward(capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'grammar': 1.0" in printed


def test_env_tour_example_prints_each_turn():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "env_tour.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("<feedback>") == 4
    assert "could not be executed" in result.stdout


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest\n" in readme
    assert "\n.venv/bin/python -m pytest\n" in ci
    assert "bash scripts/setup.sh" in readme and "bash scripts/setup.sh" in ci


def test_every_marker_the_default_run_leaves_out_has_a_ci_stage():
    """CI runs every test: each marker the README's command deselects (pyproject's addopts) is selected by a stage."""
    import tomllib

    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    left_out = set(re.findall(r"\bnot (\w+)", addopts))
    ci = (ROOT / ".ci" / "run").read_text()
    selected = set(re.findall(r"-m [\"']?(\w+)", ci))  # a stage's `pytest -m MARKER ...`
    assert {"slow", "vllm", "openrlhf"} <= left_out
    assert sorted(left_out - selected) == []


def test_layout_map_names_every_package():
    """docs/layout.md is the map of the packages; a new package without a line there fails here."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "layout.md").read_text(encoding="utf-8")
    packages = sorted(
        ".".join(init.parent.relative_to(root).parts)
        for top in ("medeyes", "medeyes_env", "medeyes_verifiers")
        for init in (root / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    )
    assert "medeyes.agents.expert.oracles" in packages  # the walk found the nested packages
    missing = [name for name in packages if f"`{name}`" not in text]
    assert not missing, f"docs/layout.md does not name: {', '.join(missing)}"


def test_training_code_map_names_every_module():
    """docs/training.md's module table names every module of medeyes/training and its subpackages, and no other."""
    training = ROOT / "medeyes" / "training"
    rows = [line for line in (ROOT / "docs" / "training.md").read_text().splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in row.split("|")[1].replace("`", "").replace(",", " ").split()}
    modules = {path.relative_to(training).as_posix() for path in training.rglob("*.py") if path.name != "__init__.py"}
    assert {"trainer.py", "stages/grpo.py", "openrlhf/loss.py"} <= modules  # the walk reaches the subpackages
    assert sorted(modules - named) == [], "modules docs/training.md's code map does not name"
    assert sorted(named - modules) == [], "names in docs/training.md's code map that are no module"
