"""The text action protocol: parse a model's turn into an :class:`Action`, and render one back.

One turn is one model response::

    <reasoning>free text</reasoning>
    <action>{"name": "scan", "boxes": [[x1, y1, x2, y2], ...]}</action>

or ``<action>{"name": "drill", "box": [x1, y1, x2, y2]}</action>``, or
``<reasoning>...</reasoning><answer>yes</answer>`` to end the episode. Boxes are
``xyxy`` in pixels of the ORIGINAL image, top-left origin.

Strict on structure, tolerant in diagnosis. :func:`parse_turn` never raises on
model text: every malformed turn becomes ``ParsedTurn(action=None, error=...)``
whose message names what was wrong and shows the expected form, so the
environment can feed it back. Two levels of success:

- ``ok``: the action can be executed (the environment runs it).
- ``well_formed``: the turn follows the protocol exactly (the grammar reward).

Tolerated (executed, but the turn is not ``well_formed`` and ``deviations`` says why):
tag names in another case (``<Action>``), a missing or empty ``<reasoning>``, several
reasoning blocks, reasoning after the action, non-whitespace text outside the tags, the JSON in a
Markdown code fence, unknown extra JSON keys, an action name in another case,
``drill`` with ``"boxes"`` holding exactly one box, ``scan`` with a single ``"box"``.

Tolerated and still well formed: whitespace around and inside tags' content,
integer or float coordinates, surrounding whitespace of the answer, a box that
lies partly outside the image (clamped, with a note).

Refused (``error`` set): oversized text, control characters (binary junk),
nested, unclosed, stray or mismatched tags, no action, two actions, an action
and an answer, an empty or oversized answer, invalid JSON (NaN, Infinity and
duplicate keys included), a non-object, a missing or unknown action name (with
a did-you-mean), ``{"name": "answer"}`` inside ``<action>`` (answers go in ``<answer>``),
oversized reasoning or action JSON, wrong box arity, non-numeric, non-finite,
inverted or zero-area boxes, and boxes entirely outside the image. Tags are
exactly ``<name>``: ``< action >`` is not a tag (the error message points it out).

A backend that strips the stop string (``</action>``, ``</answer>``) from its output
must put it back before parsing, or the turn is an ``unclosed_tag`` error.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from medeyes_env.cases import Box
from medeyes_env.errors import ConfigError, MedEyesError

ACTION_NAMES: tuple[str, ...] = ("scan", "drill")
"""Names allowed inside ``<action>``; answering uses the ``<answer>`` tag."""

TAG_NAMES: tuple[str, ...] = ("reasoning", "action", "answer")

ErrorKind = Literal[
    "not_text",
    "oversized",
    "binary",
    "stray_tag",
    "nested_tag",
    "mismatched_tag",
    "unclosed_tag",
    "missing_action",
    "multiple_actions",
    "action_and_answer",
    "empty_answer",
    "answer_too_long",
    "reasoning_too_long",
    "json_too_long",
    "bad_json",
    "not_object",
    "missing_name",
    "unknown_action",
    "answer_as_action",
    "box_arity",
    "bad_box",
    "non_finite",
    "inverted_box",
    "zero_area",
    "outside_image",
    "parser_error",
]
"""Machine-readable class of a malformed turn, for logs and training-health counters."""


class ProtocolError(MedEyesError, ValueError):
    """A program (not a model) asked for something the protocol cannot express, e.g. rendering a tag in reasoning."""


class ProtocolLimits(BaseModel):
    """Size limits on every part of a turn; anything larger is refused before it is parsed."""

    model_config = ConfigDict(frozen=True)

    max_chars: int = Field(default=4096, gt=0, description="Longest turn text in characters; longer is 'oversized'.")
    max_reasoning_chars: int = Field(
        default=2048, gt=0, description="Longest <reasoning> content in characters (all reasoning blocks together)."
    )
    max_boxes: int = Field(default=5, ge=1, description="Most boxes in one scan (paper: at most 5 regions).")
    max_answer_chars: int = Field(default=256, gt=0, description="Longest <answer> content, after stripping.")
    max_json_chars: int = Field(default=1024, gt=0, description="Longest <action> JSON content, after stripping.")


def _check_box_values(box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers [x1, y1, x2, y2], got {list(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {list(box)} has a non-finite coordinate")
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {list(box)} is not xyxy with x2 > x1 and y2 > y1")
    return (x1, y1, x2, y2)


LOC_TOKENS: int = 64
"""Location tokens ``<loc00>`` .. ``<loc63>`` a ``loc`` box format may use (``bins`` <= 63)."""
_LOC_RE = re.compile(r"<loc(\d{2})>")
BoxKind = Literal["pixels", "norm1000", "loc"]


def loc_token(index: int) -> str:
    """The text of location token ``index``: ``<loc07>``.

    >>> loc_token(7)
    '<loc07>'
    """
    if not 0 <= index < LOC_TOKENS:
        raise ValueError(f"location token index must be in 0..{LOC_TOKENS - 1}, got {index}")
    return f"<loc{index:02d}>"


class BoxFormat(BaseModel):
    """How a model writes a box; inside the code every box is xyxy pixels of the original image.

    - ``pixels``: ``[x1, y1, x2, y2]`` in pixels of the original image (the paper; Qwen2.5-VL's convention).
    - ``norm1000``: ``[x1, y1, x2, y2]`` on a 0-1000 scale of each side (Qwen2-VL, Qwen3-VL).
    - ``loc``: four location tokens ``"<loc03><loc05><loc06><loc08>"``, each the nearest of ``bins + 1``
      evenly spaced edges of its side (Pix2Seq and PaliGemma quantised coordinates): one token per
      coordinate, from a vocabulary of ``bins + 1`` classes, for small models that cannot regress digits.

    Conversion happens here and only here (:meth:`encode` for what a model reads, parsing for what it writes).

    >>> BoxFormat(kind="loc", bins=16).encode((96, 130, 160, 200), (512, 512))
    '"<loc03><loc04><loc05><loc06>"'
    >>> BoxFormat(kind="norm1000").encode((96, 128, 160, 256), (512, 512))
    '[188, 250, 312, 500]'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: BoxKind = Field(default="pixels", description="pixels, norm1000 or loc (see the class docstring).")
    bins: int = Field(
        default=16, ge=2, le=LOC_TOKENS - 1, description="loc only: intervals per side (bins + 1 edge tokens)."
    )

    def _scale(self, image_size: tuple[int, int]) -> tuple[float, float]:
        width, height = image_size
        if self.kind == "pixels":
            return 1.0, 1.0
        steps = 1000.0 if self.kind == "norm1000" else float(self.bins)
        return width / steps, height / steps

    def encode(self, box: Sequence[float], image_size: tuple[int, int]) -> str:
        """The JSON text of ``box`` (xyxy pixels) as a model writes it."""
        if self.kind == "pixels":
            return _fmt_box(box)
        sx, sy = self._scale(image_size)
        x1, y1, x2, y2 = (round(v / s) for v, s in zip(box, (sx, sy, sx, sy), strict=True))
        # Whole units on the grid, never empty: a box thinner than one unit becomes one unit wide.
        top = 1000 if self.kind == "norm1000" else self.bins
        x1, y1 = min(max(x1, 0), top - 1), min(max(y1, 0), top - 1)
        x2, y2 = min(max(x2, x1 + 1), top), min(max(y2, y1 + 1), top)
        if self.kind == "norm1000":
            return f"[{x1}, {y1}, {x2}, {y2}]"
        return '"' + "".join(loc_token(v) for v in (x1, y1, x2, y2)) + '"'

    def to_pixels(self, values: Sequence[float], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Numbers in this format's units to xyxy pixels (not clamped, not checked)."""
        sx, sy = self._scale(image_size)
        x1, y1, x2, y2 = values
        return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)

    def form(self, image_size: tuple[int, int]) -> str:
        """One sentence that says how to write a box in this format."""
        width, height = image_size
        if self.kind == "pixels":
            return (
                f"A box is [x1, y1, x2, y2] in pixels of the {width}x{height} image with "
                f"0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}."
            )
        if self.kind == "norm1000":
            return "A box is [x1, y1, x2, y2] on a 0-1000 scale of the image's width and height, x1 < x2, y1 < y2."
        return (
            f'A box is a string of four location tokens "<locX1><locY1><locX2><locY2>", each 00 to {self.bins:02d} '
            f"(the image's width and height in {self.bins} steps), X1 < X2, Y1 < Y2."
        )

    def placeholder(self) -> str:
        """How a box is shown in the instructions' templates."""
        return "[x1, y1, x2, y2]" if self.kind != "loc" else '"<locX1><locY1><locX2><locY2>"'


class Action(BaseModel):
    """One executable action: ``scan`` several boxes, ``drill`` into one box, or ``answer``.

    >>> Action.drill((10, 20, 50, 60))
    Action(name='drill', boxes=((10.0, 20.0, 50.0, 60.0),), answer=None)
    >>> Action.final_answer("  yes ").answer
    'yes'
    """

    model_config = ConfigDict(frozen=True)

    name: Literal["scan", "drill", "answer"] = Field(description="What to do: scan, drill or answer.")
    boxes: tuple[Box, ...] = Field(
        default=(), description="scan: 1 or more boxes; drill: exactly 1; answer: none. xyxy original-image pixels."
    )
    answer: str | None = Field(default=None, description="The final answer, stripped and non-empty; only for answer.")

    @field_validator("boxes")
    @classmethod
    def _boxes_ordered(cls, boxes: tuple[Box, ...]) -> tuple[Box, ...]:
        return tuple(_check_box_values(box) for box in boxes)

    @field_validator("answer")
    @classmethod
    def _strip_answer(cls, answer: str | None) -> str | None:
        return answer.strip() if answer is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> Action:
        if self.name == "answer":
            if self.boxes:
                raise ValueError("an answer action takes no boxes")
            if not self.answer:
                raise ValueError("an answer action needs a non-empty answer")
        else:
            if self.answer is not None:
                raise ValueError(f"a {self.name} action takes no answer")
            if self.name == "drill" and len(self.boxes) != 1:
                raise ValueError(f"a drill action takes exactly one box, got {len(self.boxes)}")
            if self.name == "scan" and not self.boxes:
                raise ValueError("a scan action needs at least one box")
        return self

    @classmethod
    def scan(cls, *boxes: Sequence[float]) -> Action:
        """Build a scan over the given boxes."""
        return cls(name="scan", boxes=tuple(tuple(box) for box in boxes))  # type: ignore[arg-type]

    @classmethod
    def drill(cls, box: Sequence[float]) -> Action:
        """Build a drill into one box."""
        return cls(name="drill", boxes=(tuple(box),))  # type: ignore[arg-type]

    @classmethod
    def final_answer(cls, text: str) -> Action:
        """Build the episode's final answer."""
        return cls(name="answer", answer=text)


class ParsedTurn(BaseModel):
    """The result of :func:`parse_turn`: either an executable action or a feedback message, never both."""

    model_config = ConfigDict(frozen=True)

    reasoning: str | None = Field(
        description="The <reasoning> content, stripped, blocks joined by a blank line; None when absent or empty."
    )
    action: Action | None = Field(description="The action to execute; None when the turn is malformed.")
    error: str | None = Field(
        default=None, description="Feedback for a malformed turn: what was wrong and the expected form; None when ok."
    )
    error_kind: ErrorKind | None = Field(default=None, description="Machine-readable class of the error.")
    notes: tuple[str, ...] = Field(
        default=(), description="Non-fatal remarks for the model, e.g. a clamped box; includes every deviation."
    )
    deviations: tuple[str, ...] = Field(
        default=(), description="Why a turn that executes does not follow the protocol exactly (empty when it does)."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        """True when the action can be executed."""
        return self.action is not None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def well_formed(self) -> bool:
        """True only when the turn executes and follows the protocol exactly (the grammar reward's test)."""
        return self.action is not None and not self.deviations


# --------------------------------------------------------------------------------------------------------------
# Instructions shown to the model
# --------------------------------------------------------------------------------------------------------------

_INSTRUCTIONS_TEMPLATE = """\
You examine a medical image step by step before answering. The image is {{width}} x {{height}} pixels.
Every response is one turn: first your thinking in <reasoning>...</reasoning>, then exactly one of:

1. Scan several candidate regions at once (1 to {max_boxes} boxes):
<reasoning>The left lower lobe and the right hilum need a closer look.</reasoning>
<action>{{{{"name": "scan", "boxes": [{{box}}, {{box}}]}}}}</action>

2. Drill into one region to see it zoomed in at full resolution:
<reasoning>The opacity in the left lower lobe is the most suspicious.</reasoning>
<action>{{{{"name": "drill", "box": {{box}}}}}}</action>

3. Give the final answer, which ends the examination:
<reasoning>The zoomed view shows a well-defined nodule.</reasoning>
<answer>yes</answer>

{{box_rule}} The action is JSON with double quotes. Write nothing
outside the tags. After each scan or drill you receive the view and a <feedback> message. You have at most
{{max_steps}} turns; the last one must be an answer. For yes/no questions answer "yes" or "no"; for multiple choice
answer with the option's letter or its exact text; otherwise answer with a few words."""


_BRIEF_INSTRUCTIONS_TEMPLATE = """\
Examine the {{width}} x {{height}} image, then answer. Each turn: <reasoning>...</reasoning> then one of
<action>{{{{"name": "scan", "boxes": [{{box}}, ...]}}}}</action> (1 to {max_boxes} regions),
<action>{{{{"name": "drill", "box": {{box}}}}}}</action> (one region zoomed in),
<answer>...</answer> (ends it). {{brief_box_rule}}
At most {{max_steps}} turns; the last one must be an answer."""


def protocol_instructions(
    width: int,
    height: int,
    max_steps: int,
    limits: ProtocolLimits | None = None,
    style: Literal["full", "brief"] = "full",
    box_format: BoxFormat | None = None,
) -> str:
    """Return the protocol instructions for one image, with the limits' box count and box format filled in.

    ``style="brief"`` states the same protocol in about a third of the tokens, without worked examples: for
    small models trained from scratch, whose every training sequence carries the system prompt.

    >>> "512 x 384 pixels" in protocol_instructions(512, 384, max_steps=4)
    True
    >>> "512 x 384 image" in protocol_instructions(512, 384, max_steps=4, style="brief")
    True
    """
    limits = limits or ProtocolLimits()
    box_format = box_format or BoxFormat()
    template = _BRIEF_INSTRUCTIONS_TEMPLATE if style == "brief" else _INSTRUCTIONS_TEMPLATE
    return template.format(max_boxes=limits.max_boxes).format(
        width=width, height=height, max_steps=max_steps, **_box_wording(box_format, width, height)
    )


def _box_wording(box_format: BoxFormat, width: int, height: int) -> dict[str, str]:
    if box_format.kind == "pixels":
        rule = (
            f"Boxes are [x1, y1, x2, y2]: pixel coordinates in the original {width} x {height} image, origin at the "
            f"top-left\ncorner, 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height}."
        )
        brief = "Boxes: pixels of the original image, x1 < x2, y1 < y2."
    elif box_format.kind == "norm1000":
        rule = brief = "Boxes: [x1, y1, x2, y2] on a 0-1000 scale of the image's width and height, x1 < x2, y1 < y2."
    else:
        rule = brief = (
            f"Boxes: four location tokens, x1 y1 x2 y2, each <loc00> to <loc{box_format.bins:02d}> across the image."
        )
    return {"box": box_format.placeholder(), "box_rule": rule, "brief_box_rule": brief}


PROTOCOL_INSTRUCTIONS: str = _INSTRUCTIONS_TEMPLATE.format(max_boxes=ProtocolLimits().max_boxes)
"""The protocol as told to a model; fill it with ``.format(width=, height=, max_steps=, box=, box_rule=)``."""


# --------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------

# Linear-time patterns only: fixed alternatives and bounded quantifiers, no nested or adjacent unbounded repeats.
_TAG_RE = re.compile(r"<(/?)(reasoning|action|answer)>", re.IGNORECASE)
_NEAR_TAG_RE = re.compile(r"</?[ \t]{0,3}([A-Za-z_][A-Za-z0-9_-]{0,23})[ \t]{0,3}/?>")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
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


def _excerpt(text: str, limit: int = 60) -> str:
    """Quote a short, single-line excerpt of model text for a feedback message."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")


def format_box(box: Sequence[float], box_format: BoxFormat | None = None, image_size: tuple[int, int] = (1, 1)) -> str:
    """A box as text, rounded to whole pixels first: the one formatter of the env's feedback and the expert's notes.

    >>> format_box((12.4, 30.6, 99.5, 120.0))
    '[12, 31, 100, 120]'
    >>> format_box((0, 0, 512, 256), BoxFormat(kind="norm1000"), (1024, 512))
    '[0, 0, 500, 500]'
    """
    rounded = tuple(float(round(v)) for v in box)
    return (box_format or BoxFormat()).encode(rounded, image_size)


def _fmt_num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _fmt_box(box: Sequence[Any]) -> str:
    try:
        return "[" + ", ".join(_fmt_num(float(v)) for v in box) + "]"
    except (TypeError, ValueError, OverflowError):
        return _excerpt(json.dumps(box, default=str), 80)


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
    for match in _TAG_RE.finditer(text):
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
            f"the <action> content must be a JSON object, got {type(data).__name__} {_excerpt(content, 40)}. "
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
            f'the action "name" must be the string "scan" or "drill", got {_excerpt(json.dumps(raw), 40)}. '
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
        f"unknown action {_excerpt(raw, 30)}{suggestion} The actions are scan and drill (and <answer> to finish). "
        f"Expected {_SCAN_FORM} or {_DRILL_FORM}.",
    )


def _to_coordinate(value: Any, box: Any, form: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(
            "bad_box",
            f"box {_fmt_box_raw(box)} has a coordinate that is not a number ({_excerpt(json.dumps(value), 20)}); "
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
    tokens = _LOC_RE.findall(compact)
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
    shown = _fmt_box_raw(raw) if box_format.kind == "loc" else _fmt_box(raw)
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
    bad = _CONTROL_RE.search(text)
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
        deviations.append(f"text outside the tags was ignored: {_excerpt(stray)}")
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


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def _check_renderable(part: str, what: str) -> None:
    if _TAG_RE.search(part):
        raise ProtocolError(f"{what} {_excerpt(part)} contains a protocol tag; it would not parse back. Remove it.")
    if _CONTROL_RE.search(part):
        raise ProtocolError(f"{what} {_excerpt(part)} contains control characters; it would not parse back.")


def render_turn(
    action: Action,
    reasoning: str | None = None,
    box_format: BoxFormat | None = None,
    image_size: tuple[int, int] | None = None,
) -> str:
    """Render an action (and optional reasoning) as protocol text; the inverse of :func:`parse_turn`.

    Coordinates that are whole numbers are written as integers. Another ``box_format`` than pixels
    needs the ``image_size`` its units refer to.

    >>> print(render_turn(Action.scan((0, 0, 10, 10), (5, 5, 20.5, 20)), "Two spots."))
    <reasoning>Two spots.</reasoning>
    <action>{"name": "scan", "boxes": [[0, 0, 10, 10], [5, 5, 20.5, 20]]}</action>
    >>> render_turn(Action.final_answer("no"))
    '<answer>no</answer>'
    """
    parts: list[str] = []
    if reasoning is not None:
        _check_renderable(reasoning, "reasoning")
        parts.append(f"<reasoning>{reasoning}</reasoning>")
    if action.name == "answer":
        answer = action.answer or ""  # never empty: Action's validator guarantees it
        _check_renderable(answer, "answer")
        parts.append(f"<answer>{answer}</answer>")
    else:
        box_format = box_format or BoxFormat()
        if box_format.kind != "pixels" and image_size is None:
            raise ProtocolError(f"rendering {box_format.kind} boxes needs the image_size they refer to")
        size = image_size or (1, 1)
        boxes = "[" + ", ".join(box_format.encode(box, size) for box in action.boxes) + "]"
        if action.name == "drill":
            parts.append(f'<action>{{"name": "drill", "box": {boxes[1:-1]}}}</action>')
        else:
            parts.append(f'<action>{{"name": "scan", "boxes": {boxes}}}</action>')
    return "\n".join(parts)
