"""The one data model every source yields: :class:`Case`, :class:`Region`, :class:`AnswerType`.

Boxes are ``xyxy`` in pixels of the ORIGINAL image, top-left origin, floats allowed.
A region may also carry its exact outline (:class:`~medeyes_env.shapes.Shape`, a polygon in the same pixels).
Sources convert other conventions (``xywh``, normalised coordinates) once, at
their boundary, with :func:`xywh_to_xyxy`; nothing downstream converts again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import IO, Literal

import numpy as np
from PIL import Image, ImageMode, ImageOps
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from medeyes_env.errors import CaseError, ImageLoadError
from medeyes_env.shapes import COORD_DECIMALS, Shape

Box = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` in pixels of the original image, ``x1 < x2`` and ``y1 < y2``."""

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

MAX_IMAGE_PIXELS = 64_000_000
"""Images larger than this are refused (decompression-bomb guard, about 8000 x 8000)."""
MAX_DECODED_BYTES = 3 * MAX_IMAGE_PIXELS
"""Images whose pixels take more bytes than this once decoded are refused, read from the header: an 8-bit RGB
image at the pixel limit. A 16-bit grey image may have 64 Mpx, a float or 32-bit one 48 Mpx, 8-bit RGBA 48 Mpx."""
WINDOW_CHUNK_PIXELS = 1 << 20
"""Pixels windowed to 8 bits at a time (8 MB as float64): a high-bit-depth image is never copied whole."""


class AnswerType(str, Enum):
    """How an answer is matched against the gold answer."""

    CLOSED = "closed"
    """yes / no."""
    CHOICE = "choice"
    """One of ``Case.options``; answered by letter or by option text."""
    OPEN = "open"
    """A short free-text answer, matched after normalisation."""


