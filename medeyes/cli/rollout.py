"""``medeyes rollout``: run an agent through MedEyesEnv, store trajectories, print a summary.

Agents come from a registry (:data:`AGENTS`) that other modules extend with :func:`register_agent`
(the policy registers ``policy``). A factory receives an :class:`AgentSpec` with the common options
and every ``--agent-opt key=value`` pair.

:func:`rollout` is longer than 60 lines only by its signature: 48 of them, one ``Annotated`` option with its help
per flag (Typer's idiom: the signature is the command's ``--help``). Its body reads top to bottom in 36: the agent,
the setting it plays (:func:`_setting`), then the counterfactual arms or the plain run (:func:`_play`: store, run,
summary table, report).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medeyes.agents.base import Agent
from medeyes.cli.common import console, friendly_errors, parse_key_values, safe, training_setting
from medeyes.cli.counterfactual import CounterfactualOption, run_counterfactual_command
from medeyes.evaluation.counterfactual import CounterfactualConfig
from medeyes.rollout import RolloutConfig, RolloutResult, producer_of, run_rollout
from medeyes.rollout_summary import RolloutSummary, summarize
from medeyes.trajectories import TrajectoryStore
from medeyes.trajectories.settings import EpisodeSettings, episode_settings
from medeyes_env.cases import SPLITS
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError
from medeyes_env.rewards import METRIC_COMPONENTS, REWARD_COMPONENTS
from medeyes_env.sources import CaseSource, open_source


class AgentSpec(BaseModel):
    """What ``--agent NAME`` factories receive."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registry name of the agent.")
    seed: int = Field(default=0, description="Run seed.")
    oracle: str = Field(default="annotation", description="Expert oracle: annotation, perfect, image or vlm.")
    mode: str = Field(default="full", description="Expert mode: full, scan_only, drill_only, greedy, random.")
    options: dict[str, str] = Field(default_factory=dict, description="Every --agent-opt key=value pair.")
    model: str = Field(default="tiny", description="Policy: model alias, local directory or remote id.")
    backend: str = Field(default="transformers", description="Policy: transformers, openai or vllm.")
    base_url: str | None = Field(default=None, description="Policy with the openai backend: the server's /v1 URL.")
    temperature: float = Field(default=1.0, ge=0.0, description="Policy: sampling temperature (0 = greedy).")
    max_new_tokens: int = Field(default=256, ge=1, description="Policy: token cap per turn.")


AgentFactory = Callable[[AgentSpec], Agent]
AGENTS: dict[str, AgentFactory] = {}


def register_agent(name: str, factory: AgentFactory) -> None:
    """Make ``medeyes rollout --agent NAME`` build its agent with ``factory(spec)``."""
    AGENTS[name] = factory


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _expert_factory(spec: AgentSpec) -> Agent:
    from medeyes.agents.expert.agent import make_expert
    from medeyes.agents.expert.config import ExpertConfig

    expert_fields = set(ExpertConfig.model_fields)
    expert_options = {k: _parse_value(v) for k, v in spec.options.items() if k in expert_fields}
    oracle_options = {
        k.removeprefix("oracle."): _parse_value(v) for k, v in spec.options.items() if k.startswith("oracle.")
    }
    unknown = set(spec.options) - expert_fields - {k for k in spec.options if k.startswith("oracle.")}
    if unknown:
        raise ConfigError(
            f"unknown --agent-opt for the expert: {', '.join(sorted(unknown))}; expert fields are "
            f"{', '.join(sorted(expert_fields))}, oracle fields go as oracle.NAME=VALUE"
        )
    from medeyes.agents.expert.oracles.factory import make_oracle

    expert = make_expert(spec.oracle, spec.mode, seed=spec.seed, **expert_options)
    if oracle_options:
        expert.oracle = make_oracle(spec.oracle, **oracle_options)
    return expert


def _random_factory(spec: AgentSpec) -> Agent:
    from medeyes.agents.random_agent import RandomAgent, RandomAgentConfig

    try:
        config = RandomAgentConfig(seed=spec.seed, **{k: _parse_value(v) for k, v in spec.options.items()})
    except ValueError as exc:
        raise ConfigError(f"invalid --agent-opt for the random agent: {exc}") from None
    return RandomAgent(config)


