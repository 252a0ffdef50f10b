"""Issue 20's table: several seeds of one setting, each evaluated once with ``--counterfactual all``, with 95% CIs.

Each argument is the ``--out`` directory of one ``medeyes rollout --counterfactual all`` run (one seed). Per seed:
overall, presence, mimic-only accuracy (Wilson 95% interval over its cases), mean best IoU on presence questions
with a lesion (normal interval), tool steps, and the swap arm's shares of reached presence episodes that follow
the swapped object in each direction (Wilson). Then the mean over seeds with a t interval (n - 1 degrees of
freedom) and the minimum::

    python experiments/seed_report.py runs/final0_eval runs/final1_eval runs/final2_eval --data phantom:look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from looking_report import store_figures

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def seed_row(out: Path, data: str) -> dict[str, tuple[float, float, float]]:
    """``metric -> (value, low, high)`` for one seed's evaluation directory."""
    looking = store_figures(next((out / "counterfactual").glob("*/real")), data)
    (report,) = json.loads((out / "counterfactual.json").read_text())
    swap = next(a for a in report["arms"] if a["arm"] == "swap")
    presence_n = swap["presence_episodes"]
    mimic_n = round(presence_n - looking["lesion_n"])
    row = {}
    for name, value, n in (
        ("overall", looking["overall"], looking["episodes"]),
        ("presence", looking["presence"], presence_n),
        ("mimic_only", looking["mimic_only"], mimic_n),
        ("follows_yes_to_no", swap["follows_yes_to_no"], swap["reached_yes_to_no"]),
        ("follows_no_to_yes", swap["follows_no_to_yes"], swap["reached_no_to_yes"]),
    ):
        row[name] = (value, *wilson(value * n, n))
    iou, sd, n = looking["iou_presence_lesion"], looking["iou_presence_lesion_sd"], looking["lesion_n"]
    row["iou_presence"] = (iou, iou - 1.96 * sd / math.sqrt(n), iou + 1.96 * sd / math.sqrt(n))
    row["tool_steps"] = (looking["tool_steps"], math.nan, math.nan)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evals", nargs="+", type=Path)
    parser.add_argument("--data", default="phantom:look")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {str(path): seed_row(path, args.data) for path in args.evals}
    keys = list(next(iter(rows.values())))

    def cell(value: float, low: float, high: float) -> str:
        return f"{value:.3f}" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    print("| seed run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(cell(*row[k]) for k in keys) + " |")
    n = len(rows)
    if n > 1:
        means = []
        for k in keys:
            values = np.array([row[k][0] for row in rows.values()])
            half = T975.get(n - 1, 1.96) * values.std(ddof=1) / math.sqrt(n)
            means.append(cell(values.mean(), values.mean() - half, values.mean() + half))
        print(f"| mean over {n} seeds (t interval) | " + " | ".join(means) + " |")
        mins = [f"{min(row[k][0] for row in rows.values()):.3f}" for k in keys]
        print("| minimum over seeds | " + " | ".join(mins) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
