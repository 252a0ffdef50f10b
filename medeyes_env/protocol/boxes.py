"""How a model writes a box (:class:`BoxFormat`: pixels, norm1000, location tokens) and the one box formatter."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medeyes_env.protocol.turn import excerpt

LOC_TOKENS: int = 64
"""Location tokens ``<loc00>`` .. ``<loc63>`` a ``loc`` box format may use (``bins`` <= 63)."""
LOC_TOKEN_RE = re.compile(r"<loc(\d{2})>")
"""One location token ``<locNN>``; the group is its two-digit bin."""
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
            return box_text(box)
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


def format_box(box: Sequence[float], box_format: BoxFormat | None = None, image_size: tuple[int, int] = (1, 1)) -> str:
    """A box as text, rounded to whole pixels first: the one formatter of the env's feedback and the expert's notes.

    >>> format_box((12.4, 30.6, 99.5, 120.0))
    '[12, 31, 100, 120]'
    >>> format_box((0, 0, 512, 256), BoxFormat(kind="norm1000"), (1024, 512))
    '[0, 0, 500, 500]'
    """
    if len(box) == 4 and (box_format is None or box_format.kind == "pixels"):  # what box_text writes, directly
        x1, y1, x2, y2 = (round(v) for v in box)
        if max(abs(x1), abs(y1), abs(x2), abs(y2)) < 10**15:
            return f"[{x1}, {y1}, {x2}, {y2}]"
    rounded = tuple(float(round(v)) for v in box)
    return (box_format or BoxFormat()).encode(rounded, image_size)


def _fmt_num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def box_text(box: Sequence[Any]) -> str:
    """A box for a message: ``[x1, y1, x2, y2]`` with whole numbers unpadded, or an excerpt of what it held."""
    try:
        return "[" + ", ".join(_fmt_num(float(v)) for v in box) + "]"
    except (TypeError, ValueError, OverflowError):
        return excerpt(json.dumps(box, default=str), 80)
