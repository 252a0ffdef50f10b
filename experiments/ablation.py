"""The MedEyes ablation on the phantom benchmark, at CPU scale, resumable: every arm is a run directory.

Arms (the same GRPO budget after the same warm start; ``--arms`` picks them, item 5 of issue 20 by default):

==================  ===============================================================================
on_policy           GRPO on on-policy rollouts only
dual                dual-stream GRPO with the preset's objective as it is at run time (the default)
dual_paper          dual_stream GRPO, per-stream advantage statistics as the paper writes them
no_cvs              ``dual`` with the expert's choices greedy instead of CVS-sampled (w/o CVS)
no_grn              ``dual`` with random-region expert trajectories (w/o GRN)
------------------  ------------------------------- only with --arms -------------------------------
sft_only            the warm start, continued with SFT for the same number of steps
dual_luffy          dual-stream GRPO, expert advantages against the on-policy baseline + policy shaping
scan_only           ``dual`` with a scan-only expert
drill_only          ``dual`` with a drill-only expert
==================  ===============================================================================

Layout: per seed one ground stage (``<runs>/seed<s>/ground``); per seed and warm start one SFT stage from it
(``<runs>/<warm>/seed<s>/sft``); every arm starts from that model in ``<runs>/<warm>/seed<s>/<arm>``. Warm
starts: ``format`` (SFT on format-valid trajectories whose boxes are random: the protocol, not where to look;
the default) and ``expert`` (SFT on the GRN + CVS demonstrations).

Resuming: run the same command again. A finished stage (``final/`` saved, latest checkpoint at its last step, same
config) is skipped; an unfinished one resumes through ``medeyes train``'s own path, from
``<run_dir>/checkpoints/latest`` (``--checkpoint-every`` divides ``--eval-every``, so no evaluation row already
written is computed again). ``--max-steps N`` stops after N optimizer steps in one invocation (a time slice).
Each run directory keeps ``ablation_cpu.json``: the process CPU seconds spent in it. The evaluation points go to
``<out>/ablation_evals.jsonl``, one row per (warm start, seed, arm, step), appended only when missing.

Usage::

    python experiments/ablation.py                      # item 5: format start, 5 arms x 3 seeds x 200 steps
    python experiments/ablation.py --max-steps 600      # the same, at most 600 optimizer steps this time
    python experiments/ablation.py --report-only        # table, curves and CPU-hours from what is done
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARMS: dict[str, dict[str, Any]] = {
    "on_policy": {"grpo.mode": "on_policy"},
    "dual": {"grpo.mode": "dual"},
    "dual_paper": {"grpo.mode": "dual", "objective.advantage_mode": "per_stream"},
    "no_cvs": {"grpo.mode": "dual", "expert.agent.mode": "greedy"},
    "no_grn": {"grpo.mode": "dual", "expert.agent.mode": "random"},
    "sft_only": {"stages": ["sft"]},
    "dual_luffy": {
        "grpo.mode": "dual",
        "objective.advantage_mode": "on_baseline",
        "objective.off_policy_shaping": True,
    },
    "scan_only": {"grpo.mode": "dual", "expert.agent.mode": "scan_only"},
    "drill_only": {"grpo.mode": "dual", "expert.agent.mode": "drill_only"},
}
ITEM5_ARMS = ["on_policy", "dual", "dual_paper", "no_cvs", "no_grn"]
WARM_STARTS: dict[str, dict[str, Any]] = {"format": {"expert.agent.mode": "random"}, "expert": {}}
"""What the shared warm start's SFT imitates: format-valid random-box trajectories, or the GRN + CVS expert."""
SETTINGS_RANGES = {(0, 128): "the default's in-training evaluation", (1000, 1200): "the development range"}
"""Test-split ranges settings were chosen on (issue 20): the ablation's held-out range must avoid them."""
CPU_FILE = "ablation_cpu.json"
EVALS_FILE = "ablation_evals.jsonl"
METRICS = {
    "accuracy": "eval/accuracy",
    "presence": "eval/accuracy/presence",
    "iou_presence": "eval/iou/presence",
    "tool_steps": "eval/steps",
}
"""Held-out numbers of each evaluation point (the trainer's metrics.jsonl names)."""
MECHANISM = {"expert_adv_zero": "stream/off/adv_zero_frac", "on_tool_share": "stream/on/tool_share"}
"""Training-time mechanism, the mean over the GRPO steps since the previous evaluation point."""


