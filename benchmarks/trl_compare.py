"""Peer comparison: TRL's GRPOTrainer vs the MedEyes trainer, single-turn GRPO, same model and budget.

Both train the tiny Idefics3 (random init, the same weights) on the same single-turn phantom prompts (the
environment with ``max_steps=0``: look at the overview, answer at once), with the same number of prompts per
step, rollouts per prompt, completion cap, temperature, optimizer (AdamW, same lr), no KL and one update per
batch. Measured: end-to-end training tokens per second (prompt + completion tokens of every sampled sequence,
divided by the wall time of the training steps: generation, scoring, log-probs, backward, optimizer step).

Runs wherever TRL is installed; the main venv has it (the ``trl`` extra, installed by scripts/setup.sh for
the TRL adapter's tests)::

    .venv/bin/python benchmarks/trl_compare.py --steps 6

Prints a table and writes ``docs/trl_compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def prompts(n: int, data: str, options: dict) -> list[dict]:
    """Single-turn prompts as TRL wants them: system + user text, the overview image in its own column."""
    from medeyes_env.env import EnvConfig, MedEyesEnv
    from medeyes_env.sources import open_cases

    source = open_cases(data, options)
    env = MedEyesEnv(source, split="train", config=EnvConfig(max_steps=0, view_size=128))
    rows = []
    for i in range(n):
        env.reset(options={"case_index": i})
        messages = env.chat_messages()
        system = messages[0]["content"][0]["text"]
        image = next(p["image"] for p in messages[1]["content"] if p["type"] == "image")
        text = next(p["text"] for p in messages[1]["content"] if p["type"] == "text")
        rows.append(
            {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": text}],
                "image": image,
                "case_index": i,
            }
        )
    return rows


def run_trl(model_dir: str, rows: list[dict], args: argparse.Namespace, out: Path) -> dict:
    """TRL GRPOTrainer: tokens per second from its own token counter and the wall time of train()."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from medeyes_env.env import EnvConfig, MedEyesEnv
    from medeyes_env.sources import open_cases

    source = open_cases(args.data, json.loads(args.data_options))
    env = MedEyesEnv(source, split="train", config=EnvConfig(max_steps=0, view_size=128))

    def reward(completions, case_index, **kwargs):  # the environment's own reward, one turn
        scores = []
        for completion, index in zip(completions, case_index, strict=True):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            env.reset(options={"case_index": int(index)})
            _, r, *_ = env.step(text.strip())
            scores.append(float(r))
        return scores

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self.t0)

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    config = GRPOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        num_iterations=1,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    timer = Timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    tokens = float(trainer.state.num_input_tokens_seen or 0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if not tokens:  # older TRL: count from the logged completion lengths
        tokens = float("nan")
    steady = timer.steps[1:] or timer.steps
    return {
        "trainer": "trl.GRPOTrainer",
        "steps": len(timer.steps),
        "wall_seconds": wall,
        "step_seconds": timer.steps,
        "tokens": tokens,
        "tokens_per_second": tokens / sum(timer.steps),
        "steady_tokens_per_second": tokens / len(timer.steps) * len(steady) / sum(steady),
        "last_log": logs[-1] if logs else {},
    }


def ours_config(
    model_dir: str, args: argparse.Namespace, run_dir: Path, *, steps: int, train_cases: int, env_max_steps: int
) -> dict[str, Any]:
    """The MedEyes config of this comparison: on-policy GRPO, ``args``' budget, no eval, checkpoints or logs.

    trainer_vs_bare.py builds its batch from the same settings.
    """
    return {
        "model": model_dir,
        "data": args.data,
        "data_options": json.loads(args.data_options),
        "run_dir": str(run_dir),
        "threads": args.threads,
        "stages": ["grpo"],
        "env": {"max_steps": env_max_steps, "view_size": 128},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "rollout_batch": args.prompts * args.group,
        "grpo": {
            "steps": steps,
            "mode": "on_policy",
            "prompts_per_step": args.prompts,
            "group_on": args.group,
            "optim": {"lr": args.lr, "grad_clip": 1.0},
        },
        "train_cases": train_cases,
        "eval": {"every": 0},
        "checkpoint_every": 0,
        "tensorboard": False,
        "progress": False,
    }


def run_ours(model_dir: str, args: argparse.Namespace, out: Path) -> dict:
    """The MedEyes trainer, single-turn on-policy GRPO with the same budget."""
    from medeyes.training.config import build_config
    from medeyes.training.metrics import read_metrics
    from medeyes.training.trainer import train

    config = build_config(
        ours_config(model_dir, args, out / "ours", steps=args.steps, train_cases=args.cases, env_max_steps=0)
    )
    start = time.perf_counter()
    train(config, resume=False)
    wall = time.perf_counter() - start
    rows = [r for r in read_metrics(config.run_dir) if "train/tokens" in r]
    steps = [r["train/step_seconds"] for r in rows]
    tokens = sum(r["train/tokens"] for r in rows)
    steady = steps[1:] or steps
    return {
        "trainer": "medeyes",
        "steps": len(rows),
        "wall_seconds": wall,
        "step_seconds": steps,
        "tokens": tokens,
        "tokens_per_second": tokens / sum(steps),
        "steady_tokens_per_second": sum(r["train/tokens"] for r in rows[1:] or rows) / sum(steady),
        "phases": {
            k: sum(r.get(k, 0.0) for r in rows)
            for k in ("train/rollout_seconds", "train/prep_seconds", "train/update_seconds")
        },
    }


def main() -> None:
    """Run both trainers in one process and print tokens per second side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="phantom:easy")
    parser.add_argument(
        "--data-options", default='{"families": ["presence", "modality"], "image_size": 512, "lesion_radius": [20, 36]}'
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "trl_compare.json")
    args = parser.parse_args()
    args.cases = args.steps * args.prompts

    import torch

    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="medeyes-trl-"))
    os.environ["MEDEYES_CACHE"] = str(cache)
    from medeyes.models.factory import ensure_tiny_model

    model_dir = str(ensure_tiny_model("idefics3", "tiny"))
    rows = prompts(args.cases, args.data, json.loads(args.data_options))
    results = {}
    try:
        results["ours"] = run_ours(model_dir, args, cache)
        try:
            results["trl"] = run_trl(model_dir, rows, args, cache)
        except Exception as exc:
            results["trl"] = {"trainer": "trl.GRPOTrainer", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    ours, trl = results["ours"], results["trl"]
    print(f"{'trainer':<18}{'steps':>6}{'tokens':>10}{'tokens/s':>12}{'steady tok/s':>14}")
    for r in (ours, trl):
        if "error" in r:
            print(f"{r['trainer']:<18} failed: {r['error'][:300]}")
            continue
        print(
            f"{r['trainer']:<18}{r['steps']:>6}{r['tokens']:>10.0f}{r['tokens_per_second']:>12.0f}"
            f"{r['steady_tokens_per_second']:>14.0f}"
        )
    if "error" not in trl:
        results["ratio"] = ours["tokens_per_second"] / trl["tokens_per_second"]
        results["steady_ratio"] = ours["steady_tokens_per_second"] / trl["steady_tokens_per_second"]
        print(f"ours / TRL: {results['ratio']:.2f}x (steady state {results['steady_ratio']:.2f}x)")
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    results["torch_threads"] = torch.get_num_threads()
    results["load_average"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
