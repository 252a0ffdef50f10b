"""How long opening a large file-based source takes, and how much memory its rows hold.

Writes a synthetic PMC-VQA CSV (every row pointing at one tiny image) to a temporary
directory, opens it with ``open_source("pmc_vqa:...")`` and prints a table.
Run: python benchmarks/sources_open_speed.py [--rows 150000]
"""

from __future__ import annotations

import argparse
import csv
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

from medeyes_env.sources import open_source

HEADER = ["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=150_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        Image.new("L", (8, 8)).save(root / "images/PMC1_F1.jpg")
        with (root / "train.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HEADER)
            for index in range(args.rows):
                question = f"What is shown in panel {index}?"
                writer.writerow([index, "PMC1_F1.jpg", question, "CT", "A:CT", "B:MRI", "C:X-ray", "D:PET", "A"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        source = open_source(f"pmc_vqa:{root}")
        opened = time.perf_counter() - start
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        start = time.perf_counter()
        n_cases = min(10_000, args.rows)
        for index in range(n_cases):
            source.case("train", index)
        per_case_us = (time.perf_counter() - start) / n_cases * 1e6
    print(f"{'rows':>8s} {'open s':>7s} {'us/row':>7s} {'peak RSS growth MB':>19s} {'case() us':>10s}")
    print(f"{args.rows:8d} {opened:7.2f} {opened / args.rows * 1e6:7.1f} {grown_mb:19.1f} {per_case_us:10.1f}")


if __name__ == "__main__":
    main()
