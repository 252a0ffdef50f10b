"""How good is each region oracle on the phantom, before the expert uses it?

    python benchmarks/oracle_quality.py --n 80

For cases with focal lesions (gold regions other than effusion and pneumothorax):
- scan recall@5 / top-1: share of cases where one of the scan's 5 most confident boxes (or its first)
  has IoU > 0.2 with a gold lesion box;
- scan confidence of boxes that hit a lesion vs boxes that do not (median);
- drill confidence on the gold box, on a mimic (a lesion-like normal ring, from the phantom's scene), and
  on a random box of a lesion's size inside the image (median and quartiles).
Prints a table; no files written.
"""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from medeyes.agents.expert.oracles.factory import make_oracle
from medeyes_env.rewards import box_iou
from medeyes_env.sources import open_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=80, help="cases scanned (only those with focal lesions count)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--oracles", default="annotation,image")
    args = parser.parse_args()
    source = open_source("phantom")
    table = Table(title=f"Region oracles on phantom/{args.split} (first {args.n} cases)")
    for column in (
        "oracle",
        "cases",
        "recall@5",
        "top-1",
        "scan conf hit / miss",
        "drill gold",
        "drill mimic",
        "drill random",
    ):
        table.add_column(column, justify="right")
    rng = np.random.default_rng(0)
    for name in args.oracles.split(","):
        oracle = make_oracle(name)
        recall, top1, hit_conf, miss_conf, gold, mimic, random = [], [], [], [], [], [], []
        for index in range(args.n):
            case = source.case(args.split, index)
            lesions = [r.box for r in case.regions if r.label not in ("effusion", "pneumothorax")]
            if not lesions:
                continue
            image = case.load_image()
            found = oracle.scan(image, case.question, case=case, rng=rng)[:5]
            hits = [max(box_iou(r.box, g) for g in lesions) > 0.2 for r in found]
            recall.append(any(hits))
            top1.append(bool(hits) and hits[0])
            hit_conf += [r.confidence for r, h in zip(found, hits, strict=True) if h]
            miss_conf += [r.confidence for r, h in zip(found, hits, strict=True) if not h]
            gold += [oracle.drill(image, g, case.question, case=case, rng=rng) for g in lesions]
            scene = source.scene(args.split, index)
            mimic += [
                oracle.drill(image, m.box(scene.size), case.question, case=case, rng=rng) for m in scene.mimics[:2]
            ]
            side = lesions[0][2] - lesions[0][0]
            x, y = rng.uniform(0.15, 0.85 - side / image.width, 2) * image.width
            random.append(oracle.drill(image, (x, y, x + side, y + side), case.question, case=case, rng=rng))

        def quartiles(values: list[float]) -> str:
            q1, q2, q3 = np.percentile(values, [25, 50, 75]) if values else (np.nan,) * 3
            return f"{q2:.2f} ({q1:.2f}-{q3:.2f})"

        table.add_row(
            name,
            str(len(recall)),
            f"{np.mean(recall):.2f}",
            f"{np.mean(top1):.2f}",
            f"{np.median(hit_conf) if hit_conf else float('nan'):.2f} / {np.median(miss_conf):.2f}",
            quartiles(gold),
            quartiles(mimic),
            quartiles(random),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
