"""``medeyes eval``: score an agent on benchmark datasets, in the paper's layout, with bootstrap 95% CIs.

The figures come from :mod:`medeyes.evaluation`; agents are built by the rollout command's registry, so
every backend ``medeyes rollout`` knows (transformers, an OpenAI-compatible server, in-process vLLM) works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from medeyes.cli.common import console, friendly_errors, parse_key_values, safe, training_setting
from medeyes.cli.counterfactual import CounterfactualOption, eval_counterfactual_config, run_counterfactual_command
from medeyes.cli.rollout import AgentSpec, build_agent
from medeyes.evaluation.run import Dataset, EvalConfig, EvalReport, evaluate
from medeyes.evaluation.scores import PAPER_MODEL, DatasetScores, Interval
from medeyes.trajectories import TrajectoryRecord
from medeyes_env.cases import SPLITS
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError
from medeyes_env.sources import open_source

TABLE_WIDTH = 118
"""Columns the table is printed in at least (wider terminals get their width)."""


def _pct(interval: Interval | None) -> str:
    if interval is None:
        return "-"
    low, high = interval.ci95
    return f"{100 * interval.value:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def _grounding(scores: DatasetScores) -> tuple[str, str]:
    if scores.mean_best_iou is None:
        return "-", "-"
    low, high = scores.mean_best_iou_ci95 or (0.0, 0.0)
    return f"{scores.mean_best_iou:.3f} ({low:.2f}-{high:.2f})", f"{scores.hit_rate or 0.0:.3f}"


def _type_rows(scores: DatasetScores) -> list[tuple[str, int, Interval | None]]:
    rows: list[tuple[str, int, Interval | None]] = []
    for kind in scores.by_type:
        if kind.answer_type == "open":
            rows += [("open recall", kind.n, kind.recall), ("open exact", kind.n, kind.accuracy)]
        else:
            rows.append(
                (safe({"choice": "multi-choice"}.get(kind.answer_type, kind.answer_type)), kind.n, kind.accuracy)
            )
    return rows


def report_table(report: EvalReport) -> Table:
    """The table ``medeyes eval`` prints, one section per dataset.

    A row per answer type (open: recall and exact match), then the dataset's overall accuracy with its
    grounding, tool steps and the paper's figure.
    """
    both = len({scores.tools for scores in report.datasets}) > 1
    tools = "" if both else (" (tools on)" if report.datasets and report.datasets[0].tools else " (answer-only)")
    table = Table(title=safe(f"{report.agent} on {report.split}{tools}"), header_style="bold")
    for name in ("dataset", "answers", "n", "% (95% CI)", "best IoU (95% CI)", "hit rate", "tool steps", "paper %"):
        table.add_column(name, justify="left" if name in ("dataset", "answers") else "right")
    for scores in report.datasets:
        name = safe(scores.dataset) + ((" tools" if scores.tools else " no tools") if both else "")
        for label, n, interval in _type_rows(scores):
            table.add_row(name, label, str(n), _pct(interval), "", "", "", "")
        iou, hit = _grounding(scores)
        paper = scores.paper.get(PAPER_MODEL)
        failed = f" ({scores.errors} failed)" if scores.errors else ""
        overall = _pct(Interval(value=scores.accuracy, ci95=scores.ci95))
        table.add_row(
            f"[bold]{name}[/]", "[bold]all[/]", f"{scores.n}{failed}", f"[bold]{overall}[/]",
            iou, hit, f"{scores.mean_tool_steps:.2f}", f"{paper:.1f}" if paper is not None else "-", end_section=True,
        )  # fmt: skip
    table.caption = "\n".join(
        [f"paper %: {PAPER_MODEL}, METHOD.md section 6; open rows: recall and exact match"]
        + [_regions_line(scores) for scores in report.datasets if scores.grounded]
    )
    return table


def _regions_line(scores: DatasetScores) -> str:
    """How the dataset's gold regions were scored: how many as shapes, how many as boxes (and box-only IoU)."""
    line = f"{safe(scores.dataset)}: gold regions scored as {scores.shape_regions} shapes, {scores.box_regions} boxes"
    if scores.mean_best_box_iou is not None:
        line += (
            f"; against their boxes alone: best IoU {scores.mean_best_box_iou:.3f}, hit rate {scores.box_hit_rate:.3f}"
        )
    return line


def _training_run(path: Path) -> tuple[Dataset, EnvConfig, Path | None]:
    """A training run's cases (with its data options), environment settings and final model (``RUN/final``)."""
    config_file = path / "config.yaml" if path.is_dir() else path
    if not config_file.is_file():
        raise ConfigError(
            f"--train-config: no training config at {config_file}; pass a run directory or its config.yaml"
        )
    source, env, spec = training_setting(config_file)
    final = config_file.parent / "final"
    return Dataset(source.name, spec, source), env, final if final.is_dir() else None


def _sources(data: list[str], fallback: Dataset | None) -> list[Dataset]:
    """Open every ``--data`` spec (none: the training run's cases, else phantom); labelled by source name."""
    opened = [(spec, open_source(spec)) for spec in data]
    if not opened:
        return [fallback or Dataset("phantom", "phantom", open_source("phantom"))]
    names = [source.name for _, source in opened]
    # Two specs of one source (phantom:easy, phantom:hard) are told apart by their spec.
    return [Dataset(source.name if names.count(source.name) == 1 else spec, spec, source) for spec, source in opened]


