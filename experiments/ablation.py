"""The MedEyes ablation on the phantom benchmark, at CPU scale: one command, results table and learning curves.

Variants (same budget: every variant runs the same number of optimizer steps after the same SFT warm start):

==================  ===============================================================================
sft_only            the warm start, continued with SFT for the same number of steps (paper: SFT baseline)
on_policy           GRPO on on-policy rollouts only
dual_paper          dual-stream GRPO, per-stream advantage statistics (the paper)
dual_luffy          dual-stream GRPO, expert advantages against the on-policy baseline + policy shaping (LUFFY)
no_cvs              dual_paper with the expert's choices greedy instead of CVS-sampled (w/o CVS)
no_grn              dual_paper with random-region expert trajectories (w/o GRN)
scan_only           dual_paper with a scan-only expert
drill_only          dual_paper with a drill-only expert
==================  ===============================================================================

Per seed, the ground stage is trained once (``<runs>/seed<s>/ground``); per seed and warm start, SFT from it
once (``<runs>/<warm>/seed<s>/sft``), and every variant starts from that model, so differences come from the
last stage alone. Two warm starts:

- ``expert``: SFT on the GRN + CVS demonstrations (the default's): the policy already looks in the right place;
- ``format``: SFT on format-valid trajectories whose boxes are random (the expert's ``random`` mode): it
  teaches the protocol and the habit of looking, not where to look, so RL must find the place by itself.

Every run resumes if interrupted, finished
runs are skipped, and after each run the table (``docs/ablation.md``), the per-run rows
(``docs/ablation_runs.jsonl``) and the plot (``docs/ablation_curves.png``) are rewritten, so partial results
survive. Usage::

    python experiments/ablation.py                      # 3 seeds x 8 variants x 2 warm starts
    python experiments/ablation.py --seeds 0 --variants on_policy dual_paper --grpo-steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "sft_only": {"stages": ["sft"]},
    "on_policy": {"grpo.mode": "on_policy"},
    "dual_paper": {"grpo.mode": "dual", "objective.advantage_mode": "per_stream"},
    "dual_luffy": {
        "grpo.mode": "dual",
        "objective.advantage_mode": "on_baseline",
        "objective.off_policy_shaping": True,
    },
    "no_cvs": {"grpo.mode": "dual", "expert.agent.mode": "greedy"},
    "no_grn": {"grpo.mode": "dual", "expert.agent.mode": "random"},
    "scan_only": {"grpo.mode": "dual", "expert.agent.mode": "scan_only"},
    "drill_only": {"grpo.mode": "dual", "expert.agent.mode": "drill_only"},
}
ROOT = Path(__file__).resolve().parent.parent
WARM_STARTS: dict[str, dict[str, Any]] = {"expert": {}, "format": {"expert.agent.mode": "random"}}
"""What the shared warm start's SFT imitates: the GRN + CVS expert, or format-valid random-box trajectories."""


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The shared settings: the CPU default's task, with the ablation's budget."""
    from medeyes.training.config import PRESETS

    data = PRESETS["cpu-default"]()
    data.update(progress=False, tensorboard=False, threads=args.threads, checkpoint_every=5)
    data["eval"] = {**data["eval"], "cases": args.eval_cases, "every": args.eval_every}
    data["grpo"] = {**data["grpo"], "prompts_per_step": args.prompts_per_step}
    if getattr(args, "ground_steps", None) is not None:
        data["ground"] = {**data["ground"], "steps": args.ground_steps}
    return data


CURVE_KEYS = {
    "accuracy": "eval/accuracy",
    "presence": "eval/accuracy/presence",
    "iou": "eval/iou",
    "tool_steps": "eval/steps",
}
"""The learning curves recorded per run (and plotted per warm start)."""


def run_one(name: str, config: Any) -> dict[str, Any]:
    """Train (or resume, or skip when finished) one run; return its evaluation summary."""
    from medeyes.training.metrics import read_metrics
    from medeyes.training.trainer import train

    done = config.run_dir / "final" / "config.json"
    started = time.time()
    if not done.is_file():
        train(config)
    rows = read_metrics(config.run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    last = evals[-1] if evals else {}
    grpo = [r for r in rows if "stream/on/tool_share" in r]  # the GRPO steps

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in grpo if key in r]
        return statistics.fmean(values) if values else None

    return {
        "run": name,
        "run_dir": str(config.run_dir),
        "seconds": time.time() - started,
        "curve": [(r["step"], r["eval/accuracy"]) for r in evals],
        "curves": {name: [(r["step"], r[key]) for r in evals if key in r] for name, key in CURVE_KEYS.items()},
        "accuracy": last.get("eval/accuracy"),
        "iou": last.get("eval/iou"),
        "steps": last.get("eval/steps"),
        "reward": last.get("eval/reward"),
        "parse_rate": last.get("eval/parse_rate"),
        "turns": last.get("eval/turns"),
        "start_accuracy": evals[0]["eval/accuracy"] if evals else None,
        "blind_accuracy": last.get("eval/blind_accuracy"),
        "by_family": {k.split("/")[-1]: v for k, v in last.items() if k.startswith("eval/accuracy/")},
        # training-time health of the variant's GRPO steps (None for sft_only)
        "expert_adv_zero_frac": mean_of("stream/off/adv_zero_frac"),
        "on_tool_share": mean_of("stream/on/tool_share"),
        "on_accuracy_with_tool": mean_of("stream/on/accuracy_with_tool"),
        "on_best_iou": mean_of("stream/on/reward/best_iou"),
        "presence": last.get("eval/accuracy/presence"),
    }


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def write_table(rows: list[dict[str, Any]], path: Path, header: str) -> None:
    """Markdown tables, one per warm start: mean ± std over seeds of held-out numbers and GRPO health."""
    lines = [header]
    for warm in WARM_STARTS:
        lines += [
            "",
            f"## Warm start: {warm}",
            "",
            "| variant | seeds | held-out accuracy | presence | IoU | tool steps | parse rate | accuracy at start "
            "| expert rows with advantage 0 | on-policy tool share | on-policy best IoU |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            mine = [r for r in rows if r["variant"] == variant and r.get("warm", "expert") == warm]
            if not mine:
                continue
            lines.append(
                f"| {variant} | {','.join(str(r['seed']) for r in mine)} | "
                f"{_mean_std([r['accuracy'] for r in mine])} | "
                f"{_mean_std([r.get('presence') for r in mine])} | "
                f"{_mean_std([r['iou'] for r in mine])} | {_mean_std([r['steps'] for r in mine])} | "
                f"{_mean_std([r.get('parse_rate') for r in mine])} | "
                f"{_mean_std([r['start_accuracy'] for r in mine])} | "
                f"{_mean_std([r.get('expert_adv_zero_frac') for r in mine])} | "
                f"{_mean_std([r.get('on_tool_share') for r in mine])} | "
                f"{_mean_std([r.get('on_best_iou') for r in mine])} |"
            )
    blind = [r["blind_accuracy"] for r in rows if r.get("blind_accuracy") is not None]
    if blind:
        lines += ["", f"Blind majority-answer baseline (format-perfect, ignores the image): {blind[0]:.3f}."]
    path.write_text("\n".join(lines) + "\n")


def plot_all(rows: list[dict[str, Any]], out: Path) -> None:
    """docs/ablation_curves.png (accuracy, expert warm start) and one PNG per warm start and curve."""
    plot_curves([r for r in rows if r.get("warm", "expert") == "expert"], out / "ablation_curves.png")
    for warm in WARM_STARTS:
        mine = [r for r in rows if r.get("warm", "expert") == warm]
        for name in CURVE_KEYS:
            plot_curves(mine, out / f"ablation_{warm}_{name}.png", name, f"{name} ({warm} warm start)")


def plot_curves(
    rows: list[dict[str, Any]], path: Path, metric: str = "accuracy", title: str = "held-out accuracy"
) -> None:
    """A held-out curve against GRPO step, mean over seeds per variant, drawn with Pillow (no matplotlib)."""
    from PIL import Image, ImageDraw

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for variant in VARIANTS:
        mine = [r.get("curves", {}).get(metric, r["curve"] if metric == "accuracy" else []) for r in rows]
        mine = [c for c, r in zip(mine, rows, strict=True) if r["variant"] == variant and c]
        if not mine:
            continue
        steps = sorted({s for curve in mine for s, _ in curve})
        curves[variant] = [(s, statistics.fmean(v for curve in mine for t, v in curve if t == s)) for s in steps]
    width, height, left, right, top, bottom = 900, 520, 70, 200, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if not curves:
        image.save(path)
        return
    xs = [s for c in curves.values() for s, _ in c]
    ys = [v for c in curves.values() for _, v in c]
    blind = next((r["blind_accuracy"] for r in rows if r.get("blind_accuracy") is not None), None)
    if metric != "accuracy":
        blind = None
    if blind is not None:
        ys.append(blind)
    x0, x1 = min(xs), max(xs) or 1
    y0, y1 = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)
    if y1 - y0 < 0.1:
        y1 = y0 + 0.1

    def px(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x0) / max(1e-9, x1 - x0) * (width - left - right)
        y = height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        value = y0 + (y1 - y0) * i / 5
        _, y = px(x0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    for step in sorted(set(xs)):
        x, _ = px(step, y0)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 6, height - bottom + 8), f"{int(step)}", fill="black")
    draw.text((left, 12), f"Held-out {title} vs. steps after the warm start (mean over seeds)", fill="black")
    draw.text((width // 2 - 60, height - 22), "optimizer steps", fill="black")
    if blind is not None:
        a, b = px(x0, blind), px(x1, blind)
        for k in range(0, int(b[0] - a[0]), 12):
            draw.line([a[0] + k, a[1], a[0] + k + 6, a[1]], fill="gray")
        draw.text((width - right + 10, a[1] - 6), "blind baseline", fill="gray")
    for i, (variant, curve) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        points = [px(s, v) for s, v in curve]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 18 * i
        draw.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=3)
        draw.text((width - right + 36, ly), variant, fill="black")
    image.save(path)


def main() -> None:
    """Run the ablation (resumable) and write docs/ablation.md, docs/ablation_runs.jsonl, docs/ablation_curves.png."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--sft-steps", type=int, default=None, help="SFT steps of the warm start (default: cpu-default's)."
    )
    parser.add_argument("--ground-steps", type=int, default=None, help="Ground steps (default: cpu-default's).")
    parser.add_argument("--warm-starts", nargs="+", default=list(WARM_STARTS), choices=list(WARM_STARTS))
    parser.add_argument("--grpo-steps", type=int, default=8, help="Steps of every variant after the warm start.")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=2, help="GRPO cases per step (G_on=8, G_off=4 each).")
    parser.add_argument("--eval-cases", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--report-only", action="store_true", help="Rebuild table and plot from finished runs.")
    args = parser.parse_args()

    from medeyes.training.config import build_config

    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "ablation_runs.jsonl"
    rows: list[dict[str, Any]] = []
    if rows_path.exists():
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    if args.report_only:  # re-read every finished run's metrics (adds fields older rows lack)
        from types import SimpleNamespace

        rebuilt = []
        for row in rows:
            fresh = run_one(row["run"], SimpleNamespace(run_dir=Path(row["run_dir"])))
            keep = {"variant": row["variant"], "seed": row["seed"], "seconds": row["seconds"]}
            rebuilt.append({**fresh, **keep, "warm": row.get("warm", "expert")})
        rows = rebuilt
    shared = base_config(args)
    header = (
        f"# Ablation on the phantom look benchmark (CPU scale)\n\nTiny Idefics3 (random init); warm start: "
        f"{shared['ground']['steps']} ground steps, then {args.sft_steps or shared['sft']['steps']} SFT steps on the "
        f"expert's or on random-box demonstrations; then {args.grpo_steps} steps per variant; held-out accuracy on "
        f"{args.eval_cases} test cases (greedy), mean ± std over seeds. Produced by `python experiments/ablation.py`."
        "\n\nExpert advantages: `dual_paper` uses the paper's per-stream statistics; every other dual-stream "
        "variant inherits the CPU default's LUFFY-style baseline (`on_baseline`, shaping on), so the expert-data "
        "ablations (no_cvs, no_grn, scan_only, drill_only) compare against `dual_luffy`."
    )
    todo = [] if args.report_only else [(seed, warm) for seed in args.seeds for warm in args.warm_starts]
    for seed, warm_name in todo:
        base = base_config(args)
        # the ground stage does not depend on the warm start: train it once per seed, then SFT from it
        ground_steps = base["ground"]["steps"]
        seeing = build_config(
            base,
            {
                "seed": seed,
                "stages": ["ground"],
                "eval.every": ground_steps,  # one evaluation at the end (with held-out grounding)
                "checkpoint_every": 100,
                "run_dir": str(args.runs / f"seed{seed}" / "ground"),
            },
        )
        run_one(f"seed{seed}/ground", seeing)
        warm_overrides: dict[str, Any] = {
            "seed": seed,
            "model": str(seeing.run_dir / "final"),
            "stages": ["sft"],
            "eval.every": args.sft_steps or base["sft"]["steps"],
            "checkpoint_every": 100,
            "run_dir": str(args.runs / warm_name / f"seed{seed}" / "sft"),
            **WARM_STARTS[warm_name],
        }
        if args.sft_steps is not None:
            warm_overrides["sft.steps"] = args.sft_steps
        warm = build_config(base, warm_overrides)
        run_one(f"{warm_name}/seed{seed}/sft", warm)
        warm_model = str(warm.run_dir / "final")
        for variant in args.variants:
            if any(
                r["variant"] == variant and r["seed"] == seed and r.get("warm", "expert") == warm_name for r in rows
            ):
                continue
            overrides: dict[str, Any] = {
                "seed": seed,
                "model": warm_model,
                "stages": ["grpo"] if variant != "sft_only" else ["sft"],
                "grpo.steps": args.grpo_steps,
                "sft.steps": args.grpo_steps,
                "run_dir": str(args.runs / warm_name / f"seed{seed}" / variant),
            }
            if variant == "sft_only":  # continues the warm start's own SFT data; the GRPO arms use their expert
                overrides.update(WARM_STARTS[warm_name])
            overrides.update({k: v for k, v in VARIANTS[variant].items() if k != "stages"})
            config = build_config(base, overrides)
            result = run_one(f"{warm_name}/seed{seed}/{variant}", config)
            result.update(variant=variant, seed=seed, warm=warm_name)
            rows.append(result)
            with rows_path.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            write_table(rows, args.out / "ablation.md", header)
            plot_all(rows, args.out)
            print(
                f"{warm_name} seed {seed} {variant}: accuracy {result['accuracy']} ({result['seconds']:.0f} s)",
                flush=True,
            )
    write_table(rows, args.out / "ablation.md", header)
    plot_all(rows, args.out)


if __name__ == "__main__":
    main()
