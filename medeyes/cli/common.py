"""Shared CLI plumbing: friendly errors, consoles, option types, ``KEY=VALUE`` options, a run's setting."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from medeyes_env.errors import ConfigError, MedEyesError

if TYPE_CHECKING:
    from medeyes_env.env import EnvConfig
    from medeyes_env.sources import CaseSource

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


def parse_key_values(
    items: list[str] | None, flag: str, *, yaml_values: bool = False, example: str = ""
) -> dict[str, Any]:
    """Repeated ``FLAG KEY=VALUE`` options as a dict (a later key wins); a malformed item is a :class:`ConfigError`.

    Keys are stripped. Values are stripped text, or with ``yaml_values`` parsed as YAML the way a config file's
    values are (``grpo.steps=100`` gives the int 100; an empty value is ``""``). ``example`` goes into the error,
    e.g. ``grpo.steps=100``.

    >>> parse_key_values(["xi=0.9", " mode = full "], "--agent-opt")
    {'xi': '0.9', 'mode': 'full'}
    >>> parse_key_values(["grpo.steps=100", "note="], "--set", yaml_values=True)
    {'grpo.steps': 100, 'note': ''}
    >>> parse_key_values(["grpo.steps"], "--set", example="grpo.steps=100")
    Traceback (most recent call last):
    ...
    medeyes_env.errors.ConfigError: --set expects KEY=VALUE (e.g. grpo.steps=100), got 'grpo.steps'
    """
    from medeyes.safe_yaml import parse_yaml

    hint = f" (e.g. {example})" if example else ""
    pairs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects KEY=VALUE{hint}, got {item!r}")
        key = key.strip()
        if not yaml_values:
            pairs[key] = value.strip()
        else:  # the raw value: a YAML error's column counts from the value's first character
            pairs[key] = parse_yaml(value, f"{flag} {key}") if value.strip() else ""
    return pairs


def training_setting(path: Path) -> tuple[CaseSource, EnvConfig, str]:
    """The case source (with its data options), environment settings and data spec of a training run's config.

    ``path`` is a run directory (its ``config.yaml``) or the config file itself; ``--train-config`` of
    ``medeyes rollout`` and ``medeyes eval`` replays what the run trained on. The spec is the config's ``data``,
    followed by its ``data_options`` as JSON when it has any.
    """
    from medeyes.training.config import TrainConfig
    from medeyes_env.sources import open_cases

    config_file = path / "config.yaml" if path.is_dir() else path
    config = TrainConfig.from_yaml(config_file)
    given = config.data_options.model_dump(mode="json")
    options = f" {json.dumps(given, sort_keys=True, default=str)}" if given else ""
    return open_cases(config.data, config.data_options.model_dump()), config.env, config.data + options
