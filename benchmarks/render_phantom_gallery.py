"""Regenerate ``docs/phantom_cases.png``: nine phantom cases, three per modality, with gold boxes and captions.

    python benchmarks/render_phantom_gallery.py [--out docs/phantom_cases.png] [--tile 400]

Cases are the first ones of the test split (medium preset) that match each
wanted description, so the picture changes only when the generator does. Next
to the gallery it writes ``..._crops.png``: each small lesion as the 256 px
overview shows it and as a 192 px drill crop shows it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from medeyes_env import views
from medeyes_env.cases import Case
from medeyes_env.gallery import case_gallery
from medeyes_env.sources.phantom.config import PRESETS
from medeyes_env.sources.phantom.source import PhantomSource

WANTED = [
    ("xray", lambda c: c.meta["finding"] == "lung nodule" and c.meta["stratum"] == "small"),
    ("xray", lambda c: c.meta["finding"] == "pleural effusion"),
    ("xray", lambda c: c.meta["finding"] == "pneumothorax"),
    ("mri", lambda c: c.meta["stratum"] == "large"),
    ("mri", lambda c: c.meta["family"] == "count" and c.answer == "2"),
    ("mri", lambda c: c.meta["family"] == "presence" and c.answer == "no"),
    ("ct", lambda c: c.meta["family"] == "size" and c.answer == "medium"),
    ("ct", lambda c: c.meta["family"] == "organ" and c.answer != "liver"),
    ("ct", lambda c: c.meta["family"] == "location" and c.meta["stratum"] == "small"),
]


def pick_cases(source: PhantomSource, limit: int = 3000) -> list[Case]:
    """The first test case matching each entry of :data:`WANTED`."""
    chosen: list[Case | None] = [None] * len(WANTED)
    for index in range(limit):
        case = source.case("test", index)
        for slot, (modality, wanted) in enumerate(WANTED):
            if chosen[slot] is None and case.modality == modality and wanted(case):
                chosen[slot] = case
                break
        if all(chosen):
            break
    return [case for case in chosen if case is not None]


def crops_strip(cases: list[Case], size: int = 256) -> Image.Image:
    """For each case with a small lesion: its overview and a 192 px drill crop, side by side."""
    pairs = []
    for case in cases:
        small = [r for r in case.regions if (r.box[2] - r.box[0]) <= 24]
        if not small:
            continue
        image = case.load_image()
        x1, y1, x2, y2 = small[0].box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        crop, _ = views.drill_view(image, (cx - 96, cy - 96, cx + 96, cy + 96), size, 96)
        pairs.append((views.overview(image, size), crop, case))
    strip = Image.new("RGB", (2 * size + 4, len(pairs) * (size + 18)), (20, 20, 20))
    draw = ImageDraw.Draw(strip)
    for row, (overview, crop, case) in enumerate(pairs):
        top = row * (size + 18)
        strip.paste(overview, (0, top))
        strip.paste(crop, (size + 4, top))
        draw.text((4, top + size + 3), f"{case.id}: overview 256 px | drill 192 px -> 256 px", fill=(235, 235, 235))
    return strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_cases.png"))
    parser.add_argument("--tile", type=int, default=400, help="tile side in pixels")
    args = parser.parse_args()
    cases = pick_cases(PhantomSource(PRESETS["medium"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    case_gallery(cases, tile_size=args.tile, columns=3).save(args.out, optimize=True)
    crops_path = args.out.with_name(args.out.stem + "_crops.png")
    crops_strip(cases).save(crops_path, optimize=True)
    print(f"wrote {args.out} and {crops_path}: " + ", ".join(case.id for case in cases))


if __name__ == "__main__":
    main()
