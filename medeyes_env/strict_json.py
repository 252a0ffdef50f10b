"""JSON and text from files written by others: every way they can be broken is one :class:`BadInput` with a reason.

``json.loads`` alone raises four unrelated exceptions on hostile input (``JSONDecodeError``,
``RecursionError`` for ``[[[[...``, ``UnicodeDecodeError`` upstream, ``OverflowError`` later, when a
500-digit integer meets ``float()``), and silently keeps the last of two equal keys. The helpers here
turn each into :class:`BadInput`, which callers re-raise as their own named error with ``FILE:LINE``:

>>> loads('{"a": 1, "a": 2}')
Traceback (most recent call last):
...
medeyes_env.strict_json.BadInput: duplicate key 'a' in one object
>>> to_float(10**400, "box")
Traceback (most recent call last):
...
medeyes_env.strict_json.BadInput: box: 1000000000... (401 digits) is too large for a number
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


class BadInput(ValueError):
    """One reason a piece of input is unusable (no file name: the caller adds ``FILE:LINE``)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        """``line``: the 1-based line of the problem inside the text parsed, when known."""
        super().__init__(message)
        self.line = line

    def at(self, path: object) -> str:
        """``PATH:LINE: reason`` (or ``PATH: reason`` when the line is unknown)."""
        return f"{path}:{self.line}: {self}" if self.line is not None else f"{path}: {self}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadInput(f"duplicate key {key!r} in one object")
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)
"""One decoder for every call (``json.loads`` with a hook would build a new one each time)."""


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses duplicate keys and turns every failure into :class:`BadInput`.

    >>> loads('[1, {"b": null}]')
    [1, {'b': None}]
    >>> loads("[" * 100_000)
    Traceback (most recent call last):
    ...
    medeyes_env.strict_json.BadInput: JSON nested too deeply
    """
    try:
        if isinstance(text, bytes):
            text = decode(text)
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"invalid JSON ({exc.msg}, column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise BadInput("JSON nested too deeply") from None
    except BadInput:
        raise
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise BadInput(f"invalid JSON ({exc})") from None


def decode(raw: bytes) -> str:
    r"""UTF-8 text of ``raw`` (a leading BOM dropped), or :class:`BadInput` naming the first bad byte.

    >>> decode(b"ok \xff")
    Traceback (most recent call last):
    ...
    medeyes_env.strict_json.BadInput: not UTF-8 text (byte 0xff at offset 3)
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return text.removeprefix("\ufeff")


def load_file(path: Path, max_bytes: int) -> Any:
    """Parse a whole JSON file of at most ``max_bytes``; :class:`BadInput` says why not, with the line when known."""
    size = path.stat().st_size
    if size > max_bytes:
        raise BadInput(f"{size:,} bytes, above the {max_bytes:,}-byte limit")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise BadInput(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})", line) from None
    return loads(text.removeprefix("\ufeff"))


def lines(handle: BinaryIO) -> Iterator[tuple[int, str | BadInput]]:
    """``(number, text)`` of each line of a binary file, or ``(number, BadInput)`` for a line that is not UTF-8.

    Decoding line by line lets one bad line be reported with its number (or skipped) while the rest load.
    """
    for number, raw in enumerate(handle, start=1):
        try:
            text = decode(raw) if number == 1 else _decode_plain(raw)
        except BadInput as exc:
            yield number, exc
            continue
        yield number, text


def _decode_plain(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None


def to_float(value: Any, what: str) -> float:
    """``float(value)`` for a finite JSON number; :class:`BadInput` for anything else.

    >>> to_float(3, "x"), to_float(2.5, "x")
    (3.0, 2.5)
    >>> to_float(float("nan"), "box")
    Traceback (most recent call last):
    ...
    medeyes_env.strict_json.BadInput: box: nan is not a finite number
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{what}: {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:
        digits = str(value)
        raise BadInput(f"{what}: {digits[:10]}... ({len(digits)} digits) is too large for a number") from None
    if not math.isfinite(number):
        raise BadInput(f"{what}: {value!r} is not a finite number")
    return number