# ================================================================================================ configs


def base_config(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The preset's task with the ablation's held-out range and the budget of ``stage`` and the stages before it.

    A later stage's options stay out of an earlier stage's config, so the ground and SFT stages of one ``--runs``
    serve arms of any ``--grpo-steps`` or ``--prompts-per-step`` (every checkpoint refuses a config not its own).
    """
    from medeyes.training.config import PRESETS

    data = PRESETS[args.preset]()
    data.update(progress=False, tensorboard=False, threads=args.threads, log_every=1)
    data["eval"] = {**data["eval"], "start": args.eval_start, "cases": args.eval_cases, "every": args.eval_every}
    order = ["ground", "sft", "grpo"]
    for earlier in order[: order.index(stage) + 1]:
        steps = getattr(args, f"{earlier}_steps", None)
        if earlier != "grpo" and steps is not None:
            data[earlier] = {**data[earlier], "steps": steps}
    if stage == "grpo" and args.prompts_per_step:
        data["grpo"] = {**data["grpo"], "prompts_per_step": args.prompts_per_step}
    return data


def stage_configs(args: argparse.Namespace, seed: int, warm: str) -> list[tuple[str, Any]]:
    """``(name, TrainConfig)`` in run order: the seed's ground stage, the warm start's SFT, then each arm."""
    from medeyes.training.config import build_config

    bases = {stage: base_config(args, stage) for stage in ("ground", "sft", "grpo")}
    ground_dir, sft_dir = args.runs / f"seed{seed}" / "ground", args.runs / warm / f"seed{seed}" / "sft"
    shared = {"seed": seed, "checkpoint_every": 100}
    ground = {**shared, "stages": ["ground"], "eval.every": bases["ground"]["ground"]["steps"]}
    sft = {**shared, "model": str(ground_dir / "final"), "stages": ["sft"], "eval.every": bases["sft"]["sft"]["steps"]}
    out = [
        (f"seed{seed}/ground", build_config(bases["ground"], {**ground, "run_dir": str(ground_dir)})),
        (f"{warm}/seed{seed}/sft", build_config(bases["sft"], {**sft, "run_dir": str(sft_dir), **WARM_STARTS[warm]})),
    ]
    for arm in args.arms:
        overrides: dict[str, Any] = {
            "seed": seed,
            "model": str(sft_dir / "final"),
            "stages": ARMS[arm].get("stages", ["grpo"]),
            "grpo.steps": args.grpo_steps,
            "sft.steps": args.grpo_steps,
            "checkpoint_every": args.checkpoint_every,
            "run_dir": str(args.runs / warm / f"seed{seed}" / arm),
        }
        if arm == "sft_only":  # continues the warm start's own SFT data; the GRPO arms use their expert
            overrides.update(WARM_STARTS[warm])
        overrides.update({k: v for k, v in ARMS[arm].items() if k != "stages"})
        out.append((f"{warm}/seed{seed}/{arm}", build_config(bases["grpo"], overrides)))
    return out


def check_eval_range(start: int, cases: int) -> str:
    """The held-out range in words; exit 2 when it overlaps a range settings were chosen on."""
    for (low, high), what in SETTINGS_RANGES.items():
        if start < high and low < start + cases:
            sys.exit(f"--eval-start {start} --eval-cases {cases} overlaps test cases {low}..{high - 1} ({what})")
    return f"test cases {start}..{start + cases - 1} ({cases})"


# ================================================================================================ running


def cpu_record(run_dir: Path) -> dict[str, float]:
    """``ablation_cpu.json`` of a run: process CPU and wall seconds spent training in it so far."""
    path = run_dir / CPU_FILE
    return json.loads(path.read_text()) if path.is_file() else {"cpu_seconds": 0.0, "wall_seconds": 0.0, "calls": 0}


def add_cpu(run_dir: Path, cpu: float, wall: float) -> None:
    """Add one call's CPU and wall seconds to ``ablation_cpu.json`` (written atomically)."""
    record = cpu_record(run_dir)
    record = {
        "cpu_seconds": record["cpu_seconds"] + cpu,
        "wall_seconds": record["wall_seconds"] + wall,
        "calls": record["calls"] + 1,
    }
    tmp = run_dir / f".{CPU_FILE}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / CPU_FILE)


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0 without one)."""
    from medeyes.training.checkpoints import latest_checkpoint, read_checkpoint_state

    latest = latest_checkpoint(run_dir)
    return int(read_checkpoint_state(latest)["step"]) if latest is not None else 0


def run_stage(config: Any, budget: int | None) -> int:
    """Finish (or skip, or advance by at most ``budget`` steps) one stage; the optimizer steps run now.

    A finished stage of another config is refused (:class:`ConfigError`), never silently reused.
    """
    from medeyes.training.checkpoints import check_same_config, latest_checkpoint
    from medeyes.training.trainer import train

    run_dir = Path(config.run_dir)
    latest = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if latest is not None:
        check_same_config(latest, config.model_dump(mode="json"))
    start = checkpoint_step(run_dir) if latest is not None else 0
    if start >= config.total_steps and (run_dir / "final" / "config.json").is_file():
        return 0
    if budget is not None and budget <= 0:
        return 0
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        result = train(config, max_steps=budget)
    finally:  # an interrupted call (Ctrl-C, SIGTERM) still counts the CPU it spent
        add_cpu(run_dir, time.process_time() - cpu, time.perf_counter() - wall)
    return result.steps - start


def stage_done(config: Any) -> bool:
    """Whether the stage reached its last step and saved its model."""
    run_dir = Path(config.run_dir)
    return (run_dir / "final" / "config.json").is_file() and checkpoint_step(run_dir) >= config.total_steps


# ================================================================================================ rows


def window_mean(rows: list[dict[str, Any]], key: str, low: int, high: int) -> float | None:
    """Mean of ``key`` over the logged rows with ``low < step <= high``."""
    values = [r[key] for r in rows if low < r["step"] <= high and r.get(key) is not None]
    return statistics.fmean(values) if values else None


def eval_rows(run_dir: Path, warm: str, seed: int, arm: str) -> list[dict[str, Any]]:
    """One row per evaluation point of an arm that its latest checkpoint covers (later rows may be redone)."""
    from medeyes.training.metrics import read_metrics

    if not (run_dir / "checkpoints").is_dir():
        return []
    covered = checkpoint_step(run_dir)
    metrics = read_metrics(run_dir)
    out, previous = [], 0
    for row in (r for r in metrics if "eval/accuracy" in r and r["step"] <= covered):
        point = {"warm": warm, "seed": seed, "arm": arm, "step": row["step"]}
        point.update({name: row.get(key) for name, key in METRICS.items()})
        point.update({name: window_mean(metrics, key, previous, row["step"]) for name, key in MECHANISM.items()})
        point["blind_accuracy"] = row.get("eval/blind_accuracy")
        out.append(point)
        previous = row["step"]
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The evaluation rows of ``path``, one per key (a repeated key keeps its first row; a torn line is skipped)."""
    rows: dict[tuple, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.setdefault(row_key(row), row)
    return list(rows.values())


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies an evaluation row: warm start, seed, arm, step."""
    return row["warm"], row["seed"], row["arm"], row["step"]


def append_missing(path: Path, rows: list[dict[str, Any]]) -> int:
    """Append the rows whose key ``path`` does not hold yet; how many were appended.

    Under a file lock: processes running other seeds beside this one append to the same file.
    """
    from filelock import FileLock

    with FileLock(f"{path}.lock"):
        have = {row_key(r) for r in read_rows(path)}
        new = [r for r in rows if row_key(r) not in have]
        if new:
            with path.open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in new)
    return len(new)


def arm_dirs(runs: Path) -> list[tuple[str, int, str, Path]]:
    """Every ``<runs>/<warm>/seed<s>/<arm>`` run directory: (warm, seed, arm, path)."""
    found = []
    for warm in WARM_STARTS:
        for seed_dir in sorted((runs / warm).glob("seed*")):
            for arm in ARMS:
                if (seed_dir / arm / "metrics.jsonl").is_file():
                    found.append((warm, int(seed_dir.name[4:]), arm, seed_dir / arm))
    return found


# ================================================================================================ report


def t_quantile(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom.

    >>> round(t_quantile(2), 3), round(t_quantile(30), 3)
    (4.303, 2.042)
    """
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
    if df in table:
        return table[df]
    z = 1.959964  # Cornish-Fisher, two terms: within 0.002 of the exact value for df > 10
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean over seeds (None with fewer than two)."""
    if len(values) < 2:
        return None
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def wilson(p: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``p`` over ``n`` trials.

    >>> tuple(round(v, 3) for v in wilson(0.5, 100))
    (0.404, 0.596)
    """
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def cell(values: list[float | None], trials: int | None = None) -> str:
    """``mean [t-CI] min`` over seeds, plus the Wilson interval over pooled episodes when ``trials`` is given."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = f"{statistics.fmean(values):.3f}"
    interval = t_interval(values)
    text += f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
    text += f" min {min(values):.3f}" if len(values) > 1 else ""
    if trials:
        low, high = wilson(statistics.fmean(values), trials * len(values))
        text += f" (pooled {low:.3f}-{high:.3f})"
    return text


def presence_cases(preset: str, start: int, cases: int) -> int:
    """How many of the held-out cases ask the presence question (the denominator of presence accuracy)."""
    from medeyes.training.config import PRESETS
    from medeyes_env.sources import open_cases

    data = PRESETS[preset]()
    source = open_cases(data["data"], data.get("data_options", {}))
    return sum(source.case("test", i).meta.get("family") == "presence" for i in range(start, start + cases))


def cpu_hours(runs: Path) -> dict[str, float]:
    """CPU-hours recorded in the run directories under ``runs``: arms, shared stages (ground, SFT), total."""
    arms = shared = 0.0
    for path in runs.rglob(CPU_FILE):
        seconds = cpu_record(path.parent)["cpu_seconds"]
        if path.parent.name in ("ground", "sft"):
            shared += seconds
        else:
            arms += seconds
    return {"arms": arms / 3600, "shared": shared / 3600, "total": (arms + shared) / 3600}


def table_lines(rows: list[dict[str, Any]], args: argparse.Namespace, warm: str) -> list[str]:
    """The markdown table of one warm start: each arm at its last step, over the seeds that reached it."""
    n_presence = presence_cases(args.preset, args.eval_start, args.eval_cases)
    lines = [
        "",
        f"## Warm start: {warm}, after {args.grpo_steps} steps",
        "",
        "| arm | seeds | accuracy | presence | IoU, presence questions | tool steps | expert rows with advantage 0 "
        "| on-policy tool share | accuracy at step 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        final = [r for r in rows if r["warm"] == warm and r["arm"] == arm and r["step"] == args.grpo_steps]
        start = [r for r in rows if r["warm"] == warm and r["arm"] == arm and r["step"] == 0]
        if not final:
            continue
        final.sort(key=lambda r: r["seed"])
        lines.append(
            f"| {arm} | {','.join(str(r['seed']) for r in final)} "
            f"| {cell([r['accuracy'] for r in final], args.eval_cases)} "
            f"| {cell([r['presence'] for r in final], n_presence)} "
            f"| {cell([r['iou_presence'] for r in final])} | {cell([r['tool_steps'] for r in final])} "
            f"| {cell([r['expert_adv_zero_run'] for r in final])} | {cell([r['on_tool_share_run'] for r in final])} "
            f"| {cell([r['accuracy'] for r in start])} |"
        )
    unfinished = sorted(
        {(r["arm"], r["seed"]) for r in rows if r["warm"] == warm}
        - {(r["arm"], r["seed"]) for r in rows if r["warm"] == warm and r["step"] == args.grpo_steps}
    )
    if unfinished:
        lines += ["", "Not finished yet (left out): " + ", ".join(f"{a} seed {s}" for a, s in unfinished) + "."]
    return lines


def with_run_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``<mechanism>_run``: the mechanism's mean over every GRPO step up to the row (window means, weighted)."""
    out = []
    for row in rows:
        mine = sorted(
            (r for r in rows if r["warm"] == row["warm"] and r["seed"] == row["seed"] and r["arm"] == row["arm"]),
            key=lambda r: r["step"],
        )
        extra, previous = {}, 0
        for name in MECHANISM:
            pairs, previous = [], 0
            for r in (r for r in mine if r["step"] <= row["step"]):
                if r.get(name) is not None:
                    pairs.append((r[name], r["step"] - previous))
                previous = r["step"]
            weight = sum(w for _, w in pairs)
            extra[f"{name}_run"] = sum(v * w for v, w in pairs) / weight if weight else None
        out.append({**row, **extra})
    return out


def write_report(args: argparse.Namespace) -> None:
    """``<out>/ablation_table.md`` and the curves from every arm's rows; print the table and the CPU-hours."""
    for warm, seed, arm, run_dir in arm_dirs(args.runs):
        append_missing(args.out / EVALS_FILE, eval_rows(run_dir, warm, seed, arm))
    rows = with_run_means(read_rows(args.out / EVALS_FILE))
    hours = cpu_hours(args.runs)
    blind = next((r["blind_accuracy"] for r in rows if r.get("blind_accuracy") is not None), None)
    lines = [
        "# Ablation (experiments/ablation.py)",
        "",
        f"Preset `{args.preset}`; held-out {check_eval_range(args.eval_start, args.eval_cases)} of the test split, "
        f"greedy. Each cell: mean over seeds [95% t-interval over seeds] min over seeds; accuracy and presence also "
        "give a Wilson 95% interval over the pooled episodes (seeds x cases, as if independent). Mechanism columns: "
        "mean over every GRPO step of the run (from metrics.jsonl). `dual` uses the preset's objective "
        f"(advantage_mode `{preset_advantage_mode(args.preset)}`).",
        "",
        f"CPU-hours recorded: {hours['arms']:.2f} in arms, {hours['shared']:.2f} in shared ground and SFT stages, "
        f"{hours['total']:.2f} in all.",
    ]
    if blind is not None:
        lines.append(f"Blind majority-answer baseline on these cases: {blind:.3f}.")
    for warm in WARM_STARTS:
        if any(r["warm"] == warm for r in rows):
            lines += table_lines(rows, args, warm)
            for name in [*METRICS, *MECHANISM]:
                plot_curves([r for r in rows if r["warm"] == warm], name, args.out / f"ablation_{warm}_{name}.png")
    text = "\n".join(lines) + "\n"
    (args.out / "ablation_table.md").write_text(text)
    print(text, flush=True)
    print(f"CPU-hours used: {hours['total']:.3f} (arms {hours['arms']:.3f}, shared stages {hours['shared']:.3f})")


def preset_advantage_mode(preset: str) -> str:
    """The preset's objective.advantage_mode (what the ``dual`` arm runs)."""
    from medeyes.training.config import preset as load_preset

    return str(load_preset(preset).objective.advantage_mode)


def plot_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """``metric`` against GRPO step per arm: mean over seeds, with a min-max bar per point (Pillow)."""
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    curves: dict[str, list[tuple[int, float, float, float]]] = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm and r.get(metric) is not None]
        points = []
        for step in sorted({r["step"] for r in mine}):
            values = [r[metric] for r in mine if r["step"] == step]
            points.append((step, statistics.fmean(values), min(values), max(values)))
        if points:
            curves[arm] = points
    width, height, left, right, top, bottom = 900, 520, 70, 170, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    what = (
        f"held-out {metric}" if metric in METRICS else f"training {metric} (mean over the steps since the last point)"
    )
    draw.text((left, 12), f"{what} vs. GRPO step; mean over seeds, bar: min-max", fill="black")
    if not curves:
        image.save(path)
        return
    xs = [p[0] for c in curves.values() for p in c]
    ys = [v for c in curves.values() for p in c for v in p[1:]]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    y0, y1 = y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1)

    def px(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        return x, height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        value = y0 + (y1 - y0) * i / 5
        draw.text((8, px(x0, value)[1] - 6), f"{value:.2f}", fill="black")
    for step in sorted(set(xs)):
        draw.text((px(step, y0)[0] - 6, height - bottom + 8), str(step), fill="black")
    draw.text((width // 2 - 40, height - 22), "GRPO step", fill="black")
    for i, (arm, points) in enumerate(curves.items()):
        colour = colours[list(ARMS).index(arm) % len(colours)]  # one colour per arm in every plot
        line = [px(s, m) for s, m, _, _ in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for step, _, low, high in points:
            draw.line([px(step, low), px(step, high)], fill=colour, width=1)
        draw.line([width - right + 10, top + 18 * i + 6, width - right + 30, top + 18 * i + 6], fill=colour, width=3)
        draw.text((width - right + 36, top + 18 * i), arm, fill="black")
    image.save(path)


# ================================================================================================ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (defaults: item 5 of issue 20)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-default", choices=["cpu-default", "tiny"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=ITEM5_ARMS, choices=list(ARMS))
    parser.add_argument("--warm-starts", nargs="+", default=["format"], choices=list(WARM_STARTS))
    parser.add_argument("--grpo-steps", type=int, default=200, help="GRPO (or SFT) steps of every arm.")
    parser.add_argument("--eval-every", type=int, default=25, help="Held-out evaluation every this many steps.")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="Arm checkpoints; must divide --eval-every.")
    parser.add_argument("--eval-start", type=int, default=20000, help="First held-out test case.")
    parser.add_argument("--eval-cases", type=int, default=200, help="Held-out test cases per evaluation.")
    parser.add_argument("--prompts-per-step", type=int, default=2, help="GRPO cases per step (0: the preset's).")
    parser.add_argument("--ground-steps", type=int, default=None, help="Ground steps (default: the preset's).")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps of the warm start (the preset's).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="Stop after this many optimizer steps now.")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation5")
    parser.add_argument("--out", type=Path, default=None, help="Report folder (default: <runs>/report).")
    parser.add_argument("--report-only", action="store_true", help="Only the table, curves and CPU-hours.")
    args = parser.parse_args(argv)
    if args.eval_every < 1 or args.checkpoint_every < 1 or args.grpo_steps < 1:
        parser.error("--eval-every, --checkpoint-every and --grpo-steps must be at least 1")
    if args.eval_every % args.checkpoint_every:
        parser.error(f"--checkpoint-every {args.checkpoint_every} must divide --eval-every {args.eval_every}")
    args.out = args.out or args.runs / "report"
    return args


def main(argv: list[str] | None = None) -> None:
    """Run what is left of the ablation (or only report); a MedEyes error is one line and exit code 2."""
    from medeyes_env.errors import MedEyesError

    args = parse_args(argv)
    try:
        run(args)
    except MedEyesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> None:
    """Run every stage left (within ``--max-steps``), then write the table and the curves."""
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"held-out: {check_eval_range(args.eval_start, args.eval_cases)}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run_stage's finally records the CPU spent
    budget = args.max_steps
    todo = [] if args.report_only else [(s, w) for s in args.seeds for w in args.warm_starts]
    for seed, warm in todo:
        for name, config in stage_configs(args, seed, warm):
            ran = run_stage(config, budget)
            budget = None if budget is None else budget - ran
            if not stage_done(config):
                print(f"{name}: stopped at step {checkpoint_step(Path(config.run_dir))} (--max-steps spent)")
                write_report(args)
                return
            arm = name.split("/")[-1]
            if arm in ARMS:
                rows = eval_rows(Path(config.run_dir), warm, seed, arm)
                append_missing(args.out / EVALS_FILE, rows)
                cpu = cpu_record(Path(config.run_dir))["cpu_seconds"]
                print(f"{name}: done, accuracy {rows[-1]['accuracy']:.3f} ({cpu:.0f} CPU-s)", flush=True)
    write_report(args)


if __name__ == "__main__":
    main()
