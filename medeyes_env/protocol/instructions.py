"""The protocol as told to a model: :func:`protocol_instructions` (full or brief) for one image and box format."""

from __future__ import annotations

from typing import Literal

from medeyes_env.protocol.boxes import BoxFormat
from medeyes_env.protocol.turn import ProtocolLimits

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
        width=width, height=height, max_steps=max_steps, **box_wording(box_format, width, height)
    )


def box_wording(box_format: BoxFormat, width: int, height: int) -> dict[str, str]:
    """Template fields that word boxes in ``box_format``: ``box`` (placeholder), ``box_rule``, ``brief_box_rule``."""
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
