"""Parsing a model's turn: :func:`parse_turn` in four stages (text, tags, reasoning, action), never raising on text.

The grammar, and what is tolerated or refused, is in :mod:`medeyes_env.protocol`'s docstring. A well-formed turn in
the plain form takes the fast path of :mod:`medeyes_env.protocol.canonical` first.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from typing import Any

from medeyes_env.cases import Box
from medeyes_env.errors import ConfigError
from medeyes_env.protocol.boxes import LOC_TOKEN_RE, BoxFormat, box_text, loc_token
from medeyes_env.protocol.canonical import parse_canonical
from medeyes_env.protocol.turn import (
    ACTION_NAMES,
    CONTROL_RE,
    TAG_NAMES,
    Action,
    ErrorKind,
    ParsedTurn,
    ProtocolLimits,
    excerpt,
)

# Linear-time patterns only: fixed alternatives and bounded quantifiers, no nested or adjacent unbounded repeats.
TAG_RE = re.compile(r"<(/?)(reasoning|action|answer)>", re.IGNORECASE)
"""An opening or closing protocol tag, any case (render refuses text holding one)."""
_NEAR_TAG_RE = re.compile(r"</?[ \t]{0,3}([A-Za-z_][A-Za-z0-9_-]{0,23})[ \t]{0,3}/?>")
_FENCE_RE = re.compile(r"\A```[A-Za-z]{0,10}[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL)

_SCAN_FORM = '<action>{"name": "scan", "boxes": [[x1, y1, x2, y2], ...]}</action>'
_DRILL_FORM = '<action>{"name": "drill", "box": [x1, y1, x2, y2]}</action>'
_ANSWER_FORM = "<answer>your answer</answer>"


class _Malformed(Exception):
    """Internal: carries one error out of the parsing helpers (never escapes :func:`parse_turn`)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


def _expected_turn(limits: ProtocolLimits) -> str:
    return (
        f"Expected <reasoning>...</reasoning> followed by exactly one of {_SCAN_FORM} (1 to {limits.max_boxes} boxes), "
        f"{_DRILL_FORM} or {_ANSWER_FORM}."
    )


def _tag_hint(text: str) -> str:
    """Name near-miss tags (``<actoin>``, ``< action >``, ``<think>``) found in ``text``, with a did-you-mean."""
    hints: list[str] = []
    seen: set[str] = set()
    for match in _NEAR_TAG_RE.finditer(text):
        name = match.group(1).lower()
        if name in seen:
            continue
        seen.add(name)
        if name in TAG_NAMES and match.group(0).lower() not in (f"<{name}>", f"</{name}>"):
            hints.append(f"found {match.group(0)!r}: write <{name}> without spaces")
        elif name not in TAG_NAMES:
            close = difflib.get_close_matches(name, TAG_NAMES, n=1, cutoff=0.6)
            if close:
                hints.append(f"found {match.group(0)!r}: did you mean <{close[0]}>?")
        if len(hints) >= 2 or len(seen) >= 20:
            break
    return (" (" + "; ".join(hints) + ")") if hints else ""


class _Segment:
    __slots__ = ("close_tag", "content", "name", "open_tag")

    def __init__(self, name: str, open_tag: str, close_tag: str, content: str) -> None:
        self.name = name
        self.open_tag = open_tag
        self.close_tag = close_tag
        self.content = content


def _split_tags(text: str, limits: ProtocolLimits) -> tuple[list[_Segment], list[str]]:
    """Split ``text`` into protocol tag segments and the text outside them; refuse bad nesting."""
    segments: list[_Segment] = []
    outside: list[str] = []
    pos = 0
    open_match: re.Match[str] | None = None
    for match in TAG_RE.finditer(text):
        closing = match.group(1) == "/"
        name = match.group(2).lower()
        if open_match is None:
            if closing:
                raise _Malformed(
                    "stray_tag", f"closing tag {match.group(0)} has no opening <{name}>. {_expected_turn(limits)}"
                )
            outside.append(text[pos : match.start()])
            open_match = match
        else:
            open_name = open_match.group(2).lower()
            if not closing:
                raise _Malformed(
                    "nested_tag",
                    f"nested tags: {match.group(0)} inside {open_match.group(0)}; close each tag before opening the "
                    f"next. {_expected_turn(limits)}",
                )
            if name != open_name:
                raise _Malformed(
                    "mismatched_tag",
                    f"tag {open_match.group(0)} is closed by {match.group(0)}; close it with </{open_name}>. "
                    f"{_expected_turn(limits)}",
                )
            segments.append(
                _Segment(open_name, open_match.group(0), match.group(0), text[open_match.end() : match.start()])
            )
            open_match = None
        pos = match.end()
    if open_match is not None:
        open_name = open_match.group(2).lower()
        raise _Malformed(
            "unclosed_tag",
            f"unclosed tag {open_match.group(0)}: it needs a closing </{open_name}>. {_expected_turn(limits)}",
        )
    outside.append(text[pos:])
    return segments, outside


