"""Shared CLI plumbing: friendly errors, consoles, option types."""

from __future__ import annotations

import functools
import re
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


CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""What a terminal acts on instead of showing: C0 (newline and tab excepted), DEL, C1, and the bidi overrides
and isolates that make text read in another order."""


def _visible(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: object) -> str:
    r"""``value`` as text the terminal shows literally: data (questions, answers, ids, paths) never acts on it.

    Two things would otherwise act: rich markup (``the [/] lesion`` raised ``MarkupError``, ``[link=...]`` was
    rendered) and terminal control sequences, which rich passes through: ESC and C1 start clipboard writes
    (OSC 52), hidden links (OSC 8), window titles and screen clearing; CR, backspace and bidi overrides make
    text read differently. Control characters are shown as escapes (``\x1b``, ``\u202e``); newline and tab
    keep their meaning. Every data string the CLI prints goes through here.

    >>> safe("the [/] lesion [link=http://x]click[/link]")
    'the \\[/] lesion \\[link=http://x]click\\[/link]'
    >>> print(safe("yes\x1b]52;c;cm0=\x07\rno\x9b2J"))
    yes\x1b]52;c;cm0=\x07\x0dno\x9b2J
    """
    return escape(CONTROL.sub(_visible, str(value)))


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
