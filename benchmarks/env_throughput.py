"""Environment throughput: drill / scan / answer steps per second on 1024 px phantoms, and reset cost.

Prints one table. The phantom's gold regions carry their discs, so the drill row scores drills against a
shape; the "boxes only" row drops the shapes (the path of every box-only source). The limit row is the least
work that makes a drill's observation: a PIL crop of the same box from the grey image, resized to the view
size and merged to 3 channels (``np.array(Image.merge("RGB", ...))``, the env's own way: 54 us against
``np.stack``'s 66 us). The drill rows and the limit are timed in alternating rounds (medians), so a
noisy machine moves them together; "vs limit" is the limit's time over the row's (1.0 = at the limit).
The render-ahead rows time only ``reset()`` of resets that let the env draw its case, ``--away`` seconds apart
(the agent's turn spent elsewhere), so the next case is loaded in the background meanwhile.
Run: ``python benchmarks/env_throughput.py [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from PIL import Image
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


def timed_limit(grey: Image.Image, boxes: list[list[int]], size: int, seconds: float) -> tuple[float, int]:
    """The least work that makes a drill's observation: crop the box from the grey image, resize, merge."""
    spent, calls, i = 0.0, 0, 0
    while spent < seconds:
        start = time.perf_counter()
        for _ in range(64):
            view = grey.resize((size, size), Image.Resampling.BILINEAR, box=tuple(boxes[i % len(boxes)]))
            np.array(Image.merge("RGB", (view, view, view)))  # as the env does: cheaper than np.stack, same bytes
            i += 1
        spent += time.perf_counter() - start
        calls += 64
    return spent / calls, calls


def timed_streamed_resets(source: str, resets: int, away: float) -> tuple[float, int]:
    """Resets that let the env draw its case (render-ahead loads it), ``away`` seconds apart: the resets' own time.

    The sleep stands for the agent's turn spent elsewhere (generation on a GPU, a remote model): the time
    render-ahead has to load the next case. Only ``reset()`` is on the clock.
    """
    env = MedEyesEnv(source, split="test")
    env.reset(seed=0)
    env.reset()  # the first streamed reset: from here on each one starts loading the next
    spent = 0.0
    for _ in range(resets):
        time.sleep(away)
        start = time.perf_counter()
        env.reset()
        spent += time.perf_counter() - start
    env.close()
    return spent / resets, resets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per row")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the drill rows and the limit")
    parser.add_argument("--away", type=float, default=0.05, help="seconds between streamed resets (the agent's turn)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says

    env = MedEyesEnv("phantom", split="test")  # T_max = 4, as in the paper
    rng = np.random.default_rng(0)
    env.reset(options={"case_index": 0})
    image = env.image
    grey = image.getchannel(0)

    def random_box(side: int = 160) -> list[int]:
        x, y = rng.integers(0, image.width - side), rng.integers(0, image.height - side)
        return [int(x), int(y), int(x + side), int(y + side)]

    drill_boxes = [random_box() for _ in range(64)]  # 160 px: above drill_min_side, so shown as asked
    drill_texts = [
        f"<reasoning>check region</reasoning><action>{json.dumps({'name': 'drill', 'box': box})}</action>"
        for box in drill_boxes
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

    index = {"i": 0}
    look_env = MedEyesEnv("phantom:look", split="test")

    def reset_new_case() -> None:
        index["i"] += 1
        env.reset(options={"case_index": 1000 + index["i"]})

    def reset_new_look_case() -> None:
        index["i"] += 1
        look_env.reset(options={"case_index": 1000 + index["i"]})

    size = env.config.view_size
    boxed_env = MedEyesEnv(BoxesOnly(open_source("phantom")), split="test")
    fast_env = MedEyesEnv("phantom", split="test", zoom_filter="nearest")
    drill_rows = {
        "limit: crop+resize of the grey image, 3 channels": lambda s: timed_limit(grey, drill_boxes, size, s),
        "drill step (1024 px, incl. reward)": lambda s: timed_steps(env, drill_texts, s),
        "drill step, gold as boxes only": lambda s: timed_steps(boxed_env, drill_texts, s),
    }
    samples: dict[str, list[float]] = {name: [] for name in drill_rows}
    for fn in drill_rows.values():
        fn(0.05)  # warm-up
    for _ in range(args.rounds):  # alternate, so load on a shared machine hits every row alike
        for name, fn in drill_rows.items():
            samples[name].append(fn(args.seconds / args.rounds)[0])
    per_call = {name: float(np.median(values)) for name, values in samples.items()}
    limit_s = per_call["limit: crop+resize of the grey image, 3 channels"]
    for name, fn in [
        ("scan step (3 regions, montage)", lambda: timed_steps(env, scan_texts, args.seconds)[0]),
        ("drill step, zoom_filter=nearest", lambda: timed_steps(fast_env, drill_texts, args.seconds)[0]),
        ("reset (cached case) + answer step", lambda: timed(answer_episode, args.seconds)[0]),
        ("reset on a new case (renders phantom)", lambda: timed(reset_new_case, args.seconds)[0]),
        ("reset on a new case, phantom:look", lambda: timed(reset_new_look_case, args.seconds)[0]),
        (
            f"reset on a drawn case, render-ahead, {args.away * 1e3:.0f} ms apart",
            lambda: timed_streamed_resets("phantom", 40, args.away)[0],
        ),
        (
            f"the same, phantom:look, {args.away * 1e3:.0f} ms apart",
            lambda: timed_streamed_resets("phantom:look", 40, args.away)[0],
        ),
    ]:
        per_call[name] = fn()

    rows = [
        {"what": name, "per_call_us": s * 1e6, "per_s": 1 / s, "vs_limit": limit_s / s} for name, s in per_call.items()
    ]
    table = Table(
        title=f"MedEyesEnv throughput, one core (target: drill >= 0.9 of the limit); load {os.getloadavg()[0]:.2f}"
    )
    for column in ("what", "µs / call", "calls / s", "vs limit"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for row in rows:
        table.add_row(row["what"], f"{row['per_call_us']:.0f}", f"{row['per_s']:,.0f}", f"{row['vs_limit']:.2f}")
    Console().print(table)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
