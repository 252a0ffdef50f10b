"""Rendering an action back to protocol text: :func:`render_turn`, the inverse of :func:`parse_turn`."""

from __future__ import annotations

from medeyes_env.protocol.boxes import BoxFormat
from medeyes_env.protocol.parse import TAG_RE
from medeyes_env.protocol.turn import CONTROL_RE, Action, ProtocolError, excerpt


def _check_renderable(part: str, what: str) -> None:
    if TAG_RE.search(part):
        raise ProtocolError(f"{what} {excerpt(part)} contains a protocol tag; it would not parse back. Remove it.")
    if CONTROL_RE.search(part):
        raise ProtocolError(f"{what} {excerpt(part)} contains control characters; it would not parse back.")


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
