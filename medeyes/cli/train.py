"""``medeyes train``: SFT warm start and dual-stream GRPO with the single-process trainer.

With no arguments it runs the embedded default (preset ``cpu-default``): the easy phantom benchmark, the tiny
Idefics3 model built locally, expert demonstrations generated on first use, SFT, then dual-stream GRPO, with
held-out accuracy reported against a format-perfect blind baseline. Everything is a field of
:class:`~medeyes.training.config.TrainConfig`: load a YAML file with ``--config``, override any field with
``--set grpo.steps=100`` (repeatable), or use the flags below for the common ones.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.table import Table

from medeyes.cli.common import Preset, console, friendly_errors, parse_key_values, safe


class Mode(str, Enum):
    """GRPO stage flavour."""

    dual = "dual"
    on_policy = "on_policy"


@friendly_errors
def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", exists=True, dir_okay=False, help="YAML file of TrainConfig fields."),
    ] = None,
    preset: Annotated[Preset, typer.Option(help="Starting configuration without --config.")] = Preset.cpu_default,
    model: Annotated[str | None, typer.Option(help="Model alias (tiny, small-idefics3), directory or HF id.")] = None,
    data: Annotated[str | None, typer.Option(help="Case source spec: phantom:easy, slake:/path, ...")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (bf16 mixed precision on CUDA).")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where metrics, checkpoints and the final model go.")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed.")] = None,
    sft_steps: Annotated[int | None, typer.Option(help="Steps of the SFT warm start.")] = None,
    grpo_steps: Annotated[int | None, typer.Option(help="Steps of the GRPO stage.")] = None,
    mode: Annotated[Mode | None, typer.Option(help="GRPO stage: dual-stream or on-policy only.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any field: --set objective.advantage_mode=on_baseline")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints in --run-dir and start over.")] = False,
    print_config: Annotated[bool, typer.Option(help="Print the resolved config as YAML and exit.")] = False,
    help_config: Annotated[
        bool, typer.Option(help="List every config field (for --set and --config) with its value and help; exit.")
    ] = False,
) -> None:
    """Train a policy: SFT warm start on expert trajectories, then (dual-stream) GRPO; resumes automatically."""
    from medeyes.training.config import PRESETS, TrainConfig, build_config

    overrides: dict[str, Any] = {}
    flags = {
        "model": model,
        "data": data,
        "device": device,
        "run_dir": str(run_dir) if run_dir else None,
        "seed": seed,
        "sft.steps": sft_steps,
        "grpo.steps": grpo_steps,
        "grpo.mode": mode.value if mode else None,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides.update(parse_key_values(set_, "--set", yaml_values=True, example="grpo.steps=100"))
    if config is not None:
        cfg = TrainConfig.from_yaml(config, overrides)
    else:
        cfg = build_config(PRESETS[preset.value](), overrides)
    if print_config:
        console.print(cfg.to_yaml(), highlight=False, markup=False)
        return
    if help_config:
        _print_fields(cfg)
        return

    from medeyes.training.trainer import train as run_training

    steps = " + ".join(f"{cfg.stage_steps(stage)} {stage}" for stage in cfg.stages)
    console.print(
        f"[bold]medeyes train[/]: {safe(cfg.model)} on {safe(cfg.data)} ({steps} steps, mode {cfg.grpo.mode}) -> "
        f"{safe(cfg.run_dir)}"
    )
    result = run_training(cfg, resume=not fresh)
    _report(cfg, result)


def _report(cfg: Any, result: Any) -> None:
    """The closing lines: wall time, held-out accuracy from first to last evaluation, where the outputs are."""
    first, last = result.first_eval, result.last_eval
    console.print(
        f"wall time: {result.seconds:.1f} s for {result.steps} steps"
        + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")
    )
    if first and last:
        console.print(
            f"held-out accuracy: start {first.get('eval/accuracy', 0):.3f} (step {int(first['step'])}) -> "
            f"end {last.get('eval/accuracy', 0):.3f} (step {int(last['step'])}); "
            f"blind majority-answer baseline {result.blind_accuracy:.3f}"
        )
        families = {k.removeprefix("eval/accuracy/"): v for k, v in last.items() if k.startswith("eval/accuracy/")}
        if families:
            listing = ", ".join(f"{family} {value:.3f}" for family, value in sorted(families.items()))
            console.print(f"held-out accuracy by question family: {safe(listing)}")
        ious = {k.removeprefix("eval/iou/"): v for k, v in last.items() if k.startswith("eval/iou/")}
        by_family = ", ".join(f"{family} {value:.3f}" for family, value in sorted(ious.items()))
        console.print(
            f"held-out IoU {last.get('eval/iou', 0):.3f}" + (f" ({safe(by_family)})" if ious else "") + ", "
            f"tool steps {last.get('eval/steps', 0):.2f}, "
            f"parse rate {last.get('eval/parse_rate', 0):.3f}"
        )
        if "eval/ground/hit" in last:
            console.print(
                f"held-out grounding (ground stage's tasks): hit {last['eval/ground/hit']:.3f}, "
                f"IoU {last['eval/ground/iou']:.3f}, reads a crop {last.get('eval/ground/what', 0):.3f}"
            )
    run = cfg.run_dir
    console.print(safe(f"metrics: {run / 'metrics.jsonl'}  tensorboard: {run / 'tb'}  model: {run / 'final'}"))


def config_rows(model: BaseModel, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted field, value, help)`` for every leaf field of a config, nested models expanded.

    >>> from medeyes.training.objective_config import ObjectiveConfig
    >>> config_rows(ObjectiveConfig())[0][:2]
    ('advantage_mode', '"on_baseline"')
    """
    rows = []
    for name, info in type(model).model_fields.items():
        if info.exclude:  # not a setting of this config (expert.agent.t_max comes from env.max_steps)
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            rows += config_rows(value, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", json.dumps(value, default=str), " ".join((info.description or "").split())))
    return rows


def _print_fields(cfg: BaseModel) -> None:
    table = Table("field (--set KEY=VALUE)", "value", "help", box=None, highlight=False)
    for key, value, text in config_rows(cfg):
        table.add_row(key, safe(value), safe(text))
    console.print(table)
