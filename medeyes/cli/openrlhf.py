"""``medeyes openrlhf``: export MedEyes for OpenRLHF and print (or run) the cluster launch command.

The training config is the same :class:`~medeyes.training.config.TrainConfig` as ``medeyes train`` (YAML with
``--config``, or ``--preset``; default ``paper``), with ``--set FIELD=VALUE`` overrides; cluster settings are
:class:`~medeyes.training.openrlhf.config.OpenRLHFConfig` fields (``--nodes``, ``--gpus-per-node``, or
``--launch-set FIELD=VALUE``). ``export`` writes the data directory; ``command`` prints the exact command line,
and with ``--run`` executes it (this needs CUDA, Ray, vLLM, DeepSpeed and OpenRLHF on the machine).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from medeyes.cli.common import Preset, console, error_console, friendly_errors, parse_key_values, safe

openrlhf_app = typer.Typer(
    name="openrlhf",
    help="Train on a GPU cluster with OpenRLHF (Ray + vLLM + DeepSpeed): export the data, print the launch command.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


class Launcher(str, Enum):
    """How the run is started."""

    local = "local"
    ray_job = "ray-job"


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", exists=True, dir_okay=False, help="YAML file of TrainConfig fields.")
]
PresetOpt = Annotated[Preset, typer.Option(help="Starting TrainConfig without --config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="TrainConfig override, e.g. grpo.steps=200.")]
LaunchSetOpt = Annotated[
    list[str] | None, typer.Option("--launch-set", help="OpenRLHFConfig override, e.g. vllm_tensor_parallel=2.")
]
ModelOpt = Annotated[str | None, typer.Option(help="Model: HF id, local directory or alias (tiny, ...).")]
DataOpt = Annotated[str | None, typer.Option(help="Case source spec: phantom:easy, slake:/path, ...")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run directory (checkpoints go to <run-dir>/openrlhf).")]
ExportDirOpt = Annotated[
    Path | None,
    typer.Option(help="Export directory, on a filesystem every node sees; default <run-dir>/openrlhf-data."),
]
NodesOpt = Annotated[int | None, typer.Option(help="Nodes.")]
GpusOpt = Annotated[int | None, typer.Option(help="GPUs per node.")]


def _build_config(
    config: Path | None,
    preset: Preset,
    set_: list[str] | None,
    launch_set: list[str] | None,
    model: str | None,
    data: str | None,
    run_dir: Path | None,
    export_dir: Path | None,
    nodes: int | None,
    gpus_per_node: int | None,
) -> Any:
    from medeyes.training.config import TrainConfig
    from medeyes.training.openrlhf.config import OpenRLHFConfig, openrlhf_preset
    from medeyes_env.errors import ConfigError

    overrides = {k: v for k, v in {"model": model, "data": data, "run_dir": run_dir}.items() if v is not None}
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    overrides.update(parse_key_values(set_, "--set", yaml_values=True, example="grpo.steps=200"))
    # a preset starts from what OpenRLHF does (grpo.old_logprobs=recompute); a config file is taken as written
    train = TrainConfig.from_yaml(config, overrides) if config else openrlhf_preset(preset.value, overrides)
    launch = parse_key_values(launch_set, "--launch-set", yaml_values=True, example="vllm_tensor_parallel=2")
    flags = {"export_dir": export_dir, "nodes": nodes, "gpus_per_node": gpus_per_node}
    launch.update({k: v for k, v in flags.items() if v is not None})
    try:
        return OpenRLHFConfig(train=train, **launch)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid OpenRLHF launch settings: {exc}") from None


@openrlhf_app.command("export")
@friendly_errors
def export(
    config: ConfigOpt = None,
    preset: PresetOpt = Preset.paper,
    set_: SetOpt = None,
    launch_set: LaunchSetOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    run_dir: RunDirOpt = None,
    export_dir: ExportDirOpt = None,
    nodes: NodesOpt = None,
    gpus_per_node: GpusOpt = None,
) -> None:
    """Write prompts (one label per case), eval prompts, expert trajectories, the agent file and its config."""
    from medeyes.training.openrlhf.export import export_openrlhf_data

    cfg = _build_config(config, preset, set_, launch_set, model, data, run_dir, export_dir, nodes, gpus_per_node)
    summary = export_openrlhf_data(cfg)
    console.print(f"[bold]medeyes openrlhf export[/] -> {safe(summary.directory)}", highlight=False)
    console.print(
        f"prompts: {summary.prompt_rows} rows over {summary.train_cases} training cases "
        f"({cfg.train.grpo.steps} steps x {cfg.train.grpo.prompts_per_step} prompts); eval: {summary.eval_rows}",
        highlight=False,
    )
    if cfg.dual:
        console.print(
            f"expert stream: {summary.expert_trajectories} trajectories for {summary.expert_cases} of "
            f"{summary.train_cases} cases (G_on {cfg.train.grpo.group_on} + G_off {cfg.train.grpo.group_off})",
            highlight=False,
        )
    console.print("files: " + safe(", ".join(summary.files)), highlight=False)
    console.print("next: medeyes openrlhf command (same options) prints the launch command", highlight=False)


@openrlhf_app.command("command")
@friendly_errors
def command(
    config: ConfigOpt = None,
    preset: PresetOpt = Preset.paper,
    set_: SetOpt = None,
    launch_set: LaunchSetOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    run_dir: RunDirOpt = None,
    export_dir: ExportDirOpt = None,
    nodes: NodesOpt = None,
    gpus_per_node: GpusOpt = None,
    launcher: Annotated[
        Launcher, typer.Option(help="local: on the head node; ray-job: ray job submit.")
    ] = Launcher.local,
    ray_address: Annotated[str | None, typer.Option(help="Ray dashboard address for ray-job.")] = None,
    run: Annotated[bool, typer.Option("--run", help="Execute the command (needs CUDA, Ray, vLLM, OpenRLHF).")] = False,
) -> None:
    """Print the exact OpenRLHF launch command for the exported data; --run executes it."""
    from medeyes.training.openrlhf.export import check_export
    from medeyes.training.openrlhf.launch import build_command, format_command, run_command
    from medeyes_env.errors import ConfigError

    cfg = _build_config(config, preset, set_, launch_set, model, data, run_dir, export_dir, nodes, gpus_per_node)
    problems = check_export(cfg)
    if problems and run:
        raise ConfigError("the export does not match: " + "; ".join(problems) + " (run `medeyes openrlhf export`)")
    for problem in problems:
        error_console.print(f"[yellow]warning:[/] {safe(problem)}", highlight=False)
    if cfg.train.stage_steps("sft") > 0:
        error_console.print(
            "[yellow]note:[/] the sft stage does not run on OpenRLHF; run it first with `medeyes train` "
            "(stages set to sft only) and pass its final model as --model",
            highlight=False,
        )
    cmd = build_command(cfg, launcher.value, ray_address)
    typer.echo(format_command(cmd))
    if run:
        raise typer.Exit(run_command(cmd))