def _reject_constant(name: str) -> float:
    raise _Malformed("non_finite", f"{name} is not allowed in the action JSON; coordinates must be finite numbers")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Malformed("bad_json", f"the action JSON has the key {key!r} twice")
        result[key] = value
    return result


def _load_action_json(content: str, limits: ProtocolLimits, deviations: list[str]) -> dict[str, Any]:
    content = content.strip()
    fenced = _FENCE_RE.match(content) if content.startswith("```") and content.endswith("```") else None
    if fenced:
        content = fenced.group(1).strip()
        deviations.append("the action JSON was wrapped in a Markdown code fence; write the JSON directly")
    if len(content) > limits.max_json_chars:
        raise _Malformed(
            "json_too_long",
            f"the <action> JSON is {len(content)} characters, above the limit of {limits.max_json_chars}. "
            f"Expected {_SCAN_FORM} or {_DRILL_FORM}.",
        )
    if not content:
        raise _Malformed("bad_json", f"the <action> tag is empty. Expected {_SCAN_FORM} or {_DRILL_FORM}.")
    try:
        data = json.loads(content, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except _Malformed as exc:
        raise _Malformed(exc.kind, f"{exc.message}. Expected {_SCAN_FORM} or {_DRILL_FORM}.") from None
    except json.JSONDecodeError as exc:
        hint = "; use double quotes for keys and strings" if "'" in content else ""
        raise _Malformed(
            "bad_json",
            f"the <action> content is not valid JSON ({exc.msg} at character {exc.pos}{hint}). "
            f"Expected {_SCAN_FORM} or {_DRILL_FORM}.",
        ) from None
    except (ValueError, RecursionError, OverflowError):  # e.g. ints past Python's digit limit, absurd nesting
        raise _Malformed(
            "bad_json",
            f"the <action> content is not valid JSON (it cannot be decoded). Expected {_SCAN_FORM} or {_DRILL_FORM}.",
        ) from None
    if not isinstance(data, dict):
        raise _Malformed(
            "not_object",
            f"the <action> content must be a JSON object, got {type(data).__name__} {excerpt(content, 40)}. "
            f"Expected {_SCAN_FORM} or {_DRILL_FORM}.",
        )
    return data


def _resolve_name(data: dict[str, Any], deviations: list[str]) -> str:
    if "name" not in data:
        raise _Malformed("missing_name", f'the action JSON has no "name" key. Expected {_SCAN_FORM} or {_DRILL_FORM}.')
    raw = data["name"]
    if not isinstance(raw, str):
        raise _Malformed(
            "unknown_action",
            f'the action "name" must be the string "scan" or "drill", got {excerpt(json.dumps(raw), 40)}. '
            f"Expected {_SCAN_FORM} or {_DRILL_FORM}.",
        )
    name = raw.strip().lower()
    if name in ACTION_NAMES:
        if name != raw:
            deviations.append(f'the action name {raw!r} should be written "{name}"')
        return name
    if name == "answer":
        raise _Malformed(
            "answer_as_action",
            f"to answer, write the answer in its own tag, {_ANSWER_FORM}, not inside <action>.",
        )
    close = difflib.get_close_matches(name, (*ACTION_NAMES, "answer"), n=1, cutoff=0.5)
    suggestion = f'; did you mean "{close[0]}"?' if close else "."
    raise _Malformed(
        "unknown_action",
        f"unknown action {excerpt(raw, 30)}{suggestion} The actions are scan and drill (and <answer> to finish). "
        f"Expected {_SCAN_FORM} or {_DRILL_FORM}.",
    )


def _to_coordinate(value: Any, box: Any, form: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(
            "bad_box",
            f"box {_fmt_box_raw(box)} has a coordinate that is not a number ({excerpt(json.dumps(value), 20)}); "
            f"coordinates must be numbers. {form}",
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Malformed(
            "non_finite",
            f"box {_fmt_box_raw(box)} has a coordinate that is not finite; coordinates must be finite numbers. {form}",
        )
    return number


def _fmt_box_raw(box: Any) -> str:
    try:
        text = json.dumps(box)
    except (TypeError, ValueError):
        text = str(box)
    return text if len(text) <= 80 else text[:77] + "..."


def _loc_values(raw: Any, box_format: BoxFormat, form: str) -> list[float]:
    """The four edge indices of a ``loc`` box string such as ``"<loc03><loc04><loc05><loc06>"``."""
    if not isinstance(raw, str):
        raise _Malformed("bad_box", f"box {_fmt_box_raw(raw)} must be a string of 4 location tokens. {form}")
    compact = "".join(raw.split())
    tokens = LOC_TOKEN_RE.findall(compact)
    if len(tokens) != 4 or "".join(loc_token(int(t)) for t in tokens) != compact:
        raise _Malformed("bad_box", f"box {_fmt_box_raw(raw)} must be exactly 4 location tokens. {form}")
    values = [float(t) for t in tokens]
    if max(values) > box_format.bins:
        raise _Malformed(
            "outside_image", f"box {_fmt_box_raw(raw)} uses a location above <loc{box_format.bins:02d}>. {form}"
        )
    return values


def _check_box(raw: Any, image_size: tuple[int, int], notes: list[str], box_format: BoxFormat) -> Box:
    """Validate one raw JSON box, convert it to pixels and clamp it to the image."""
    width, height = image_size
    form = box_format.form(image_size)
    if box_format.kind == "loc":
        values = _loc_values(raw, box_format, form)
    else:
        if not isinstance(raw, list) or len(raw) != 4:
            got = f"{len(raw)} values" if isinstance(raw, list) else type(raw).__name__
            raise _Malformed("bad_box", f"box {_fmt_box_raw(raw)} must be a list of 4 numbers, got {got}. {form}")
        values = [_to_coordinate(v, raw, form) for v in raw]
    shown = _fmt_box_raw(raw) if box_format.kind == "loc" else box_text(raw)
    x1, y1, x2, y2 = box_format.to_pixels(values, image_size)
    if x2 < x1 or y2 < y1:
        raise _Malformed(
            "inverted_box", f"box {shown} is inverted (x2 < x1 or y2 < y1); write the top-left corner first. {form}"
        )
    if x2 == x1 or y2 == y1:
        raise _Malformed("zero_area", f"box {shown} has zero area. {form}")
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        raise _Malformed("outside_image", f"box {shown} lies outside the {width}x{height} image. {form}")
    clamped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    if clamped != (x1, y1, x2, y2):
        notes.append(f"box {shown} was clamped to the {width}x{height} image: {box_format.encode(clamped, image_size)}")
    return clamped


def _boxes_of(name: str, data: dict[str, Any], limits: ProtocolLimits, deviations: list[str]) -> list[Any]:
    """Return the raw JSON boxes of a scan or drill, checking the arity."""
    form = _SCAN_FORM if name == "scan" else _DRILL_FORM
    has_box, has_boxes = "box" in data, "boxes" in data
    extra = sorted(set(data) - {"name", "box", "boxes"})
    if extra:
        deviations.append(f"ignored unknown key(s) {', '.join(repr(k) for k in extra)} in the action JSON")
    if has_box and has_boxes:
        raise _Malformed("box_arity", f'give either "box" or "boxes", not both. Expected {form}.')
    if name == "drill":
        if has_box:
            return [data["box"]]
        if has_boxes:
            boxes = data["boxes"]
            if isinstance(boxes, list) and len(boxes) == 1:
                deviations.append('drill takes one "box": [x1, y1, x2, y2], not a "boxes" list')
                return boxes
            count = f"{len(boxes)} boxes" if isinstance(boxes, list) else f"a {type(boxes).__name__}"
            raise _Malformed(
                "box_arity", f"drill takes exactly one box, got {count}; use scan for several. Expected {form}."
            )
        raise _Malformed("box_arity", f'drill takes exactly one box in "box", none was given. Expected {form}.')
    if has_box:
        deviations.append('scan takes a "boxes" list: [[x1, y1, x2, y2], ...], not a single "box"')
        return [data["box"]]
    if not has_boxes:
        raise _Malformed("box_arity", f'scan needs at least one box in "boxes", none was given. Expected {form}.')
    boxes = data["boxes"]
    if not isinstance(boxes, list):
        raise _Malformed("bad_box", f'"boxes" must be a list of boxes, got {type(boxes).__name__}. Expected {form}.')
    if not boxes:
        raise _Malformed("box_arity", f'scan needs at least one box; "boxes" is empty. Expected {form}.')
    if len(boxes) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in boxes):
        raise _Malformed(
            "bad_box",
            f'"boxes" must be a list of boxes; {_fmt_box_raw(boxes)} is a single box, so wrap it: '
            f"[{_fmt_box_raw(boxes)}]. Expected {form}.",
        )
    if len(boxes) > limits.max_boxes:
        raise _Malformed(
            "box_arity", f"scan takes at most {limits.max_boxes} boxes, got {len(boxes)}. Expected {form}."
        )
    return boxes


def _parse(text: str, image_size: tuple[int, int], limits: ProtocolLimits, box_format: BoxFormat) -> ParsedTurn:
    # Four stages: the raw text, the tags, the reasoning, the action (or answer) inside its tag.
    _check_text(text, limits)
    segments, outside = _split_tags(text, limits)
    deviations: list[str] = []
    notes: list[str] = []
    act = _acting_segment(text, segments, outside, limits, deviations)
    reasoning = _reasoning_of(segments, act, limits, deviations)
    if act.name == "answer":
        action = _answer_of(act, limits)
    else:
        action = _tool_call_of(act, image_size, limits, box_format, notes, deviations)
    return ParsedTurn(
        reasoning=reasoning or None,
        action=action,
        notes=tuple(notes + deviations),
        deviations=tuple(deviations),
    )


def _check_text(text: Any, limits: ProtocolLimits) -> None:
    """Refuse what is not a turn at all: not text, oversized, or binary."""
    if not isinstance(text, str):
        raise _Malformed("not_text", f"the turn must be text, got {type(text).__name__}. {_expected_turn(limits)}")
    if len(text) > limits.max_chars:
        raise _Malformed(
            "oversized",
            f"the response is too long (oversized): {len(text)} characters, the limit is {limits.max_chars}. "
            f"Keep each turn short. {_expected_turn(limits)}",
        )
    bad = CONTROL_RE.search(text)
    if bad:
        raise _Malformed(
            "binary",
            f"the response contains control characters (binary data?), e.g. {bad.group(0)!r} at position "
            f"{bad.start()}; write plain text. {_expected_turn(limits)}",
        )


def _acting_segment(
    text: str, segments: list[Any], outside: list[str], limits: ProtocolLimits, deviations: list[str]
) -> Any:
    """The one <action> or <answer> segment; tag-case and stray-text deviations are noted."""
    for segment in segments:
        if segment.open_tag != f"<{segment.name}>" or segment.close_tag != f"</{segment.name}>":
            deviations.append(f"write the tags of <{segment.name}> in lower case")
            break
    stray = "".join(outside).strip()
    if stray:
        deviations.append(f"text outside the tags was ignored: {excerpt(stray)}")
    acting = [s for s in segments if s.name in ("action", "answer")]
    if not acting:
        raise _Malformed(
            "missing_action", f"no <action> or <answer> tag found{_tag_hint(text)}. {_expected_turn(limits)}"
        )
    if len(acting) > 1:
        names = {s.name for s in acting}
        if names == {"action", "answer"}:
            raise _Malformed(
                "action_and_answer",
                f"the response has both an <action> and an <answer>; give one per turn. {_expected_turn(limits)}",
            )
        raise _Malformed(
            "multiple_actions",
            f"the response has more than one <{acting[0].name}> ({len(acting)}); give exactly one per turn. "
            f"{_expected_turn(limits)}",
        )
    return acting[0]


def _reasoning_of(segments: list[Any], act: Any, limits: ProtocolLimits, deviations: list[str]) -> str:
    """The <reasoning> text (blocks joined); missing, repeated, empty or late reasoning is a deviation."""
    reasoning_parts = [s.content.strip() for s in segments if s.name == "reasoning"]
    reasoning = "\n\n".join(part for part in reasoning_parts if part)
    if len(reasoning) > limits.max_reasoning_chars:
        raise _Malformed(
            "reasoning_too_long",
            f"the <reasoning> is {len(reasoning)} characters, above the limit of {limits.max_reasoning_chars}; "
            f"reason briefly. {_expected_turn(limits)}",
        )
    if not reasoning_parts:
        deviations.append("the turn has no <reasoning>; think in <reasoning>...</reasoning> before acting")
    elif len(reasoning_parts) > 1:
        deviations.append(f"the turn has {len(reasoning_parts)} <reasoning> blocks; write one")
    if reasoning_parts and not reasoning:
        deviations.append("the <reasoning> is empty")
    if reasoning_parts and segments.index(act) < next(i for i, s in enumerate(segments) if s.name == "reasoning"):
        deviations.append(f"write the <reasoning> before the <{act.name}>")
    return reasoning


def _answer_of(act: Any, limits: ProtocolLimits) -> Action:
    answer = act.content.strip()
    if not answer:
        raise _Malformed("empty_answer", f"the <answer> is empty; write your answer in it, {_ANSWER_FORM}.")
    if len(answer) > limits.max_answer_chars:
        raise _Malformed(
            "answer_too_long",
            f"the <answer> is {len(answer)} characters, above the limit of {limits.max_answer_chars}; "
            f"answer in a few words, {_ANSWER_FORM}.",
        )
    return Action(name="answer", answer=answer)


def _tool_call_of(
    act: Any,
    image_size: tuple[int, int],
    limits: ProtocolLimits,
    box_format: BoxFormat,
    notes: list[str],
    deviations: list[str],
) -> Action:
    """The scan or drill in an <action>'s JSON, its boxes checked against the image."""
    data = _load_action_json(act.content, limits, deviations)
    name = _resolve_name(data, deviations)
    raw_boxes = _boxes_of(name, data, limits, deviations)
    boxes = tuple(_check_box(raw, image_size, notes, box_format) for raw in raw_boxes)
    width, height = image_size
    fractions = all(0.0 <= v <= 1.0 for box in boxes for v in box)
    if box_format.kind == "pixels" and min(width, height) > 4 and fractions:
        notes.append(
            f"every coordinate is between 0 and 1: boxes are in pixels of the {width}x{height} image, "
            "not fractions of it"
        )
    return Action(name=name, boxes=boxes)  # type: ignore[arg-type]


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise ConfigError(f"image_size must be (width, height), got {image_size!r}") from None
    for value in (width, height):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"image_size must be two positive ints (width, height), got {image_size!r}")
    return width, height


def parse_turn(
    text: str,
    image_size: tuple[int, int],
    limits: ProtocolLimits | None = None,
    box_format: BoxFormat | None = None,
) -> ParsedTurn:
    """Parse one model turn into an executable :class:`Action`, or a feedback message; never raises on ``text``.

    ``image_size`` is ``(width, height)`` of the original image; boxes are written in
    ``box_format`` (default: pixels), converted to pixels, checked against the image and
    clamped into it. A bad ``image_size`` or ``limits`` is a programming error and raises
    :class:`~medeyes_env.errors.ConfigError`.

    >>> turn = parse_turn('<reasoning>Look left.</reasoning><action>{"name": "drill", "box": [0, 0, 50, 60]}</action>',
    ...                   image_size=(100, 100))
    >>> turn.action.name, turn.action.boxes, turn.well_formed
    ('drill', ((0.0, 0.0, 50.0, 60.0),), True)
    >>> bad = parse_turn('<action>{"name": "zoom", "box": [0, 0, 50, 60]}</action>', image_size=(100, 100))
    >>> bad.ok, bad.error_kind
    (False, 'unknown_action')
    """
    limits = limits if limits is not None else ProtocolLimits()
    box_format = box_format if box_format is not None else BoxFormat()
    image_size = _check_image_size(image_size)
    if (canonical := parse_canonical(text, image_size, limits, box_format)) is not None:
        return canonical  # a well-formed turn in the plain form: its fast path gives the same turn
    try:
        return _parse(text, image_size, limits, box_format)
    except _Malformed as exc:
        return ParsedTurn(reasoning=None, action=None, error=exc.message, error_kind=exc.kind)
    except Exception as exc:  # a parser bug must not crash a rollout; it becomes data with its type
        return ParsedTurn(
            reasoning=None,
            action=None,
            error=f"the response could not be parsed ({type(exc).__name__}). {_expected_turn(limits)}",
            error_kind="parser_error",
        )
