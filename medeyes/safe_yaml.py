"""YAML for configs written by others: no aliases, no duplicate keys, bounded size and depth, named errors.

``yaml.safe_load`` never runs code, but it still expands aliases: 515 bytes of nested ``&a [*a, *a, ...]``
become 10^9 list items once something walks them (``TrainConfig.to_yaml``, which ``train()`` calls first).
Configs here are small hand-written mappings, so :func:`load_yaml` refuses what they never need:

- aliases (``*name``): write the value out (anchors alone are harmless and allowed);
- a key given twice in one mapping (YAML keeps the last one silently);
- nesting deeper than :data:`MAX_DEPTH` and files over :data:`MAX_BYTES`;
- integers of 2^64 or more (``seed: 999...`` with 5000 digits was a ``ValueError`` traceback from ``int()``);
- bytes that are not UTF-8.

Every refusal is a :class:`~medeyes_env.errors.ConfigError` naming ``FILE:LINE:COLUMN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from medeyes_env.errors import ConfigError

MAX_BYTES = 1024 * 1024
"""Largest YAML file read (a training config is about 3 kB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists accepted (TrainConfig nests 4 levels)."""
MAX_INT = 2**64
"""Integers at or above this (in magnitude) are refused: no config value needs more, a seed included."""


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses aliases, duplicate keys and deep nesting (see the module docstring)."""

    def __init__(self, stream: Any) -> None:
        """Start at depth 0."""
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102  (PyYAML's hook)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ComposerError(
                None,
                None,
                f"alias *{event.anchor} is refused in configs (aliases can expand exponentially); write the value out",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: D102  (PyYAML's hook)
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in first:
                    raise ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first given on line {first[key].line + 1})",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_bounded_int(self, node: Any) -> int:
        """PyYAML's int (decimal, ``0x``, ``0b``, ``0o``, ``1:30``), refused at :data:`MAX_INT` or beyond."""
        try:
            value = self.construct_yaml_int(node)
        except ValueError:  # int() of more than sys.get_int_max_str_digits() digits
            value = None
        if value is None or abs(value) >= MAX_INT:
            text = str(node.value)
            shown = f"{text[:10]}... ({len(text)} characters)" if len(text) > 20 else text
            raise ConstructorError(
                None, None, f"integer {shown} is too large for a config value (the limit is 2^64)", node.start_mark
            )
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_bounded_int)


def parse_yaml(text: str, where: str) -> Any:
    r"""Parse ``text`` with :class:`StrictLoader`; errors become :class:`ConfigError` naming ``where:LINE:COL``.

    >>> parse_yaml("a: 1\nb: [x, y]", "inline")
    {'a': 1, 'b': ['x', 'y']}
    >>> parse_yaml("a: 1\na: 2", "inline")
    Traceback (most recent call last):
    ...
    medeyes_env.errors.ConfigError: inline:2:1: duplicate key 'a' (first given on line 1)
    """
    try:
        return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        raise ConfigError(f"{place}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def load_yaml(path: str | Path) -> Any:
    """Read and parse a YAML file with :func:`parse_yaml`; size and encoding errors are :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes, above the {MAX_BYTES:,}-byte limit of a config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})") from None
    return parse_yaml(text, str(path))