def _policy_factory(spec: AgentSpec) -> Agent:
    from medeyes.agents.backends.factory import make_backend
    from medeyes.agents.policy import PolicyAgent, SamplingConfig

    backend = make_backend(
        spec.backend,
        spec.model if (spec.backend != "openai" or spec.model != "tiny") else None,
        base_url=spec.base_url,
        **{k: _parse_value(v) for k, v in spec.options.items()},
    )
    sampling = SamplingConfig(temperature=spec.temperature, max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    return PolicyAgent(backend, sampling)


register_agent("expert", _expert_factory)
register_agent("random", _random_factory)
register_agent("policy", _policy_factory)


def build_agent(spec: AgentSpec) -> Agent:
    """The agent ``spec.name`` names, with a did-you-mean for unknown names."""
    if spec.name not in AGENTS:
        close = difflib.get_close_matches(spec.name, AGENTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown agent {spec.name!r}.{hint} Available: {', '.join(sorted(AGENTS))}")
    return AGENTS[spec.name](spec)


def summary_table(summary: RolloutSummary, title: str) -> Table:
    """The rich table ``medeyes rollout`` prints."""
    table = Table(title=safe(title), show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("episodes", f"{summary.episodes}" + (f" ({summary.errors} failed)" if summary.errors else ""))
    table.add_row("accuracy", f"{summary.accuracy:.3f}")
    for kind, accuracy in summary.accuracy_by_type.items():
        table.add_row(f"  accuracy / {safe(kind)}", f"{accuracy:.3f} (n={summary.episodes_by_type[kind]})")
    for family, accuracy in summary.accuracy_by_family.items():
        if family != "-":
            table.add_row(f"  accuracy / family {safe(family)}", f"{accuracy:.3f}")
    table.add_row("mean best IoU vs gold", f"{summary.mean_best_iou:.3f} (n={summary.iou_episodes})")
    if summary.mean_best_box_iou is not None:
        table.add_row("  vs gold boxes alone", f"{summary.mean_best_box_iou:.3f}")
    if summary.iou_episodes:
        table.add_row("  gold regions: shapes, boxes", f"{summary.shape_regions}, {summary.box_regions}")
    for family, iou in summary.mean_best_iou_by_family.items():
        if family != "-":
            n = summary.iou_episodes_by_family[family]
            table.add_row(f"  IoU / family {safe(family)}", f"{iou:.3f} (n={n})")
    table.add_row("mean tool steps", f"{summary.mean_steps:.2f}")
    if summary.first_drill_hit_share is not None:
        table.add_row(
            "  first drill reached gold", f"{summary.first_drill_hit_share:.3f} (n={summary.looking_episodes})"
        )
        for label, value in (("hit", summary.tool_steps_first_hit), ("missed", summary.tool_steps_first_miss)):
            if value is not None:
                table.add_row(f"  tool steps when it {label}", f"{value:.2f}")
        if summary.redrill_after_miss is not None:
            table.add_row("  drilled again after a miss", f"{summary.redrill_after_miss:.3f}")
    table.add_row("mean reward", f"{summary.mean_reward:.3f}")
    for name in (*REWARD_COMPONENTS, *METRIC_COMPONENTS):
        if name in summary.mean_components:
            table.add_row(f"  {name}", f"{summary.mean_components[name]:.3f}")
    table.add_row("turns that parsed", f"{summary.parse_rate:.3f}")
    table.add_row("episodes with scan / drill", f"{summary.scan_share:.2f} / {summary.drill_share:.2f}")
    if summary.path_diversity is not None:
        table.add_row("distinct paths per case", f"{summary.path_diversity:.2f}")
    if summary.trajectories_per_second is not None:
        table.add_row("trajectories / second", f"{summary.trajectories_per_second:.1f}")
    return table


@friendly_errors
def rollout(
    agent: Annotated[str, typer.Option(help="Agent: expert, random, or one registered by an extension.")] = "expert",
    data: Annotated[str, typer.Option(help="Data source spec: phantom, phantom:hard, samples, jsonl:/path...")] = (
        "phantom"
    ),
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    n: Annotated[int, typer.Option(min=1, help="Number of cases.")] = 16,
    start: Annotated[int, typer.Option(min=0, help="Index of the first case.")] = 0,
    samples: Annotated[
        int | None, typer.Option(min=1, help="Trajectories per case (default: the agent's, expert n_expert=6).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory to append trajectories to (resumes if it exists).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Live episodes per agent call.")] = 16,
    oracle: Annotated[str, typer.Option(help="Expert oracle: annotation, perfect, image or vlm.")] = "annotation",
    mode: Annotated[
        str, typer.Option(help="Expert mode: full, scan_only, drill_only, greedy (no CVS), random.")
    ] = "full",
    keep_only_correct: Annotated[
        bool | None,
        typer.Option(
            "--keep-only-correct/--keep-all", help="Store only correct episodes (default: the expert's setting)."
        ),
    ] = None,
    max_steps: Annotated[int, typer.Option(min=0, help="Tool turns allowed before the answer (T_max).")] = 4,
    agent_opt: Annotated[
        list[str] | None, typer.Option(help="Extra agent option KEY=VALUE (repeatable), e.g. xi=0.9.")
    ] = None,
    model: Annotated[str, typer.Option(help="Policy: model alias (tiny, ...), local directory or remote id.")] = "tiny",
    backend: Annotated[str, typer.Option(help="Policy: transformers, openai (vllm serve) or vllm.")] = "transformers",
    base_url: Annotated[
        str | None, typer.Option(help="Policy + openai: server URL, e.g. http://127.0.0.1:8000/v1")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="Policy: sampling temperature (0 = greedy).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Policy: generated tokens per turn at most.")] = 256,
    summary_json: Annotated[Path | None, typer.Option(help="Also write the summary as JSON here.")] = None,
    train_config: Annotated[
        Path | None,
        typer.Option(
            help="A training run's config.yaml (or its run directory): play the data, question families and "
            "environment settings it trained on (replaces --data and --max-steps)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    counterfactual: CounterfactualOption = None,
) -> None:
    """Run an agent on cases of a data source; store trajectories and print accuracy, IoU, steps and rewards."""
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    spec = AgentSpec(
        name=agent,
        seed=seed,
        oracle=oracle,
        mode=mode,
        options=parse_key_values(agent_opt, "--agent-opt"),
        model=model,
        backend=backend,
        base_url=base_url,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
    )
    built = build_agent(spec)
    if keep_only_correct is None:
        keep_only_correct = _agent_keeps_only_correct(built, out)
    source, env, source_spec = _setting(train_config, data, max_steps)
    label = agent if agent != "expert" else f"expert ({oracle}, {mode})"
    if counterfactual is not None:  # the same episodes under each image arm (docs/eval.md), not the plain run
        arms = CounterfactualConfig(split=split, start=start, n=n, samples_per_case=samples or 1, seed=seed,  # type: ignore[arg-type]
                                    batch_size=batch_size, env=env)  # fmt: skip
        run_counterfactual_command(built, [(source.name, source)], lambda _: arms, counterfactual, out, label, quiet)
        return
    rollout_config = RolloutConfig(
        split=split,  # type: ignore[arg-type]
        n=n,
        start=start,
        samples_per_case=samples,
        batch_size=batch_size,
        seed=seed,
        keep_only_correct=keep_only_correct,
        env=env,
    )
    _play(built, source, source_spec, rollout_config, out, agent, label, summary_json, quiet)


def _play(
    agent: Agent,
    source: CaseSource,
    source_spec: str,
    config: RolloutConfig,
    out: Path | None,
    agent_name: str,
    label: str,
    summary_json: Path | None,
    quiet: bool,
) -> None:
    """The plain run: open the store (with ``--out``), play the episodes, print the summary table and report."""
    where = f"{source.name}/{config.split}"
    # What an episode is besides the agent and the seed (the number of samples and the filter are not: they pick
    # which episodes are played and kept). A store of other settings is refused, naming the field.
    settings = episode_settings(source_spec, source, config.split, config.env) if out is not None else None
    store = _open_store(out, agent, settings)
    result = _run_with_progress(agent, source, config, store, f"{agent_name} on {where}", quiet)
    summary = summarize(result.records, result.seconds)
    console.print(summary_table(summary, f"{label} on {where}"))
    _report(result, summary, store, config.keep_only_correct, summary_json)


def _agent_keeps_only_correct(agent: Agent, out: Path | None) -> bool:
    """The agent's own ``keep_only_correct`` (the expert has one), and only when there is a store to keep them in."""
    config = getattr(agent, "config", None)
    return bool(getattr(config, "keep_only_correct", False)) and out is not None


def _setting(train_config: Path | None, data: str, max_steps: int) -> tuple[CaseSource, EnvConfig, str]:
    """What the episodes are played on, and its spec: a training run's setting, else ``--data`` and ``--max-steps``."""
    if train_config:
        return training_setting(train_config)
    return open_source(data), EnvConfig(max_steps=max_steps), data


def _open_store(out: Path | None, agent: Any, settings: EpisodeSettings | None) -> TrajectoryStore | None:
    """The run directory's store (None without ``--out``); says so when it cut off a torn last line."""
    if out is None:
        return None
    store = TrajectoryStore(out, producer=producer_of(agent), settings=settings)
    if store.torn_path is not None:
        console.print(
            f"[yellow]moved[/] a torn last line ({store.repaired} bytes) of {safe(store.records_path)} "
            f"to {safe(store.torn_path)}"
        )
    return store


def _run_with_progress(
    agent: Any, source: Any, config: RolloutConfig, store: TrajectoryStore | None, title: str, quiet: bool
) -> RolloutResult:
    """:func:`run_rollout` under a progress bar (none with ``quiet``)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=True,
    ) as progress:
        task = progress.add_task(safe(title), total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return run_rollout(agent, source, config, store=store, progress=advance)


def _report(
    result: RolloutResult,
    summary: RolloutSummary,
    store: TrajectoryStore | None,
    keep_only_correct: bool,
    summary_json: Path | None,
) -> None:
    """What was stored or skipped, and the summary JSON when asked for."""
    if store is not None:
        console.print(
            f"stored {result.stored} trajectories in {safe(store.root)}"
            + (f" (kept only correct ones: {summary.kept}/{summary.episodes})" if keep_only_correct else "")
            + (f"; skipped {result.skipped} already there" if result.skipped else "")
        )
    elif result.skipped == 0:
        console.print("[dim]not stored; pass --out DIR to keep the trajectories[/]")
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(summary.model_dump_json(indent=2))
        console.print(f"summary written to {safe(summary_json)}")
