"""The fast path of :func:`~medeyes_env.protocol.parse_turn`: a turn in the protocol's plain form, read by regexes.

Most turns a policy writes are exactly ``<reasoning>...</reasoning><action>{"name": "drill", "box": [...]}</action>``
(or a scan, or an answer), well formed and with every box inside the image. :func:`parse_canonical` recognises that
form and builds the same :class:`~medeyes_env.protocol.ParsedTurn` the four-stage parser would, in about a quarter
of the time; anything else (a deviation, a note, an error, a ``<`` inside a tag's content, exponents, strings,
escapes, other key orders) returns None and goes through the full parser, so every message stays its own.
"""

from __future__ import annotations

import re

from medeyes_env.protocol.boxes import BoxFormat
from medeyes_env.protocol.turn import CONTROL_RE, Action, ParsedTurn, ProtocolLimits

_WS = r"[ \t\n\r]*"  # JSON's whitespace; str.strip() removes it too, so text outside the tags stays empty
_TURN_RE = re.compile(
    rf"\A{_WS}<reasoning>([^<]*)</reasoning>{_WS}(?:<action>([^<]*)</action>|<answer>([^<]*)</answer>){_WS}\Z"
)
_NUMBER = r"(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,8})?"  # no sign, no exponent: float() reads it as json does
_BOX = rf"\[{_WS}({_NUMBER}){_WS},{_WS}({_NUMBER}){_WS},{_WS}({_NUMBER}){_WS},{_WS}({_NUMBER}){_WS}\]"
_BOX_RE = re.compile(_BOX)
_DRILL_RE = re.compile(rf'\{{{_WS}"name"{_WS}:{_WS}"drill"{_WS},{_WS}"box"{_WS}:{_WS}{_BOX}{_WS}\}}')
_SCAN_RE = re.compile(
    rf'\{{{_WS}"name"{_WS}:{_WS}"scan"{_WS},{_WS}"boxes"{_WS}:{_WS}\[{_WS}({_BOX}(?:{_WS},{_WS}{_BOX})*){_WS}\]{_WS}\}}'
)


def parse_canonical(
    text: object, image_size: tuple[int, int], limits: ProtocolLimits, box_format: BoxFormat
) -> ParsedTurn | None:
    """The parse of a well-formed turn in the plain form, with no note; None for anything else.

    ``image_size`` must be checked already (:func:`~medeyes_env.protocol.parse_turn` does). Where this returns a
    turn, it equals the full parser's.

    >>> from medeyes_env.protocol import ProtocolLimits, BoxFormat
    >>> turn = parse_canonical('<reasoning>Look.</reasoning><action>{"name": "drill", "box": [0, 0, 50, 60]}</action>',
    ...                        (100, 100), ProtocolLimits(), BoxFormat())
    >>> turn.action.boxes, turn.well_formed
    (((0.0, 0.0, 50.0, 60.0),), True)
    >>> parse_canonical('<action>{"name": "drill", "box": [0, 0, 50, 60]}</action>', (100, 100), ProtocolLimits(),
    ...                 BoxFormat()) is None  # no reasoning: a deviation, left to the full parser
    True
    """
    if not isinstance(text, str) or len(text) > limits.max_chars or CONTROL_RE.search(text) is not None:
        return None
    turn = _TURN_RE.match(text)
    if turn is None:
        return None
    reasoning_text, action_text, answer_text = turn.groups()
    reasoning = reasoning_text.strip()
    if not reasoning or len(reasoning) > limits.max_reasoning_chars:
        return None
    if answer_text is not None:
        answer = answer_text.strip()
        if not answer or len(answer) > limits.max_answer_chars:
            return None
        action = Action(name="answer", answer=answer)
    else:
        action = _tool_call(action_text.strip(), image_size, limits, box_format)
        if action is None:
            return None
    return ParsedTurn(reasoning=reasoning, action=action, notes=(), deviations=())


def _tool_call(
    content: str, image_size: tuple[int, int], limits: ProtocolLimits, box_format: BoxFormat
) -> Action | None:
    """A drill or scan whose every box lies inside the image as written (nothing to clamp, nothing to note)."""
    if len(content) > limits.max_json_chars or box_format.kind == "loc":
        return None
    drill = _DRILL_RE.fullmatch(content)
    if drill is not None:
        name, raw_boxes = "drill", [drill.groups()]
    else:
        scan = _SCAN_RE.fullmatch(content)
        if scan is None:
            return None
        name, raw_boxes = "scan", _BOX_RE.findall(scan.group(1))
        if len(raw_boxes) > limits.max_boxes:
            return None
    width, height = image_size
    boxes = []
    fractions = True
    for raw in raw_boxes:
        x1, y1, x2, y2 = box_format.to_pixels(tuple(map(float, raw)), image_size)
        if not (0.0 <= x1 < x2 <= width and 0.0 <= y1 < y2 <= height):
            return None  # inverted, empty, outside or to be clamped: the full parser says which
        fractions = fractions and x2 <= 1.0 and y2 <= 1.0  # x1 < x2 and y1 < y2: every coordinate in [0, 1]
        boxes.append((x1, y1, x2, y2))
    if fractions and box_format.kind == "pixels" and min(width, height) > 4:
        return None  # the full parser notes that pixels are not fractions
    # Every field is as Action's validators would leave it (finite floats, x2 > x1, y2 > y1, the right arity).
    return Action.model_construct(name=name, boxes=tuple(boxes))
