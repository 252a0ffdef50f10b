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

from medeyes_env.protocol.boxes import LOC_TOKENS, BoxFormat, BoxKind, format_box, loc_token
from medeyes_env.protocol.instructions import PROTOCOL_INSTRUCTIONS, protocol_instructions
from medeyes_env.protocol.parse import parse_turn
from medeyes_env.protocol.render import render_turn
from medeyes_env.protocol.turn import (
    ACTION_NAMES,
    TAG_NAMES,
    Action,
    ErrorKind,
    ParsedTurn,
    ProtocolError,
    ProtocolLimits,
)

__all__ = [
    "ACTION_NAMES",
    "LOC_TOKENS",
    "PROTOCOL_INSTRUCTIONS",
    "TAG_NAMES",
    "Action",
    "BoxFormat",
    "BoxKind",
    "ErrorKind",
    "ParsedTurn",
    "ProtocolError",
    "ProtocolLimits",
    "format_box",
    "loc_token",
    "parse_turn",
    "protocol_instructions",
    "render_turn",
]
