"""What the environment shows: overviews, drill zooms, scan montages, and boxes drawn on images.

All boxes are ``xyxy`` in pixels of the original image. Every view is a square
RGB image of ``size`` pixels, so the observation space has one fixed shape;
non-square content is letterboxed (padded), never squashed, because the Idefics3
processor squashes whatever it gets to a square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from medeyes_env.cases import Box
from medeyes_env.rewards import box_iou
from medeyes_env.shapes import Shape

SCAN_COLOURS = ((255, 196, 0), (0, 200, 255), (255, 80, 200), (120, 255, 120), (255, 120, 60))
DRILL_COLOUR = (255, 60, 60)
GOLD_COLOUR = (60, 255, 90)
SHAPE_COLOUR = (255, 200, 40)
"""Outline of a gold region's exact shape, drawn inside its (green) box."""


def clamp_box(box: Sequence[float], image_size: tuple[int, int]) -> Box:
    """Clamp ``box`` to the image; the result may be empty if the box lay outside.

    >>> clamp_box((-10, 5, 50, 500), (100, 100))
    (0.0, 5.0, 50.0, 100.0)
    """
    width, height = float(image_size[0]), float(image_size[1])
    x1, y1, x2, y2 = map(float, box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def expand_to_min_side(box: Sequence[float], min_side: float, image_size: tuple[int, int]) -> Box:
    """Grow ``box`` about its centre so both sides are at least ``min_side``, shifted to stay inside the image.

    A zoom on a 3-pixel box would show interpolation artefacts, not anatomy, so
    drills always look at a region of at least ``min_side`` original pixels.

    >>> expand_to_min_side((95, 10, 99, 14), 20, (100, 100))
    (80.0, 2.0, 100.0, 22.0)
    """
    width, height = float(image_size[0]), float(image_size[1])
    x1, y1, x2, y2 = clamp_box(box, image_size)
    nx1, nx2 = _expand_side(x1, x2, min_side, width)
    ny1, ny2 = _expand_side(y1, y2, min_side, height)
    return (nx1, ny1, nx2, ny2)


def _expand_side(low: float, high: float, min_side: float, limit: float) -> tuple[float, float]:
    side = min(max(high - low, min_side), limit)
    centre = (low + high) / 2
    low = min(max(centre - side / 2, 0.0), limit - side)
    return low, low + side


def to_letterbox(boxes: Sequence[Sequence[float]], image_size: tuple[int, int], size: int) -> list[Box]:
    """Map boxes in original pixels onto a ``size`` square letterboxed view of the whole image.

    >>> to_letterbox([(0, 0, 100, 50)], (200, 100), 100)
    [(0.0, 25.0, 50.0, 50.0)]
    """
    width, height = image_size
    scale = size / max(width, height)
    offset_x, offset_y = (size - width * scale) / 2, (size - height * scale) / 2
    return [
        (x1 * scale + offset_x, y1 * scale + offset_y, x2 * scale + offset_x, y2 * scale + offset_y)
        for x1, y1, x2, y2 in boxes
    ]


def draw_shapes(
    image: Image.Image,
    shapes: Sequence[Shape],
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    colour: tuple[int, int, int] = SHAPE_COLOUR,
    width: int = 2,
) -> Image.Image:
    """Return a copy of ``image`` with every ring of ``shapes`` outlined, original pixels mapped by scale, offset.

    For a letterboxed view of the whole image, :func:`letterbox_transform` gives ``scale`` and ``offset``.

    >>> from medeyes_env.shapes import disc_shape
    >>> drawn = draw_shapes(Image.new("RGB", (40, 40)), [disc_shape(20.0, 20.0, 10.0)])
    >>> drawn.getpixel((30, 20)), drawn.getpixel((20, 20))
    ((255, 200, 40), (0, 0, 0))
    """
    image = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(image)
    dx, dy = offset
    for shape in shapes:
        for polygon in shape.polygons:
            for ring in polygon:
                draw.line([(x * scale + dx, y * scale + dy) for x, y in ring], fill=colour, width=width, joint="curve")
    return image


def letterbox_transform(image_size: tuple[int, int], size: int) -> tuple[float, tuple[float, float]]:
    """``(scale, (offset_x, offset_y))`` that map original pixels onto a ``size`` square letterboxed view.

    >>> letterbox_transform((200, 100), 100)
    (0.5, (0.0, 25.0))
    """
    width, height = image_size
    scale = size / max(width, height)
    return scale, ((size - width * scale) / 2, (size - height * scale) / 2)


def mirrored_boxes(boxes: Sequence[Box], width: float, min_iou: float = 0.1) -> list[Box]:
    """The left-right mirror of each box, leaving out a mirror that overlaps any of ``boxes`` (IoU > ``min_iou``).

    What a reader who compares both sides looks at besides a finding: the same place on the other side.
    """
    mirrored = [(width - x2, y1, width - x1, y2) for x1, y1, x2, y2 in boxes]
    return [m for m in mirrored if not any(box_iou(m, b) > min_iou for b in boxes)]


def letterbox(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Resize ``image`` to fit a ``size`` x ``size`` square, padding with black, aspect ratio kept."""
    return zoom(image, (0, 0, image.width, image.height), size, resample)


def zoom(
    image: Image.Image,
    box: Sequence[float],
    size: int,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Return the region ``box`` of ``image`` resized into a ``size`` square, letterboxed.

    Cropping and resizing happen in one PIL call (``resize(box=...)``). ``resample`` is
    the filter for magnifying; shrinking a region larger than the view always averages
    areas (BOX), so nothing aliases whichever filter magnifies.
    """
    x1, y1, x2, y2 = box
    box_w, box_h = x2 - x1, y2 - y1
    scale = size / max(box_w, box_h)
    out_w, out_h = max(1, round(box_w * scale)), max(1, round(box_h * scale))
    if scale < 1:
        resample = Image.Resampling.BOX
    resized = image.resize((out_w, out_h), resample, box=(x1, y1, x2, y2))
    if (out_w, out_h) == (size, size):
        return resized
    canvas = Image.new(resized.mode, (size, size))
    canvas.paste(resized, ((size - out_w) // 2, (size - out_h) // 2))
    return canvas


def overview(image: Image.Image, size: int) -> Image.Image:
    """The whole image downsampled to a ``size`` square: the policy's first view.

    Downsampling uses a box filter (area average), as a radiologist's thumbnail
    would; small findings fade into the background at this scale on purpose.
    """
    return letterbox(image, size, Image.Resampling.BOX)


def drill_view(
    image: Image.Image,
    box: Sequence[float],
    size: int,
    min_side: float,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> tuple[Image.Image, Box]:
    """Zoom into one region at full resolution; returns the view and the box actually shown."""
    shown = expand_to_min_side(box, min_side, image.size)
    return zoom(image, shown, size, resample), shown


def scan_view(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    size: int,
    min_side: float,
    mode: str = "montage",
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    detail: str = "overview",
) -> tuple[Image.Image, list[Box]]:
    """Show several candidate regions at once; returns the view and the boxes shown.

    ``montage``: a grid of the regions' crops, each framed in its colour and numbered,
    so a small model can compare candidates side by side (FEASIBILITY.md: localisation
    as a choice, not a regression). ``outline``: the overview with the regions outlined
    and numbered.

    ``detail`` bounds what a montage tile may show. ``overview`` (the split the method
    relies on): each tile is cut from the overview, so a scan shows no detail the first
    view did not, whatever the number of boxes; a lesion and a lookalike that differ only
    at full resolution look alike, and only a drill tells them apart. ``full``: tiles are
    zoomed from the original image, so a scan of one small box is a drill in all but name.
    """
    shown = [expand_to_min_side(box, min_side, image.size) for box in boxes]
    if mode == "outline":
        view = overview(image, size)
        scaled = to_letterbox(boxes, image.size, size)
        return draw_boxes(view, scaled, colours=SCAN_COLOURS, numbered=True), shown
    if mode != "montage":
        raise ValueError(f"scan mode must be 'montage' or 'outline', got {mode!r}")
    if detail not in ("overview", "full"):
        raise ValueError(f"scan detail must be 'overview' or 'full', got {detail!r}")
    source, cut = image, shown
    if detail == "overview":
        source, cut = overview(image, size), to_letterbox(shown, image.size, size)
    columns = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / columns)
    tile = size // max(columns, rows)
    canvas = Image.new("RGB", (size, size))
    for index, box in enumerate(cut):
        row, column = divmod(index, columns)
        tile_image = zoom(source, box, tile, resample)
        tile_image = draw_boxes(tile_image, [(0, 0, tile - 1, tile - 1)], colours=[SCAN_COLOURS[index % 5]])
        ImageDraw.Draw(tile_image).text((3, 1), str(index + 1), fill=SCAN_COLOURS[index % 5])
        canvas.paste(tile_image, (column * tile + (size - columns * tile) // 2, row * tile + (size - rows * tile) // 2))
    return canvas, shown


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    colours: Sequence[tuple[int, int, int]] = (DRILL_COLOUR,),
    width: int = 2,
    numbered: bool = False,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """Return a copy of ``image`` with ``boxes`` outlined (colours cycle); optional numbers or labels.

    Boxes are clamped to just outside the canvas first: PIL's time grows with the coordinates (about 14 s
    for one rectangle at 2e9), and a recorded box may hold anything. A box with a non-finite coordinate is
    not drawn; an inverted one is drawn with its corners sorted.

    >>> draw_boxes(Image.new("RGB", (8, 8)), [(1e308, -1e308, 2, 3), (float("nan"), 0, 1, 1)]).size
    (8, 8)
    """
    image = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(image)
    margin = width + 1
    for index, box in enumerate(boxes):
        colour = colours[index % len(colours)]
        if not all(math.isfinite(v) for v in box):
            continue
        xs = sorted(min(max(float(v), -margin), image.width + margin) for v in (box[0], box[2]))
        ys = sorted(min(max(float(v), -margin), image.height + margin) for v in (box[1], box[3]))
        x1, y1, x2, y2 = xs[0], ys[0], xs[1], ys[1]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = labels[index] if labels is not None else (str(index + 1) if numbered else None)
        if text:
            draw.text((x1 + 3, max(y1 - 12, 0)), text, fill=colour)
    return image
