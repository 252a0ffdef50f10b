"""``medeyes --version``: the package's version, without loading any sub-command's dependencies."""

from __future__ import annotations

import importlib.metadata

from typer.testing import CliRunner

from medeyes import __version__
from medeyes.cli.app import app


def test_version_prints_the_installed_version_and_exits():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"medeyes {__version__}\n"
    assert __version__ == importlib.metadata.version("medeyes")  # the constant and pyproject's version agree


def test_help_lists_version_and_the_commands_still_run():
    output = CliRunner().invoke(app, ["--help"]).output
    assert "--version" in output and "serve" in output
    assert CliRunner().invoke(app, ["serve", "--help"]).exit_code == 0
