"""The one data model every source yields: :class:`Case`, :class:`Region`, :class:`AnswerType`.

Boxes are ``xyxy`` in pixels of the ORIGINAL image, top-left origin, floats allowed.
Sources convert other conventions (``xywh``, normalised coordinates) once, at
their boundary, with :func:`xywh_to_xyxy`; nothing downstream converts again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from medeyes_env.errors import CaseError, ImageLoadError

Box = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` in pixels of the original image, ``x1 < x2`` and ``y1 < y2``."""

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

MAX_IMAGE_PIXELS = 64_000_000
"""Images larger than this are refused (decompression-bomb guard, about 8000 x 8000)."""


class AnswerType(str, Enum):
    """How an answer is matched against the gold answer."""

    CLOSED = "closed"
    """yes / no."""
    CHOICE = "choice"
    """One of ``Case.options``; answered by letter or by option text."""
    OPEN = "open"
    """A short free-text answer, matched after normalisation."""


class Region(BaseModel):
    """A gold region: a box in pixels of the original image and what it shows."""

    model_config = ConfigDict(frozen=True)

    box: Box = Field(description="xyxy pixels of the original image")
    label: str = Field(default="abnormality", description="What the region shows, e.g. 'nodule'.")

    @field_validator("box")
    @classmethod
    def _box_is_ordered(cls, box: Box) -> Box:
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"box {list(box)} is not xyxy with x2 > x1 and y2 > y1; convert xywh with xywh_to_xyxy")
        return box


def xywh_to_xyxy(box: tuple[float, float, float, float]) -> Box:
    """Convert ``(x, y, width, height)`` to the project's ``xyxy`` convention.

    >>> xywh_to_xyxy((10, 20, 30, 40))
    (10.0, 20.0, 40.0, 60.0)
    """
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


class Case(BaseModel):
    """One visual question: an image, a question, its gold answer and gold regions.

    The image is loaded lazily, either from ``image_path`` or from a generator the
    source attached with :meth:`with_image_factory` (the phantom source renders
    on demand). ``load_image`` always returns an RGB :class:`PIL.Image.Image`.
    """

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Unique within its source, e.g. 'phantom/test/00042'.")
    question: str
    answer: str = Field(description="Gold answer; for CHOICE the option text, not the letter.")
    answer_type: AnswerType
    options: tuple[str, ...] = Field(default=(), description="Choices for CHOICE questions, in display order.")
    regions: tuple[Region, ...] = Field(default=(), description="Gold regions; may be empty.")
    lookalikes: tuple[Region, ...] = Field(
        default=(),
        description="Normal structures that look like a finding at overview resolution (the phantom's mimics). "
        "Never gold: rewards ignore them; an annotation oracle proposes them as a detector would.",
    )
    modality: str = Field(default="unknown", description="e.g. 'xray', 'mri', 'ct', 'pathology'.")
    organ: str = Field(default="unknown", description="e.g. 'chest', 'brain', 'abdomen'.")
    source: str = Field(description="Name of the source that produced the case, e.g. 'phantom'.")
    split: Split = "test"
    image_path: Path | None = Field(default=None, description="Image file; None when a factory renders it.")
    image_size: tuple[int, int] | None = Field(default=None, description="(width, height) when known upfront.")
    meta: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Source-specific facts.")

    _image_factory: Callable[[], Image.Image] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self) -> Case:
        if self.answer_type is AnswerType.CHOICE:
            if len(self.options) < 2:
                raise ValueError(f"case {self.id!r}: a CHOICE question needs 2+ options, got {list(self.options)}")
            if self.answer not in self.options:
                raise ValueError(f"case {self.id!r}: answer {self.answer!r} not in options {list(self.options)}")
        if self.answer_type is AnswerType.CLOSED and self.answer.strip().lower() not in ("yes", "no"):
            raise ValueError(f"case {self.id!r}: a CLOSED answer must be 'yes' or 'no', got {self.answer!r}")
        if self.image_size is not None:
            width, height = self.image_size
            for region in self.regions:
                x1, y1, x2, y2 = region.box
                if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                    raise ValueError(
                        f"case {self.id!r}: region {list(region.box)} lies outside the {width}x{height} image"
                    )
        return self

    def with_image_factory(self, factory: Callable[[], Image.Image]) -> Case:
        """Attach a function that renders the image on demand (used by procedural sources)."""
        self._image_factory = factory
        return self

    def load_image(self) -> Image.Image:
        """Return the image as RGB, or raise :class:`ImageLoadError` naming the culprit."""
        if self._image_factory is not None:
            image = self._image_factory()
        elif self.image_path is not None:
            image = load_image_file(self.image_path)
        else:
            raise CaseError(f"case {self.id!r} has neither an image_path nor an image factory")
        return image if image.mode == "RGB" else image.convert("RGB")


