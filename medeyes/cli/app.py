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


def _print_version(value: bool) -> None:
    if value:
        from medeyes import __version__

        typer.echo(f"medeyes {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print medeyes' version and exit."
    ),
) -> None:
    # Typer needs a callback to take options before the sub-command; the app's help is the Typer's own.
    pass


def _mount() -> None:
    # Sub-command modules import their heavy dependencies (torch) inside the commands, so `--help` stays fast.
    from medeyes.cli import cases, inspect, rollout, train
    from medeyes.cli.eval import eval_command
    from medeyes.cli.model import model_app
    from medeyes.cli.openrlhf import openrlhf_app
    from medeyes.cli.serve import serve

    app.command("train")(train.train)
    app.command("rollout")(rollout.rollout)
    app.command("inspect")(inspect.inspect)
    app.command("cases")(cases.cases)
    app.command("eval")(eval_command)
    app.command("serve")(serve)
    app.add_typer(model_app, name="model")
    app.add_typer(openrlhf_app, name="openrlhf")


_mount()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
