"""Opening 100k-row fixtures of the new dataset layouts: time, memory, and that no image is decoded.

Builds, in a temporary directory, a Hugging Face VQA-RAD parquet export (images as bytes), an MMMU subject,
OmniMedVQA, NIH ChestX-ray14 and VinDr-CXR annotation files, each with ``--rows`` questions or box rows.
Each source is opened in a fresh subprocess (so peak RSS is its own) and the table prints: seconds to open,
microseconds per row, RSS growth (the memory the open source holds), cases, images decoded
while opening (counted by wrapping ``PIL.Image.Image.load``), and the time to load the first case's image.
Run: python benchmarks/layouts_open_speed.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(root: Path, rows: int) -> dict[str, str]:
    """Write every layout under ``root``; returns ``{layout: spec}``."""
    sys.path.insert(0, str(ROOT))
    from tests.layouts import gray_png, hf_vqa, mmmu_rows, png_bytes, write_parquet

    image = png_bytes(0)
    hf_vqa(root / "vqa_rad", {"test": [(f"Is there a lesion? ({i})", "yes") for i in range(rows)]}, image_bytes=image,
           row_group_size=1000)  # fmt: skip
    columns = mmmu_rows(rows, "Clinical_Medicine")
    columns["image_1"] = [{"bytes": image, "path": None}] * rows
    write_parquet(root / "mmmu" / "Clinical_Medicine" / "validation-00000-of-00001.parquet", columns,
                  tuple(f"image_{k}" for k in range(1, 8)), row_group_size=1000)  # fmt: skip
    _omnimed(root / "omni", rows)
    images = max(1, rows // 20)  # 20 box rows per image, as VinDr's readers and findings add up
    nih = root / "nih"
    for k in range(images):
        gray_png(nih / "images_001" / "images" / f"{k:08d}_000.png", (64, 64))
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    lines += [f"{i % images:08d}_000.png,Nodule,{i % 40},{i % 30},8,8,,," for i in range(rows)]
    (nih / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    vindr = root / "vindr"
    for k in range(images):
        gray_png(vindr / "train" / f"img{k}.png", (64, 64))
    lines = ["image_id,rad_id,class_name,x_min,y_min,x_max,y_max,class_id"]
    lines += [
        f"img{i % images},R{i % 3},Nodule/Mass,{i % 40},{i % 30},{i % 40 + 9},{i % 30 + 9},8" for i in range(rows)
    ]
    (vindr / "annotations_train.csv").write_text("\n".join(lines) + "\n")
    return {
        "vqa_rad_hf": f"vqa_rad_hf:{root / 'vqa_rad'}",
        "mmmu": f"mmmu:{root / 'mmmu'}",
        "omnimedvqa": f"omnimedvqa:{root / 'omni'}",
        "nih_cxr": f"nih_cxr:{nih}",
        "vindr_cxr": f"vindr_cxr:{vindr}",
    }


def _omnimed(root: Path, rows: int) -> None:
    from tests.layouts import png_bytes

    (root / "Images" / "Demo").mkdir(parents=True)
    (root / "Images" / "Demo" / "0.png").write_bytes(png_bytes(0))
    record = {"question": "What modality?", "gt_answer": "CT", "option_A": "MRI", "option_B": "CT",
              "image_path": "Images/Demo/0.png", "modality_type": "CT", "dataset": "Demo"}  # fmt: skip
    (root / "QA_information" / "Open-access").mkdir(parents=True)
    (root / "QA_information" / "Open-access" / "Demo.json").write_text(json.dumps([record] * rows))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(spec: str) -> dict[str, float]:
    """Open ``spec`` in this process and measure (run in a subprocess by :func:`main`)."""
    from PIL import Image

    import medeyes_env.sources.cxr
    import medeyes_env.sources.parquet  # noqa: F401 - both loaded before the baseline
    from medeyes_env.sources import open_source
    from medeyes_env.sources.parquet_files import pyarrow_parquet

    pyarrow_parquet()
    decoded = 0
    load = Image.Image.load

    def counting_load(self: Image.Image) -> object:
        nonlocal decoded
        decoded += 1
        return load(self)

    Image.Image.load = counting_load  # type: ignore[method-assign]
    before = _rss_mb()
    start = time.perf_counter()
    source = open_source(spec)
    opened = time.perf_counter() - start
    grown = _rss_mb() - before  # what the open source holds (its rows), not transient peaks
    decoded_opening = decoded
    split = next(s for s in ("test", "validation", "train") if source.size(s))
    cases = sum(source.size(s) or 0 for s in ("train", "validation", "test"))
    start = time.perf_counter()
    source.case(split, 0).load_image()
    first_image_ms = (time.perf_counter() - start) * 1000
    return {"open_s": opened, "rss_mb": grown, "cases": cases, "decoded": decoded_opening, "image_ms": first_image_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as folder:
        specs = build(Path(folder), args.rows)
        print(f"{'layout':11s} {'rows':>7s} {'open s':>7s} {'us/row':>7s} {'RSS +MB':>12s} {'cases':>7s} "
              f"{'decoded':>7s} {'1st image ms':>12s}")  # fmt: skip
        for layout, spec in specs.items():
            done = subprocess.run([sys.executable, __file__, "--measure", spec], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{layout}: {done.stderr[-2000:]}")
            m = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{layout:11s} {args.rows:7d} {m['open_s']:7.2f} {m['open_s'] / args.rows * 1e6:7.1f} "
                  f"{m['rss_mb']:12.1f} {m['cases']:7d} {m['decoded']:7d} {m['image_ms']:12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