WINDOWS = ("minmax", "percentile")
"""How :func:`load_image_file` maps a high-bit-depth image to 8 bits (see :func:`window_to_uint8`)."""
PERCENTILE_WINDOW = (0.5, 99.5)
"""The percentiles of the ``percentile`` window: a viewer's auto-window, robust to a few hot pixels."""
EXIF_ORIENTATION = 0x0112


def window_to_uint8(values: np.ndarray, window: str = "minmax", nominal_max: float = 255.0) -> np.ndarray:
    """Map a 2-D array of any range to uint8: the window ``[low, high]`` spans 0..255 linearly.

    ``minmax`` takes the lowest and highest finite value, ``percentile`` the 0.5th and 99.5th percentiles
    (clipping outside). NaN becomes 0. A flat image (``low == high``) is scaled by ``nominal_max``, the top of
    its type's range (65535 for 16-bit), so a uniformly bright image stays bright.

    >>> window_to_uint8(np.array([[0, 1000, 4095]], dtype=np.uint16)).tolist()
    [[0, 62, 255]]
    >>> window_to_uint8(np.array([[7.0, 7.0]]), nominal_max=14.0).tolist()
    [[128, 128]]
    """
    if window not in WINDOWS:
        raise ValueError(f"window {window!r} is not one of {', '.join(WINDOWS)}")
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.uint8)
    if window == "percentile":
        low, high = (float(v) for v in np.percentile(finite, PERCENTILE_WINDOW))
    else:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:  # flat: show its level within the type's nominal range
        low, high = 0.0, max(nominal_max, high)
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = (np.clip(data, low, high) - low) * (255.0 / (high - low))
    return np.nan_to_num(np.rint(scaled), nan=0.0, posinf=255.0, neginf=0.0).astype(np.uint8)


def _to_rgb(image: Image.Image, window: str) -> Image.Image:
    """RGB with honest pixels: 16-bit, 32-bit and float single-channel images are windowed, not clipped."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        nominal = 65535.0 if image.mode.startswith("I;16") else 255.0
        gray = window_to_uint8(np.asarray(image), window, nominal)
        return Image.fromarray(gray).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as a viewer shows ``image``: swapped when its EXIF orientation rotates by 90 degrees."""
    width, height = image.size
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image_file(path: str | os.PathLike[str], window: str = "minmax") -> Image.Image:
    """Open an image file fully as RGB, refusing missing, corrupt and oversized files with a clear message.

    - EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`): boxes are taken on the image as
      every viewer and annotation tool displays it, not as its bytes are stored.
    - Single-channel 16-bit, 32-bit and float images (PNG/TIFF exports of CT, MR, X-ray) are windowed to
      8 bits with ``window`` (``minmax`` or ``percentile``, see :func:`window_to_uint8`) instead of being
      clipped at 255. 8-bit and RGB images are unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageLoadError(
                    f"image {path} is {width}x{height}, above the {MAX_IMAGE_PIXELS:,}-pixel limit; downsample it first"
                )
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image), window)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def safe_join(root: str | os.PathLike[str], relative: str) -> Path:
    """Join ``relative`` under ``root``, refusing absolute paths and ``..`` escapes.

    >>> safe_join("/data", "images/a.png").as_posix()
    '/data/images/a.png'
    """
    from medeyes_env.errors import UnsafePathError

    root_path = Path(root).resolve()
    if "\x00" in relative:
        raise UnsafePathError(f"path {relative!r} contains a NUL byte")
    if Path(relative).is_absolute():
        raise UnsafePathError(f"path {relative!r} is absolute; dataset files must be relative to {root_path}")
    joined = (root_path / relative).resolve()
    if joined != root_path and root_path not in joined.parents:
        raise UnsafePathError(f"path {relative!r} escapes the dataset directory {root_path}")
    return joined
