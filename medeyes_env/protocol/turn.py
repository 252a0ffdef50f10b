"""What a turn is: :class:`Action` (scan, drill, answer), :class:`ParsedTurn`, the size limits and error kinds."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from medeyes_env.cases import Box
from medeyes_env.errors import MedEyesError

ACTION_NAMES: tuple[str, ...] = ("scan", "drill")
"""Names allowed inside ``<action>``; answering uses the ``<answer>`` tag."""

TAG_NAMES: tuple[str, ...] = ("reasoning", "action", "answer")

CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
"""Control characters and lone surrogates: binary junk, refused in a turn."""

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


def excerpt(text: str, limit: int = 60) -> str:
    """Quote a short, single-line excerpt of model text for a feedback message."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 3] + "...")
