"""Shared CLI plumbing: friendly errors, consoles, option types."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from medeyes_env.errors import MedEyesError

# emoji=False: ":warning:" in a question or answer stays text (data must never turn into markup or emoji)
console = Console(emoji=False)
error_console = Console(stderr=True, emoji=False)
F = TypeVar("F", bound=Callable[..., Any])


class Preset(str, Enum):
    """Named starting training configurations (``medeyes train``, ``medeyes openrlhf``): ``training.config.PRESETS``."""

    cpu_default = "cpu-default"
    tiny = "tiny"
    paper = "paper"


def safe(value: object) -> str:
    r"""``value`` as text that rich prints literally: data (questions, answers, paths) never becomes markup.

    An answer ``the [/] lesion`` would otherwise raise ``MarkupError``, and ``[link=...]`` or colour tags
    in a dataset would be rendered.

    >>> safe("the [/] lesion [link=http://x]click[/link]")
    'the \\[/] lesion \\[link=http://x]click\\[/link]'
    """
    return escape(str(value))


def friendly_errors(command: F) -> F:
    """Turn MedEyes errors into one red line on stderr and exit code 2, with no traceback or locals."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MedEyesError as exc:
            error_console.print(f"[bold red]error:[/] {safe(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
