"""Render one phantom episode as a picture: overview, scan montage, drill zoom, and render() with boxes.

Writes docs/env_episode.png. Run: ``python scripts/render_env_episode.py [--out PATH] [--index N]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from medeyes_env.env import MedEyesEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/env_episode.png"))
    parser.add_argument("--index", type=int, default=None, help="test-split case index (default: first small nodule)")
    args = parser.parse_args()
    env = MedEyesEnv("phantom", split="test", render_mode="rgb_array")
    index = args.index
    if index is None:  # the first chest case with one small nodule and a presence question
        index = next(
            i
            for i in range(500)
            if (c := env.source.case("test", i)).meta.get("family") == "presence"
            and c.meta.get("stratum") == "small"
            and c.modality == "xray"
        )
    obs, _ = env.reset(options={"case_index": index})
    case = env.case
    lesion = case.regions[0].box
    cx, cy = (lesion[0] + lesion[2]) / 2, (lesion[1] + lesion[3]) / 2
    decoy = (env.image.width - cx - 100, cy - 100, env.image.width - cx + 100, cy + 100)
    near = (cx - 70, cy - 90, cx + 130, cy + 110)
    frames = [("1. overview (reset)", obs["image"])]
    scan = {"name": "scan", "boxes": [[round(v) for v in decoy], [round(v) for v in near]]}
    obs, *_ = env.step(f"<reasoning>Compare both mid zones.</reasoning><action>{json.dumps(scan)}</action>")
    frames.append(("2. scan: two regions", obs["image"]))
    drill = {"name": "drill", "box": [round(v) for v in (cx - 40, cy - 40, cx + 40, cy + 40)]}
    obs, *_ = env.step(f"<reasoning>Region 2 has a round density.</reasoning><action>{json.dumps(drill)}</action>")
    frames.append(("3. drill: zoomed region", obs["image"]))
    *_, info = env.step("<reasoning>A well-defined nodule.</reasoning><answer>yes</answer>")
    rendered = Image.fromarray(env.render()).resize((256, 256))
    frames.append(("4. render(): gold green, drill red", rendered))
    tile = 256
    sheet = Image.new("RGB", (len(frames) * (tile + 6), tile + 40), (15, 15, 15))
    draw = ImageDraw.Draw(sheet)
    for i, (title, frame) in enumerate(frames):
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
        sheet.paste(image, (i * (tile + 6), 0))
        draw.text((i * (tile + 6) + 4, tile + 4), title, fill=(230, 230, 230))
    reward = info["reward_total"]
    caption = f"{case.id}: {case.question} gold={case.answer}  reward={reward:.3f}"
    draw.text((4, tile + 22), caption, fill=(180, 220, 180))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
