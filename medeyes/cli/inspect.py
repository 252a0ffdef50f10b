"""``medeyes inspect``: look at trajectories in the terminal, or as a self-contained HTML report."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from medeyes.cli.common import console, friendly_errors, safe
from medeyes.trajectories import RECORDS_FILE, TrajectoryRecord, TrajectoryStore, read_records
from medeyes_env.errors import RecordError


class Outcome(str, Enum):
    """Which trajectories to show."""

    all = "all"
    correct = "correct"
    incorrect = "incorrect"


def load(path: Path) -> tuple[list[TrajectoryRecord], TrajectoryStore | None]:
    """Records of a run directory or a ``.jsonl`` file, and the store that holds their images (when there is one)."""
    if path.is_dir():
        store = TrajectoryStore(path, read_only=True)
        if not store.records_path.exists():
            raise RecordError(
                f"{path} holds no {RECORDS_FILE}; pass a run directory written by `medeyes rollout --out`"
            )
        return list(store.records()), store
    records = read_records(path)
    store = TrajectoryStore(path.parent, read_only=True) if (path.parent / "images").is_dir() else None
    return records, store


def _select(records: list[TrajectoryRecord], outcome: Outcome, trajectory: str | None) -> list[TrajectoryRecord]:
    if trajectory is not None:
        chosen = [r for r in records if r.trajectory_id == trajectory or r.case_id == trajectory]
        if not chosen:
            raise RecordError(f"no trajectory or case {trajectory!r} among the {len(records)} records")
        return chosen
    if outcome is Outcome.correct:
        return [r for r in records if r.correct]
    if outcome is Outcome.incorrect:
        return [r for r in records if not r.correct]
    return records


def _overview(records: list[TrajectoryRecord], title: str) -> Table:
    table = Table(title=safe(title))
    for column in ("trajectory", "family", "question", "gold", "answer", "ok", "steps", "reward"):
        table.add_column(column, overflow="fold", justify="right" if column in ("steps", "reward") else "left")
    for record in records:
        actions = " ".join(s.action.name[0] for s in record.steps if s.action is not None)
        table.add_row(
            safe(record.trajectory_id),
            safe(record.family or "-"),
            safe(record.question[:70] + ("..." if len(record.question) > 70 else "")),
            safe(record.gold_answer),
            safe(record.final_answer),
            "[green]yes[/]" if record.correct else "[red]no[/]",
            f"{record.tool_steps} ({actions})",
            f"{record.reward:.3f}",
        )
    return table


def _details(record: TrajectoryRecord) -> None:
    console.print(
        Panel(
            f"{safe(record.question)}\n"
            + (f"options: {safe(' / '.join(record.options))}\n" if record.options else "")
            + f"gold: [bold]{safe(record.gold_answer)}[/]   answer: [bold]{safe(record.final_answer)}[/]   "
            f"reward: {record.reward:.3f}   producer: {safe(record.producer.name)}"
            + (f" ({safe(record.producer.oracle)})" if record.producer.oracle else ""),
            title=safe(record.trajectory_id),
        )
    )
    table = Table(show_lines=True)
    for column in ("#", "reasoning", "action", "feedback", "rewards"):
        table.add_column(column, overflow="fold")
    for step in record.steps:
        action = step.action.model_dump(exclude_defaults=True) if step.action is not None else None
        rewards = " ".join(f"{k[:4]}={v:.2f}" for k, v in step.reward_components.items())
        table.add_row(
            str(step.index + 1),
            safe(step.reasoning or ""),
            safe(json.dumps(action)) if action else f"[red]{safe(step.error_kind)}[/]: {safe(step.error)}",
            safe(step.feedback),
            safe(rewards),
        )
    console.print(table)


@friendly_errors
def inspect(
    path: Annotated[Path, typer.Argument(exists=True, help="A run directory (from --out) or a trajectories .jsonl.")],
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    outcome: Annotated[Outcome, typer.Option(help="Show all, correct or incorrect trajectories.")] = Outcome.all,
    trajectory: Annotated[str | None, typer.Option("--id", help="Show one trajectory (or all of one case).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most trajectories to show / put in the report.")] = 20,
    steps: Annotated[bool, typer.Option(help="Print every step of the shown trajectories.")] = False,
) -> None:
    """Show trajectories: a table in the terminal, every step with --steps or --id, an HTML report with --html."""
    records, store = load(path)
    if not records:
        raise RecordError(f"{path} holds no trajectories yet")
    chosen = _select(records, outcome, trajectory)[:limit]
    correct = sum(1 for r in records if r.correct)
    console.print(_overview(chosen, f"{path}: {len(records)} trajectories, {correct} correct; showing {len(chosen)}"))
    if steps or trajectory is not None:
        for record in chosen:
            _details(record)
    if html is not None:
        from medeyes.report.html import write_report

        write_report(chosen, html, store, title=f"MedEyes trajectories: {path.name}")
        console.print(
            f"report written to {safe(html)}" + ("" if store else " (no images: the run directory is missing)")
        )
