"""Box IoU against shape IoU of stored drills: how much a box around a round region flatters a drill.

Reads trajectory stores (``medeyes rollout --out DIR``) whose records carry gold shapes (any source that gives
them: the phantom's discs, SLAKE's masks) and, for every executed drill of an episode with gold regions,
scores the drilled box twice: against the gold boxes alone (box IoU) and against the gold regions as
the rewards now do (IoU of areas against a region's shape, :func:`medeyes_env.rewards.region_iou`). One
row per store: drills, mean best IoU both ways, hits (IoU >= 0.5) both ways, and the drills the box metric
calls a hit that the shape metric does not::

    python experiments/shape_iou.py expert=/tmp/expert policy=/tmp/policy [--markdown]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medeyes.trajectories import TrajectoryRecord, TrajectoryStore
from medeyes_env.rewards import box_iou, region_iou

HIT = 0.5
"""IoU at which a drill counts as a hit (the hit rate's threshold)."""


def drill_ious(record: TrajectoryRecord) -> list[tuple[float, float]]:
    """``(best box IoU, best shape IoU)`` of every executed drill of one episode against its gold regions."""
    regions = record.gold_regions
    drills = [
        box
        for step in record.steps
        if step.action is not None and step.action.name == "drill" and step.shown_boxes
        for box in step.action.boxes
    ]
    return [
        (max(box_iou(box, r.box) for r in regions), max(region_iou(box, r) for r in regions))
        for box in drills
        if regions
    ]


def store_row(name: str, records: list[TrajectoryRecord]) -> dict[str, float | int | str]:
    """The table row of one store's records."""
    pairs = [pair for record in records for pair in drill_ious(record)]
    n = len(pairs)
    box_hits = sum(1 for b, _ in pairs if b >= HIT)
    shape_hits = sum(1 for _, s in pairs if s >= HIT)
    box_only = sum(1 for b, s in pairs if b >= HIT > s)
    return {
        "agent": name,
        "episodes": len(records),
        "with_shapes": sum(1 for r in records if any(s is not None for s in r.gold_shapes)),
        "drills": n,
        "mean_box_iou": sum(b for b, _ in pairs) / n if n else 0.0,
        "mean_shape_iou": sum(s for _, s in pairs) / n if n else 0.0,
        "box_hits": box_hits,
        "shape_hits": shape_hits,
        "box_only_hits": box_only,
        "box_only_share_of_box_hits": box_only / box_hits if box_hits else 0.0,
    }


def markdown(rows: list[dict[str, float | int | str]]) -> str:
    """The rows as the table docs/eval.md shows."""
    lines = [
        "| agent | drills | mean box IoU | mean shape IoU | hits (box) | hits (shape) | box-only hits |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['agent']} | {r['drills']} | {r['mean_box_iou']:.3f} | {r['mean_shape_iou']:.3f} | "
            f"{r['box_hits']} | {r['shape_hits']} | {r['box_only_hits']} "
            f"({100 * float(r['box_only_share_of_box_hits']):.0f}% of box hits) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", help="NAME=DIR of a trajectory store (or DIR, named by itself)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON rows")
    args = parser.parse_args()
    rows = []
    for item in args.stores:
        name, _, path = item.rpartition("=")
        rows.append(store_row(name or Path(path).name, list(TrajectoryStore(path, read_only=True).records())))
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
