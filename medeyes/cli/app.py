"""The ``medeyes`` command line: one Typer app, one sub-command module per noun."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="medeyes",
    help="MedEyes: scan, drill, answer. Environments, expert demonstrations, VLM policies and dual-stream GRPO.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold patient data
    add_completion=False,
)


def _mount() -> None:
    # Sub-command modules import their heavy dependencies (torch) inside the commands, so `--help` stays fast.
    from medeyes.cli import cases
    from medeyes.cli.model import model_app

    app.command("cases")(cases.cases)
    from medeyes.cli import train

    app.command("train")(train.train)
    app.add_typer(model_app, name="model")

    from medeyes.cli import inspect, rollout

    app.command("rollout")(rollout.rollout)
    app.command("inspect")(inspect.inspect)


_mount()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
