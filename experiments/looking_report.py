"""Where did a policy look, and did its answer follow? One table from stored episodes of a phantom source.

Reads a trajectory store (``medeyes rollout --out DIR``, or one arm of ``--counterfactual``: ``DIR/counterfactual/
<data>/real``) and the source's cases, and reports per run: overall, presence, lesion-case and mimic-only
accuracy, mean best IoU on presence questions, tool steps, how often the first drill reached the image's
round object (the lesion, or the mimic of a mimic-only case; ``medeyes.rollout_summary.reaches``), how
often the policy drilled again after a first drill that reached nothing, and presence accuracy split by
whether any drill reached the object::

    python experiments/looking_report.py runs/p1_dev/counterfactual/*/real --data phantom:look

Each store's figures are one row; with several stores (seeds) the last rows give the mean and the minimum.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from medeyes.rollout_summary import reaches
from medeyes.trajectories import TrajectoryStore
from medeyes_env.cases import Case
from medeyes_env.sources import open_source


def episode_row(record, case: Case) -> dict[str, float | bool | str]:
    """One presence episode: its answer, the object it should find, and where its drills went."""
    objects = [r.box for r in case.regions] or [r.box for r in case.lookalikes]
    drills = [
        s.shown_boxes[0] for s in record.steps if s.action is not None and s.action.name == "drill" and s.shown_boxes
    ]
    reached = [any(reaches(d, o) for o in objects) for d in drills]
    return {
        "lesion": case.answer == "yes",
        "correct": record.reward_components.get("accuracy", 0.0) == 1.0,
        "iou": record.reward_components.get("best_iou", 0.0),
        "drills": len(drills),
        "first_reached": bool(reached and reached[0]),
        "any_reached": any(reached),
        "redrilled": len(drills) > 1,
    }


def store_figures(store_dir: Path, data: str) -> dict[str, float]:
    """The looking figures of one store."""
    source = open_source(data)
    records = list(TrajectoryStore(store_dir).records())
    by_id = {}
    presence, overall, steps = [], [], []
    for record in records:
        overall.append(record.reward_components.get("accuracy", 0.0))
        steps.append(record.tool_steps)
        if record.family != "presence":
            continue
        index = int(record.case_id.rsplit("/", 1)[-1])
        case = by_id.setdefault(record.case_id, source.case(record.split, index))
        presence.append(episode_row(record, case))

    def mean(rows: list[dict], key: str, where=lambda r: True) -> float:
        chosen = [float(r[key]) for r in rows if where(r)]
        return float(np.mean(chosen)) if chosen else float("nan")

    missed = [r for r in presence if r["drills"] and not r["first_reached"]]
    return {
        "episodes": len(records),
        "overall": float(np.mean(overall)),
        "presence": mean(presence, "correct"),
        "lesion_cases": mean(presence, "correct", lambda r: r["lesion"]),
        "mimic_only": mean(presence, "correct", lambda r: not r["lesion"]),
        "iou_presence_lesion": mean(presence, "iou", lambda r: r["lesion"]),
        "iou_presence_lesion_sd": float(np.std([r["iou"] for r in presence if r["lesion"]] or [math.nan])),
        "lesion_n": sum(1 for r in presence if r["lesion"]),
        "tool_steps": float(np.mean(steps)),
        "tool_steps_presence": mean(presence, "drills") + 1.0,
        "first_drill_reached": mean(presence, "first_reached", lambda r: r["drills"] > 0),
        "redrill_after_miss": mean(missed, "redrilled"),
        "misses": len(missed),
        "presence_if_reached": mean(presence, "correct", lambda r: r["any_reached"]),
        "presence_if_not_reached": mean(presence, "correct", lambda r: not r["any_reached"]),
        "not_reached": sum(1 for r in presence if not r["any_reached"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--data", default="phantom:look")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    rows = {str(path): store_figures(path, args.data) for path in args.stores}
    keys = list(next(iter(rows.values())))
    print("| store | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
            + " |"
        )
    if len(rows) > 1:
        for label, reduce in (("mean", np.nanmean), ("min", np.nanmin)):
            cells = [f"{reduce([r[k] for r in rows.values()]):.3f}" for k in keys]
            print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
