"""``--counterfactual ARMS`` of ``medeyes eval`` and ``medeyes rollout``: run the arms, print the table, write JSON.

The measurement is :func:`medeyes.evaluation.counterfactual.run_counterfactuals`; this module is its
terminal face, shared by both commands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from medeyes.cli.common import console, safe
from medeyes.evaluation.counterfactual import (
    BLANK_GREY,
    CounterfactualConfig,
    CounterfactualReport,
    parse_arms,
    run_counterfactuals,
)
from medeyes.evaluation.run import DEFAULT_PROCEDURAL_LIMIT, EvalConfig
from medeyes_env.sources import CaseSource, open_source

CounterfactualOption = Annotated[
    str | None,
    typer.Option(
        "--counterfactual",
        help="Image counterfactuals instead of the plain run: 'all' or a comma list of real, blank, shuffle, swap, "
        "drill_swap (real, the baseline, is always played). Prints accuracy and the share of answers that change "
        "per arm; with --out, stores each arm in OUT/counterfactual/ and writes OUT/counterfactual.json.",
    ),
]
JSON_FILE = "counterfactual.json"
IMAGES = {
    "real": "the case's",
    "blank": f"grey {BLANK_GREY}",
    "shuffle": "another case's",
    "swap": "classes swapped",
    "drill_swap": "drills swapped",
}
"""The table's short name of what each arm shows (the JSON's ``note`` says it in full)."""
TABLE_WIDTH = 132


def _pct(value: float | None, n: int | None = None) -> str:
    if value is None:
        return "-" if n is None else f"- (n={n})"
    return f"{100 * value:.1f}" + ("" if n is None else f" (n={n})")


def counterfactual_table(report: CounterfactualReport) -> Table:
    """One row per arm: accuracy, presence accuracy, answers changed against real, answers that follow a swap."""
    table = Table(
        title=safe(f"image counterfactuals: {report.agent} on {report.dataset}/{report.split}"), header_style="bold"
    )
    for name in ("arm", "image", "n", "acc %", "presence %", "changed %", "presence changed %",
                 "follows yes->no %", "follows no->yes %"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("arm", "image") else "right")
    for arm in report.arms:
        if not arm.available:
            table.add_row(arm.arm, "not renderable", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a")
            continue
        swaps = arm.arm in ("swap", "drill_swap")
        table.add_row(
            arm.arm, IMAGES[arm.arm], str(arm.episodes), _pct(arm.accuracy),
            _pct(arm.presence_accuracy, arm.presence_episodes), _pct(arm.changed), _pct(arm.changed_presence),
            _pct(arm.follows_yes_to_no, arm.reached_yes_to_no) if swaps else "",
            _pct(arm.follows_no_to_yes, arm.reached_no_to_yes) if swaps else "",
        )  # fmt: skip
    table.caption = (
        "changed: answers unlike the same episode's real answer. swap: the image with every lesion a mimic and "
        "every mimic a lesion, scored against its own gold; drill_swap: real overview and scans, drills cut from "
        "the swapped image, scored against the real gold. follows: presence episodes the swap turns over whose "
        f"looks reached the object ({report.reach_rule}) that answer as the swapped object says (n: such episodes)."
    )
    return table


class _Bars:
    """A progress bar per arm."""

    def __init__(self, progress: Progress, dataset: str) -> None:
        self.progress, self.dataset = progress, dataset
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, arm: str, done: int, total: int) -> None:
        if arm not in self.tasks:
            self.tasks[arm] = self.progress.add_task(safe(f"{self.dataset} {arm}"), total=total)
        self.progress.update(self.tasks[arm], completed=done, total=total)


def eval_counterfactual_config(config: EvalConfig) -> Callable[[CaseSource], CounterfactualConfig]:
    """``medeyes eval``'s episodes of a dataset as every arm plays them: its first cases, tools on, exact match."""

    def config_for(source: CaseSource) -> CounterfactualConfig:
        size = source.size(config.split)
        n = (config.limit or DEFAULT_PROCEDURAL_LIMIT) if size is None else min(size, config.limit or size)
        env = config.env.model_copy(update={"rewards": config.env.rewards.model_copy(update={"open_match": "exact"})})
        return CounterfactualConfig(split=config.split, n=max(n, 1), seed=config.seed, batch_size=config.parallel,
                                    store_images=config.store_images, env=env)  # fmt: skip

    return config_for


def run_counterfactual_command(
    agent: Any,
    sources: Sequence[tuple[str, CaseSource | str]],
    config_for: Callable[[CaseSource], CounterfactualConfig],
    arms: str,
    out: Path | None,
    label: str,
    quiet: bool,
    json_path: Path | None = None,
) -> list[CounterfactualReport]:
    """Run the arms on every ``(label, source)``, print a table each, write ``OUT/counterfactual.json``."""
    chosen = parse_arms(arms)
    reports = []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    wide = Console(emoji=False, width=max(console.width, TABLE_WIDTH))
    for dataset, spec in sources:
        source = open_source(spec) if isinstance(spec, str) else spec
        with Progress(*columns, console=console, disable=quiet, transient=True) as progress:
            listener = _Bars(progress, dataset)
            report = run_counterfactuals(agent, source, chosen, config_for(source), out, label, dataset, listener)
        reports.append(report)
        wide.print(counterfactual_table(report))
    played = sum(r.episodes_run for r in reports)
    back = sum(r.episodes_resumed for r in reports)
    seconds = sum(r.seconds for r in reports)
    resumed = f", {back} read back from the stores" if back else ""
    console.print(f"{played} episodes played in {seconds:.1f} s{resumed}")
    if out is None:
        console.print("[dim]not stored (pass --out DIR to keep each arm's episodes and the JSON)[/]")
    else:
        console.print(f"each arm's episodes stored in {safe(out / 'counterfactual')}")
    text = json.dumps([r.model_dump(mode="json") for r in reports], indent=2)
    for path in (out / JSON_FILE if out is not None else None, json_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            console.print(f"figures written to {safe(path)}")
    return reports
