"""Environment throughput: drill / scan / answer steps per second on 1024 px phantoms, and reset cost.

Prints one table. The phantom's gold regions carry their discs, so the drill row scores drills against a
shape; the "boxes only" row drops the shapes (the path of every box-only source). The baseline row is the
least work a drill can do (one PIL crop-and-resize of the same region); the ratio column says how much the
env adds on top (parsing, bookkeeping, reward components, observation arrays).
Run: ``python benchmarks/env_throughput.py [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from medeyes_env.cases import Case, Region
from medeyes_env.env import MedEyesEnv
from medeyes_env.sources import CaseSource, open_source


class BoxesOnly:
    """A source with its gold shapes dropped: the box-only scoring path every box-only source takes."""

    def __init__(self, source: CaseSource) -> None:
        self.source, self.name = source, source.name

    def size(self, split: str) -> int | None:
        return self.source.size(split)

    def case(self, split: str, index: int) -> Case:
        case = self.source.case(split, index)
        plain = tuple(Region(box=r.box, label=r.label) for r in case.regions)
        return case.model_copy(update={"regions": plain})  # the image factory comes along


def timed(fn, seconds: float) -> tuple[float, int]:
    """Run fn repeatedly for about `seconds`; return (mean seconds per call, calls)."""
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return elapsed / calls, calls


def timed_steps(env: MedEyesEnv, texts: list[str], seconds: float) -> tuple[float, int]:
    """Time only env.step calls: episodes of max_steps tool turns, resets left out of the clock."""
    spent, calls, i = 0.0, 0, 0
    while spent < seconds:
        env.reset(options={"case_index": 0})
        for _ in range(env.config.max_steps):
            text = texts[i % len(texts)]
            i += 1
            start = time.perf_counter()
            env.step(text)
            spent += time.perf_counter() - start
            calls += 1
    return spent / calls, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per row")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says

    env = MedEyesEnv("phantom", split="test")  # T_max = 4, as in the paper
    rng = np.random.default_rng(0)
    env.reset(options={"case_index": 0})
    image = env.image

    def random_box(side: int = 160) -> list[int]:
        x, y = rng.integers(0, image.width - side), rng.integers(0, image.height - side)
        return [int(x), int(y), int(x + side), int(y + side)]

    drill_texts = [
        f"<reasoning>check region</reasoning><action>{json.dumps({'name': 'drill', 'box': random_box()})}</action>"
        for _ in range(64)
    ]
    scan_texts = [
        "<reasoning>compare</reasoning><action>"
        + json.dumps({"name": "scan", "boxes": [random_box(200) for _ in range(3)]})
        + "</action>"
        for _ in range(64)
    ]

    def answer_episode() -> None:
        env.reset(options={"case_index": 0})
        env.step("<reasoning>done</reasoning><answer>yes</answer>")

    def baseline_crop() -> None:
        box = random_box()
        np.asarray(image.resize((256, 256), box=tuple(box)))

    index = {"i": 0}

    def reset_new_case() -> None:
        index["i"] += 1
        env.reset(options={"case_index": 1000 + index["i"]})

    rows = []
    base_s, _ = timed(baseline_crop, args.seconds)
    for name, fn in [
        ("baseline: PIL crop+resize to 256 px", baseline_crop),
        ("drill step (1024 px, incl. reward)", None),
        ("drill step, gold as boxes only", "boxes"),
        ("scan step (3 regions, montage)", None),
        ("drill step, zoom_filter=nearest", "nearest"),
        ("reset (cached case) + answer step", answer_episode),
        ("reset on a new case (renders phantom)", reset_new_case),
    ]:
        if fn is baseline_crop:
            per_call = base_s
        elif fn == "boxes":
            boxed_env = MedEyesEnv(BoxesOnly(open_source("phantom")), split="test")
            per_call, _ = timed_steps(boxed_env, drill_texts, args.seconds)
        elif fn == "nearest":
            fast_env = MedEyesEnv("phantom", split="test", zoom_filter="nearest")
            per_call, _ = timed_steps(fast_env, drill_texts, args.seconds)
        elif fn is None:
            per_call, _ = timed_steps(env, drill_texts if name.startswith("drill") else scan_texts, args.seconds)
        else:
            per_call, _ = timed(fn, args.seconds)
        rows.append({"what": name, "per_call_us": per_call * 1e6, "per_s": 1 / per_call, "ratio": per_call / base_s})

    table = Table(title="MedEyesEnv throughput, one core (target: drill >= 5,000 steps/s)")
    for column in ("what", "µs / call", "calls / s", "× baseline"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for row in rows:
        table.add_row(row["what"], f"{row['per_call_us']:.0f}", f"{row['per_s']:,.0f}", f"{row['ratio']:.1f}")
    Console().print(table)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
