"""Pictures of cases: a grid of images with their gold boxes and shapes and a caption, for docs and quick looks."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw

from medeyes_env import views
from medeyes_env.cases import Case


def case_tile(case: Case, size: int = 320, caption_lines: int = 4) -> Image.Image:
    """One case: the letterboxed image with gold boxes (green) and their shapes (amber) above a caption."""
    image = case.load_image()
    view = views.letterbox(image, size)
    boxes = views.to_letterbox([region.box for region in case.regions], image.size, size)
    view = views.draw_boxes(view, boxes, [views.GOLD_COLOUR], labels=[r.label for r in case.regions])
    shapes = [region.shape for region in case.regions if region.shape is not None]
    if shapes:
        scale, offset = views.letterbox_transform(image.size, size)
        view = views.draw_shapes(view, shapes, scale, offset, width=1 if scale < 0.5 else 2)
    line_height = 12
    tile = Image.new("RGB", (size, size + caption_lines * line_height + 6), (20, 20, 20))
    tile.paste(view, (0, 0))
    text = f"{case.question} -> {case.answer}"
    wrapped = textwrap.wrap(text, width=max(20, size // 6))[:caption_lines]
    draw = ImageDraw.Draw(tile)
    for index, line in enumerate(wrapped):
        draw.text((4, size + 3 + index * line_height), line, fill=(235, 235, 235))
    return tile


def case_gallery(cases: Sequence[Case], tile_size: int = 320, columns: int = 3) -> Image.Image:
    """A grid of :func:`case_tile` pictures."""
    if not cases:
        raise ValueError("case_gallery needs at least one case")
    tiles = [case_tile(case, tile_size) for case in cases]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    width, height = tiles[0].size
    grid = Image.new("RGB", (columns * (width + 4), rows * (height + 4)), (0, 0, 0))
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        grid.paste(tile, (column * (width + 4), row * (height + 4)))
    return grid
