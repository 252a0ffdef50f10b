"""Vector-env throughput: episodes per second of ``gym.make_vec`` (sync and async, 1 and 2 envs) against one env.

Every episode is a new phantom case (rendered at reset, about 50 ms of CPU) and four turns: drill, scan, drill,
answer. The single env resets itself; the vector envs autoreset (gymnasium's next-step mode: the step after an
answer starts the sub-env's next episode), so both pay one render per episode. Async envs run with
``shared_memory=False``: gymnasium 1.4 reads a Text observation's shared memory once (docs/environment.md).
The load average is printed with the table: the async rows need free cores to gain anything.
Run: ``python benchmarks/vector_envs.py [--id MedEyes/Phantom-v0] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from typing import Any

import gymnasium as gym
from rich.console import Console
from rich.table import Table

import medeyes_env  # noqa: F401  (registers the ids)

TURNS = [
    '<reasoning>look closer</reasoning><action>{"name": "drill", "box": [100, 100, 300, 300]}</action>',
    "<reasoning>compare</reasoning><action>"
    + json.dumps({"name": "scan", "boxes": [[0, 0, 400, 400], [400, 400, 800, 800], [600, 100, 900, 400]]})
    + "</action>",
    '<reasoning>and here</reasoning><action>{"name": "drill", "box": [500, 500, 700, 700]}</action>',
    "<reasoning>decided</reasoning><answer>yes</answer>",
]


def single_env_rate(env_id: str, seconds: float) -> float:
    """Episodes per second of one env stepped in this process."""
    env = gym.make(env_id)
    env.reset(seed=0)
    for turn in TURNS:  # warm-up: the first episode pays one-off costs (imports, fonts, caches)
        env.step(turn)
    episodes, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset()
        for turn in TURNS:
            env.step(turn)
        episodes += 1
    return episodes / (time.perf_counter() - start)


def independent_rate(env_id: str, processes: int, seconds: float) -> float:
    """Episodes per second of ``processes`` single envs in separate processes at once, no vector env between.

    What the machine gives ``processes`` workers with no lockstep and no pipe: the ceiling of an async vector env.
    """
    context = multiprocessing.get_context("spawn")  # a clean interpreter each, as gym's async workers use fork/spawn
    with context.Pool(processes) as pool:
        return float(sum(pool.starmap(single_env_rate, [(env_id, seconds)] * processes)))


def vector_env_rate(env_id: str, mode: str, num_envs: int, seconds: float) -> float:
    """Episodes per second of ``gym.make_vec``: answered episodes over the wall time, autoresets included."""
    vector_kwargs: dict[str, Any] = {"shared_memory": False} if mode == "async" else {}
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode, vector_kwargs=vector_kwargs)
    try:
        envs.reset(seed=0)
        # Lockstep: every sub-env answers on the same step, and the next step autoresets all of them.
        for turn in TURNS:  # warm-up episode, as for the single env; the clock starts at the autoreset
            envs.step([turn] * num_envs)
        cycle = [TURNS[0], *TURNS]  # the first action is ignored: it is the autoreset step
        episodes, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for turn in cycle:
                _, _, terminated, truncated, _ = envs.step([turn] * num_envs)
                episodes += int(terminated.sum() + truncated.sum())
        return episodes / (time.perf_counter() - start)
    finally:
        envs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", default="MedEyes/Phantom-v0", help="registered env id")
    parser.add_argument("--seconds", type=float, default=5.0, help="time budget per row")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()

    load_before = os.getloadavg()
    base = single_env_rate(args.id, args.seconds)
    rows = [{"what": "single env (gym.make)", "episodes_per_s": base}]
    for mode, num_envs in [("sync", 1), ("sync", 2), ("async", 1), ("async", 2)]:
        rate = vector_env_rate(args.id, mode, num_envs, args.seconds)
        rows.append({"what": f"make_vec {mode}, {num_envs} env{'s' if num_envs > 1 else ''}", "episodes_per_s": rate})
    rows.append(
        {"what": "ceiling: 2 single envs, 2 processes", "episodes_per_s": independent_rate(args.id, 2, args.seconds)}
    )
    for row in rows:
        row["ratio"] = row["episodes_per_s"] / base
    load_after = os.getloadavg()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    table = Table(
        title=f"{args.id}: episodes/s ({cores} cores; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after)"
    )
    for column in ("what", "episodes / s", "× single env"):
        table.add_column(column, justify="right" if column != "what" else "left")
    for row in rows:
        table.add_row(row["what"], f"{row['episodes_per_s']:.1f}", f"{row['ratio']:.2f}")
    Console().print(table)
    if args.json:
        print(json.dumps({"rows": rows, "cores": cores, "load_before": load_before, "load_after": load_after}))


if __name__ == "__main__":
    main()