class Region(BaseModel):
    """A gold region: a box in pixels of the original image, what it shows, and its exact shape when known.

    The box is what the model sees and answers in; ``shape`` (a polygon from a mask or from known geometry)
    is what the scores compare a box against when present. Built from a shape alone, the box is its bounds.

    >>> from medeyes_env.shapes import disc_shape
    >>> Region(shape=disc_shape(20.0, 20.0, 5.0), label="nodule").box
    (15.0, 15.0, 25.0, 25.0)
    """

    model_config = ConfigDict(frozen=True)

    box: Box = Field(description="xyxy pixels of the original image")
    label: str = Field(default="abnormality", description="What the region shows, e.g. 'nodule'.")
    shape: Shape | None = Field(
        default=None,
        description="The region's exact outline (polygon or multipolygon, original-image pixels) inside its box; "
        "None when the source has only the box.",
    )

    @model_validator(mode="before")
    @classmethod
    def _box_from_shape(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("box") is None and data.get("shape") is not None:
            shape = data["shape"]
            shape = shape if isinstance(shape, Shape) else Shape.model_validate(shape)
            return {**data, "box": shape.bounds, "shape": shape}
        return data

    @field_validator("box")
    @classmethod
    def _box_is_ordered(cls, box: Box) -> Box:
        x1, y1, x2, y2 = box
        if not (x2 > x1 and y2 > y1):
            raise ValueError(f"box {list(box)} is not xyxy with x2 > x1 and y2 > y1; convert xywh with xywh_to_xyxy")
        return box

    @model_validator(mode="after")
    def _shape_inside_box(self) -> Region:
        if self.shape is not None:
            x1, y1, x2, y2 = self.box
            sx1, sy1, sx2, sy2 = self.shape.bounds
            slack = 10.0**-COORD_DECIMALS  # a shape's coordinates are rounded to this
            if sx1 < x1 - slack or sy1 < y1 - slack or sx2 > x2 + slack or sy2 > y2 + slack:
                raise ValueError(
                    f"region {self.label!r}: its shape spans {[sx1, sy1, sx2, sy2]}, outside its box {list(self.box)}; "
                    "leave the box out to take the shape's bounds"
                )
        return self


def _inside(bounds: Box, width: int, height: int) -> bool:
    x1, y1, x2, y2 = bounds
    return x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height


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
            for region in (*self.regions, *self.lookalikes):
                if region.shape is not None and not _inside(region.shape.bounds, width, height):
                    raise ValueError(
                        f"case {self.id!r}: the shape of region {region.label!r} spans "
                        f"{[round(v, 3) for v in region.shape.bounds]}, outside the {width}x{height} image; "
                        "clip it to the image (shapely intersection with box(0, 0, width, height))"
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
    rows = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
    step = max(1, WINDOW_CHUNK_PIXELS // max(rows.shape[1], 1))
    gray = _window_strips(
        lambda: (rows[t : t + step] for t in range(0, len(rows), step)), rows.shape, window, nominal_max
    )
    return gray.reshape(values.shape)


_Strips = Callable[[], Iterator[np.ndarray]]
"""A fresh pass over an image's rows, a few at a time: 2-D arrays of its own dtype, top to bottom."""


def _window_strips(strips: _Strips, shape: tuple[int, int], window: str, nominal_max: float) -> np.ndarray:
    """:func:`window_to_uint8` over ``strips``: memory is the uint8 result plus one strip as float64.

    Two passes (the window, then the scaling); ``percentile`` also holds one copy of the finite values.
    """
    out = np.zeros(shape, dtype=np.uint8)
    limits = _percentile_window(strips, shape) if window == "percentile" else _minmax_window(strips)
    if limits is None:
        return out
    low, high = limits
    if high <= low:  # flat: show its level within the type's nominal range
        low, high = 0.0, max(nominal_max, high)
    top = 0
    for strip in strips():
        chunk = strip.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            np.clip(chunk, low, high, out=chunk)
            chunk -= low
            chunk *= 255.0 / (high - low)
            np.rint(chunk, out=chunk)
        out[top : top + len(strip)] = np.nan_to_num(chunk, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        top += len(strip)
    return out


def _minmax_window(strips: _Strips) -> tuple[float, float] | None:
    """The lowest and highest finite value, or None when there is none."""
    low, high = np.inf, -np.inf
    for strip in strips():
        if np.issubdtype(strip.dtype, np.floating):
            finite = np.isfinite(strip)
            low = min(low, float(strip.min(where=finite, initial=np.inf)))
            high = max(high, float(strip.max(where=finite, initial=-np.inf)))
        elif strip.size:  # integers are all finite
            low, high = min(low, float(strip.min())), max(high, float(strip.max()))
    return (low, high) if low <= high else None


def _percentile_window(strips: _Strips, shape: tuple[int, int]) -> tuple[float, float] | None:
    """The 0.5th and 99.5th percentiles of the finite values (one copy of them), or None when there is none."""
    kept: np.ndarray | None = None
    count = 0
    for strip in strips():
        finite = strip[np.isfinite(strip)] if np.issubdtype(strip.dtype, np.floating) else strip.ravel()
        kept = np.empty(shape[0] * shape[1], finite.dtype) if kept is None else kept
        kept[count : count + finite.size] = finite
        count += finite.size
    if kept is None or count == 0:
        return None
    low, high = np.percentile(kept[:count], PERCENTILE_WINDOW, overwrite_input=True)
    return float(low), float(high)


def decode_8bit(opened: Image.Image, what: str, window: str) -> Image.Image:
    """Decode an image just opened (header read) into 8-bit pixels, as :func:`load_image_file` describes.

    Refuses it first with :func:`check_image_size`; applies EXIF orientation; windows single-channel 16-bit,
    32-bit and float images to ``L`` a strip of rows at a time (:data:`WINDOW_CHUNK_PIXELS`), never copying
    them whole; other modes come back as decoded. The caller converts to RGB after dropping ``opened``, so
    the decoded high-bit-depth pixels and the RGB copy are never held together.
    """
    check_image_size(opened, what)
    opened.load()
    ImageOps.exif_transpose(opened, in_place=True)  # not a copy (which exif_transpose makes even when upright)
    if not (opened.mode in ("I", "F") or opened.mode.startswith("I;16")):
        return opened
    nominal = 65535.0 if opened.mode.startswith("I;16") else 255.0
    width, height = opened.size
    step = max(1, WINDOW_CHUNK_PIXELS // max(width, 1))

    def strips() -> Iterator[np.ndarray]:
        return (np.asarray(opened.crop((0, t, width, min(t + step, height)))) for t in range(0, height, step))

    return Image.fromarray(_window_strips(strips, (height, width), window, nominal))


def decoded_bytes(image: Image.Image) -> int:
    """Bytes of ``image``'s pixels once decoded (pixels x bands x bytes a sample), from its header alone.

    >>> decoded_bytes(Image.new("I;16", (10, 10))), decoded_bytes(Image.new("RGB", (10, 10)))
    (200, 300)
    """
    mode = ImageMode.getmode(image.mode)
    return image.width * image.height * len(mode.bands) * np.dtype(mode.typestr).itemsize


def check_image_size(image: Image.Image, what: str) -> None:
    """Refuse an opened, not yet decoded image over :data:`MAX_IMAGE_PIXELS` or :data:`MAX_DECODED_BYTES`.

    ``what`` names it in the message, e.g. ``image /data/a.png``.
    """
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"{what} is {width}x{height}, above the {MAX_IMAGE_PIXELS:,}-pixel limit; downsample it first"
        )
    size = decoded_bytes(image)
    if size > MAX_DECODED_BYTES:
        per_pixel = size // (width * height)
        raise ImageLoadError(
            f"{what} is {width}x{height} {image.mode} ({per_pixel} bytes a pixel): {size:,} bytes decoded, above "
            f"the {MAX_DECODED_BYTES:,}-byte limit; downsample it or convert it to 8 bits first"
        )


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
    opened = open_image(path, f"image {path}")
    try:
        image = decode_8bit(opened, f"image {path}", window)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc
    del opened  # frees the decoded pixels of a high-bit-depth image before the RGB copy is made
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(source: str | os.PathLike[str] | IO[bytes], what: str) -> Image.Image:
    """Open an image and decode its pixels as stored, refusing it from its header first (the one bounded open).

    Over :data:`MAX_IMAGE_PIXELS` or :data:`MAX_DECODED_BYTES` (:func:`check_image_size`) or unreadable, it is an
    :class:`ImageLoadError` naming ``what`` (e.g. ``image /data/a.png``): ``cannot read {what}: {reason}``. No
    EXIF turn, no windowing: :func:`load_image_file` adds those for dataset images; stored trajectory views and
    served PNGs are read as they are.
    """
    try:
        with Image.open(source) as opened:
            check_image_size(opened, what)  # pixels and decoded bytes, from the header: before decoding
            opened.load()
            return opened
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read {what}: {exc}") from exc


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