class _Bar:
    """A progress bar per dataset whose description carries the running accuracy."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.correct: dict[str, float] = {}
        self.seen: dict[str, int] = {}

    def __call__(self, label: str, record: TrajectoryRecord | None, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(safe(label), total=total)
            self.correct[label], self.seen[label] = 0.0, 0
        if record is not None:
            self.correct[label] += record.reward_components.get("accuracy", 0.0)
            self.seen[label] += 1
        running = self.correct[label] / self.seen[label] if self.seen[label] else 0.0
        description = f"{safe(label)}  acc {running:.3f}"
        self.progress.update(self.tasks[label], completed=done, total=total, description=description)


@friendly_errors
def eval_command(
    agent: Annotated[str, typer.Option(help="policy, expert or random.")] = "expert",
    data: Annotated[
        list[str] | None,
        typer.Option(help="Dataset spec (repeatable): phantom, slake:/path, vqa_rad_hf:/path, mmmu:/path, ..."),
    ] = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="First N cases of each dataset (default: all).")] = None,
    tools: Annotated[str, typer.Option(help="on, off (answer-only: no scan or drill) or both.")] = "on",
    model: Annotated[str | None, typer.Option(help="Policy: model alias, local directory or served name.")] = None,
    train_config: Annotated[
        Path | None,
        typer.Option(help="Policy: a training run (directory or config.yaml): its final model, env and data."),
    ] = None,
    backend: Annotated[str, typer.Option(help="Policy: transformers, openai (vllm serve) or vllm.")] = "transformers",
    base_url: Annotated[str | None, typer.Option(help="Policy + openai: the server's /v1 URL.")] = None,
    parallel: Annotated[int, typer.Option(min=1, help="Episodes in flight at once (concurrent server requests).")] = 16,
    temperature: Annotated[float, typer.Option(min=0.0, help="Policy: sampling temperature (0 = greedy).")] = 0.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Policy: generated tokens per turn at most.")] = 256,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Tool turns allowed (default 4, or the run's).")] = None,
    oracle: Annotated[str, typer.Option(help="Expert: annotation, perfect, image or vlm.")] = "annotation",
    agent_opt: Annotated[list[str] | None, typer.Option(help="Extra agent option KEY=VALUE (repeatable).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Trajectory store directory: an interrupted run resumes from it.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON here.")] = None,
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    counterfactual: CounterfactualOption = None,
) -> None:
    """Score an agent on benchmark datasets: accuracy per answer type with 95% CIs, grounding, tool steps."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if tools not in ("on", "off", "both"):
        raise ConfigError(f"--tools must be on, off or both, got {tools!r}")
    fallback: Dataset | None = None
    env = EnvConfig()
    if train_config is not None:
        fallback, env, final = _training_run(train_config)
        model = model or (str(final) if final is not None else None)
    if max_steps is not None:
        env = env.model_copy(update={"max_steps": max_steps})
    options = parse_key_values(agent_opt, "--agent-opt")
    if backend == "openai" and agent == "policy":
        options.setdefault("max_concurrency", str(parallel))
    spec = AgentSpec(
        name=agent, seed=seed, oracle=oracle, options=options, model=model or "tiny", backend=backend,
        base_url=base_url, temperature=temperature, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    built = build_agent(spec)
    config = EvalConfig(split=split, limit=limit, tools=tools, parallel=parallel, seed=seed, env=env)  # type: ignore[arg-type]
    sources = _sources(data or [], fallback)
    label = f"policy ({spec.model})" if agent == "policy" else agent
    if counterfactual is not None:  # every arm plays the tools-on episodes; docs/eval.md "Does the answer follow..."
        pairs = [(dataset.label, dataset.source) for dataset in sources]
        run_counterfactual_command(built, pairs, eval_counterfactual_config(config), counterfactual, out, label, quiet,
                                   json_path)  # fmt: skip
        return
    report = _run(built, sources, config, out, label, quiet)
    _show(report, out, json_path)


def _run(agent: Any, sources: list[Dataset], config: EvalConfig, out: Path | None, label: str,
         quiet: bool) -> EvalReport:  # fmt: skip
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet, transient=True) as progress:
        return evaluate(agent, sources, config, out, label, listener=_Bar(progress))


def _show(report: EvalReport, out: Path | None, json_path: Path | None) -> None:
    """Print the table and what was played and stored; write the figures as JSON when asked for."""
    # A table this wide wraps into noise at 80 columns; rich cannot print wider than its console.
    Console(emoji=False, width=max(console.width, TABLE_WIDTH)).print(report_table(report))
    console.print(_footer(report, out))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.model_dump_json(indent=2))
        console.print(f"figures written to {safe(json_path)}")


def _footer(report: EvalReport, out: Path | None) -> str:
    where = f"stored in {safe(out)}" if out is not None else "not stored (pass --out DIR to resume later)"
    resumed = f", {report.episodes_resumed} read back from the store" if report.episodes_resumed else ""
    return f"{report.episodes_run} episodes played in {report.seconds:.1f} s{resumed}; {where}"
