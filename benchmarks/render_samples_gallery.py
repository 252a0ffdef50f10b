"""Render docs/samples_cases.png: every image of the ``samples`` source with its gold boxes and questions.

Run: python benchmarks/render_samples_gallery.py [--out docs/samples_cases.png]
Prints one table row per image (file, split, size, cases, gold boxes).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from medeyes_env.sources import iter_cases, open_source

TILE = 300
CAPTION_LINES = 7
LINE_HEIGHT = 12
GOLD = (40, 220, 90)


def tile(
    image: Image.Image, boxes: list[tuple[float, float, float, float]], caption: list[str]
) -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    """The letterboxed image with its caption, and the gold boxes in tile coordinates (drawn later)."""
    scale = TILE / max(image.size)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    out = Image.new("RGB", (TILE, TILE + CAPTION_LINES * LINE_HEIGHT + 8), (18, 18, 18))
    offset = ((TILE - shown.width) // 2, (TILE - shown.height) // 2)
    out.paste(shown, offset)
    draw = ImageDraw.Draw(out)
    rects = [
        (offset[0] + x1 * scale, offset[1] + y1 * scale, offset[0] + x2 * scale, offset[1] + y2 * scale)
        for x1, y1, x2, y2 in boxes
    ]
    lines = [wrapped for text in caption for wrapped in textwrap.wrap(text, width=TILE // 6)][:CAPTION_LINES]
    for index, line in enumerate(lines):
        draw.text((4, TILE + 4 + index * LINE_HEIGHT), line, fill=(235, 235, 235))
    return out, rects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/samples_cases.png"))
    parser.add_argument("--columns", type=int, default=3)
    args = parser.parse_args()

    source = open_source("samples:all")
    by_image: dict[str, list] = {}
    for case in iter_cases(source, "test"):
        by_image.setdefault(str(case.meta["file"]), []).append(case)
    tiles, rects = [], []
    print(f"{'file':28s} {'split':10s} {'size':>10s} {'cases':>5s}  gold boxes (xyxy)")
    for file, cases in by_image.items():
        image = cases[0].load_image()
        boxes = sorted({region.box for case in cases for region in case.regions})
        caption = [f"{file} [{cases[0].meta['home_split']}]"] + [f"Q: {c.question} A: {c.answer}" for c in cases]
        picture, boxes_in_tile = tile(image, boxes, caption)
        tiles.append(picture)
        rects.append(boxes_in_tile)
        size = f"{image.width}x{image.height}"
        print(f"{file:28s} {cases[0].meta['home_split']!s:10s} {size:>10s} {len(cases):5d}  {boxes}")
    rows = (len(tiles) + args.columns - 1) // args.columns
    sheet = Image.new("RGB", (args.columns * TILE, rows * tiles[0].height), (0, 0, 0))
    for index, picture in enumerate(tiles):
        sheet.paste(picture, ((index % args.columns) * TILE, (index // args.columns) * picture.height))
    # A palette image keeps the picture small enough for the repository (about a third of RGB); the gold
    # colour gets its own palette entry so that quantisation cannot wash the boxes out.
    paletted = sheet.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    palette = paletted.getpalette() or []
    palette = palette[: 255 * 3] + [0] * max(0, 255 * 3 - len(palette)) + list(GOLD)
    paletted.putpalette(palette)
    draw = ImageDraw.Draw(paletted)
    for index, boxes_in_tile in enumerate(rects):
        dx, dy = (index % args.columns) * TILE, (index // args.columns) * tiles[0].height
        for x1, y1, x2, y2 in boxes_in_tile:
            draw.rectangle((dx + x1, dy + y1, dx + x2, dy + y2), outline=255, width=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    paletted.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
