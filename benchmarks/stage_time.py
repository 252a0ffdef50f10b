"""Where the ground stage's and the held-out evaluation's time goes, per 1,000 examples / cases (issue 24 item 4).

A ``Trainer`` is built from the default config (``medeyes train``: tiny Idefics3, ``phantom:look``) as
:func:`medeyes.training.trainer.train` builds it, then the real code paths run with timers wrapped around the
real functions (``time.perf_counter`` totals; nothing is re-implemented):

- **ground, making the examples**: ``build_ground_pool`` on ``--ground-cases`` training cases, split into case
  drawing (``PhantomSource._draw``), rendering (``medeyes_env.sources.phantom.render.render``), the views
  (``views.overview`` / ``views.drill_view``: crop, resize) and the rest (box text, messages);
- **ground, processor / tokenisation**: ``GroundPool.episodes`` over every pool example (each is tokenised once
  per run and cached);
- **ground, the update**: ``GroundStage.step`` (``--ground-steps`` steps of ``ground.batch_size``), split into
  collate, forward + backward (``Learner.accumulate``) and the optimizer step (``StageOptimizer.step``);
- **held-out evaluation**: ``Trainer.evaluate`` (greedy episodes on ``eval.cases`` test cases, then the grounding
  eval on the same cases), split into rendering, generation (``TransformersBackend.generate``: its processor
  call ``encode`` and the model's ``generate``), scoring (``score_episode`` in the env, ``summarize``,
  ``grounding_scores``) and the rest (env reset and step: views, parsing, rollout bookkeeping). The first
  evaluation of a run also renders the grounding eval's examples (once per run); the second is the steady one.

The model is the random-init tiny model after ``--ground-steps`` ground steps: greedy generation of an untrained
model runs to the 48-token cap more often than a trained one, so the generation share is an upper end::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stage_time.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

TOTALS: dict[str, float] = defaultdict(float)
"""Seconds spent inside each wrapped function, by label."""


def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` adding its wall time to ``TOTALS[label]``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - t

    return wrapper


def wrap_everywhere(fn: Callable[..., Any], label: str) -> int:
    """Replace ``fn`` by its timed wrapper in every loaded module that holds it by name; how many did."""
    wrapped = timed(label, fn)
    count = 0
    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is fn:
                setattr(module, name, wrapped)
                count += 1
    return count


def wrap_method(cls: type, name: str, label: str) -> None:
    """Time ``cls.name`` (a method) under ``label``."""
    setattr(cls, name, timed(label, getattr(cls, name)))


def build_trainer(args: argparse.Namespace, run_dir: Path) -> tuple[Any, float]:
    """A ``Trainer`` of the default config, built as ``train`` builds it, and the seconds its ground pool took.

    No expert demonstrations are built: no sft step runs here. The timers are installed before the pool is made.
    """
    from medeyes.agents.backends.transformers import TransformersBackend
    from medeyes.agents.policy import PolicyAgent
    from medeyes.models.factory import load_policy_model
    from medeyes.training.config import PRESETS, build_config
    from medeyes.training.metrics import MetricsLogger
    from medeyes.training.rollout_engine import make_rollout_engine
    from medeyes.training.run_setup import param_dtype_name, seed_everything
    from medeyes.training.stages.ground import build_ground_pool
    from medeyes.training.trainer import Trainer
    from medeyes_env.sources import open_cases

    overrides = {
        "run_dir": str(run_dir),
        "ground.cases": args.ground_cases,
        "eval.cases": args.eval_cases,
        "tensorboard": False,
        "progress": False,
        **{key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)},
    }
    cfg = build_config(PRESETS["cpu-default"](), overrides)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, processor = load_policy_model(cfg.model, device=cfg.device, dtype=param_dtype_name(cfg))
    source = open_cases(cfg.data, cfg.data_options.model_dump())
    logger = MetricsLogger(run_dir, tensorboard=False)
    policy = PolicyAgent(TransformersBackend(model, processor, device=cfg.device), cfg.sampling, name="policy")
    engine = make_rollout_engine(cfg, policy, param_dtype_name(cfg), 0)
    install_timers()
    t = time.perf_counter()
    pool = build_ground_pool(cfg.ground, cfg.env, source, cfg.train_split, cfg.seed)
    seconds = time.perf_counter() - t
    trainer = Trainer(cfg, model, processor, policy, source, None, logger, cfg.expert.cases, pool, engine)
    return trainer, seconds


def install_timers() -> None:
    """Wrap the real functions whose time the tables split out."""
    import medeyes.training.stages._step as step_module
    from medeyes.agents.backends.transformers import TransformersBackend
    from medeyes.training import trainer as trainer_module
    from medeyes.training.optim import StageOptimizer
    from medeyes.training.stages import ground
    from medeyes.training.stages._step import Learner
    from medeyes_env import rewards, views
    from medeyes_env.episode_score import EpisodeScore
    from medeyes_env.sources.phantom import render as render_module
    from medeyes_env.sources.phantom.source import PhantomSource

    if wrap_everywhere(render_module.render, "render") == 0:
        raise SystemExit("medeyes_env.sources.phantom.render.render is imported nowhere: update this benchmark")
    wrap_method(PhantomSource, "_draw", "draw")
    views.overview = timed("views", views.overview)
    views.drill_view = timed("views", views.drill_view)
    wrap_method(Learner, "accumulate", "forward+backward")
    step_module.collate = timed("collate", step_module.collate)
    wrap_method(StageOptimizer, "step", "optimizer")
    wrap_method(TransformersBackend, "generate", "generate")
    wrap_method(TransformersBackend, "encode", "encode")
    wrap_method(TransformersBackend, "encode_with_turns", "encode")
    wrap_everywhere(rewards.score_episode, "score")  # whole-episode scoring, wherever it is still called
    for name in ("__init__", "add_turn", "breakdown"):  # the env scores one turn at a time
        wrap_method(EpisodeScore, name, "score")
    trainer_module.summarize = timed("score", trainer_module.summarize)
    ground.grounding_scores = timed("score", ground.grounding_scores)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the pieces once each and return their seconds and counts."""
    from medeyes.training.stages.ground import GroundStage

    run_dir = Path(tempfile.mkdtemp(prefix="medeyes-stage-time-"))
    # ground: make the pool (as train() does), tokenise every example, then the update steps
    TOTALS.clear()
    trainer, seconds = build_trainer(args, run_dir)
    cfg = trainer.config
    stage: GroundStage = trainer.stages["ground"]
    examples = stage.pool.examples
    out: dict[str, Any] = {"config": {"ground_cases": cfg.ground.cases, "batch_size": cfg.ground.batch_size}}
    out["make"] = {"seconds": seconds, "examples": len(examples), **dict(TOTALS)}
    TOTALS.clear()
    t = time.perf_counter()
    stage.pool.episodes(range(len(examples)))
    out["tokenise"] = {"seconds": time.perf_counter() - t, "examples": len(examples)}
    trainer.optim.ensure("ground", None)
    stage.step(0)  # warm-up (first allocations)
    TOTALS.clear()
    t = time.perf_counter()
    for step in range(1, args.ground_steps + 1):
        stage.step(step)
    out["update"] = {
        "seconds": time.perf_counter() - t,
        "examples": args.ground_steps * cfg.ground.batch_size,
        **dict(TOTALS),
    }

    # held-out evaluation: the first one of a run (builds the grounding eval's examples), then a steady one
    for name in ("eval_first", "eval_steady"):
        TOTALS.clear()
        t = time.perf_counter()
        metrics = trainer.evaluate()
        out[name] = {
            "seconds": time.perf_counter() - t,
            "cases": cfg.eval.cases,
            "turns": metrics["eval/turns"],
            **dict(TOTALS),
        }
    trainer.engine.close()
    return out


def per_thousand(seconds: float, count: int) -> float:
    """Seconds per 1,000 items."""
    return 1000.0 * seconds / max(count, 1)


def ground_table(m: dict[str, Any], title: str) -> tuple[Table, dict[str, float]]:
    """Per-1,000-example rows of the ground stage, and the default run's projection."""
    make, tok, upd = m["make"], m["tokenise"], m["update"]
    n, trained = make["examples"], upd["examples"]
    render, draw, view = make.get("render", 0.0), make.get("draw", 0.0), make.get("views", 0.0)
    fwd_bwd = upd.get("forward+backward", 0.0)
    collate = upd.get("collate", 0.0)
    optim = upd.get("optimizer", 0.0)
    rows = [
        ("making the examples (once per run)", make["seconds"], n),
        ("  case drawing", draw, n),
        ("  rendering", render, n),
        ("  views: overview / drill crop + resize", view, n),
        ("  the rest (boxes, text, messages)", make["seconds"] - render - draw - view, n),
        ("processor / tokenisation (once per example)", tok["seconds"], n),
        ("update (per example drawn)", upd["seconds"], trained),
        ("  collate", collate, trained),
        ("  forward + backward (incl. collate)", fwd_bwd, trained),
        ("  optimizer step", optim, trained),
        ("  the rest (picks, lr)", upd["seconds"] - fwd_bwd - optim, trained),
    ]
    once = per_thousand(make["seconds"], n) + per_thousand(tok["seconds"], n) + per_thousand(upd["seconds"], trained)
    table = Table(title=title)
    for column in ("ground stage", "s per 1,000 examples", "share of made + tokenised + trained once"):
        table.add_column(column, justify="left" if column == "ground stage" else "right")
    for label, seconds, count in rows:
        s = per_thousand(seconds, count)
        table.add_row(label, f"{s:.2f}", f"{s / once:.1%}")
    table.add_row("one example made, tokenised and trained once", f"{once:.2f}", "100%")
    # the default run: ground.cases cases make the pool once; ground.steps x batch_size examples are drawn
    per_case = n / m["config"]["ground_cases"]
    pool = per_case * 1024
    drawn = 1500 * m["config"]["batch_size"]
    stage = {
        "make": per_thousand(make["seconds"], n) * pool / 1000,
        "render": per_thousand(render, n) * pool / 1000,
        "tokenise": per_thousand(tok["seconds"], n) * pool / 1000,
        "update": per_thousand(upd["seconds"], trained) * drawn / 1000,
    }
    stage["total"] = stage["make"] + stage["tokenise"] + stage["update"]
    stage["pool_examples"] = pool
    stage["drawn"] = drawn
    return table, stage


def eval_table(m: dict[str, Any], title: str) -> Table:
    """Per-1,000-case rows of the first and the steady held-out evaluation."""
    table = Table(title=title)
    table.add_column("held-out evaluation", justify="left")
    for name in ("first (+ grounding eval built)", "steady"):
        table.add_column(f"{name}: s per 1,000 cases", justify="right")
        table.add_column("share", justify="right")
    first, steady = m["eval_first"], m["eval_steady"]

    def split(e: dict[str, Any]) -> list[tuple[str, float]]:
        gen, enc = e.get("generate", 0.0), e.get("encode", 0.0)
        render, score = e.get("render", 0.0), e.get("score", 0.0)
        return [
            ("total", e["seconds"]),
            ("rendering", render),
            ("generation", gen),
            ("  processor (encode)", enc),
            ("  model.generate and the rest", gen - enc),
            ("scoring (rewards, summary, grounding scores)", score),
            ("the rest (env views, parsing, examples)", e["seconds"] - render - gen - score),
        ]

    for (label, a), (_, b) in zip(split(first), split(steady), strict=True):
        table.add_row(
            label,
            f"{per_thousand(a, first['cases']):.2f}",
            f"{a / first['seconds']:.1%}",
            f"{per_thousand(b, steady['cases']):.2f}",
            f"{b / steady['seconds']:.1%}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ground-cases", type=int, default=256, help="training cases in the ground pool (run: 1024)")
    parser.add_argument("--ground-steps", type=int, default=10, help="timed ground steps (after one warm-up step)")
    parser.add_argument("--eval-cases", type=int, default=128, help="held-out cases per evaluation (run: 128)")
    parser.add_argument(
        "--set", action="append", default=[], help="a config override KEY=VALUE, e.g. data_options.cache_size=256"
    )
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON too")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    m = measure(args)
    load_after = os.getloadavg()[0]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    where = f"{' '.join(args.set) or 'default config'}; OMP_NUM_THREADS={threads}; "
    where += f"load average {load_before:.2f} before, {load_after:.2f} after"
    table, stage = ground_table(
        m, f"ground stage: {m['make']['examples']} examples of {args.ground_cases} cases, {args.ground_steps} steps"
    )
    console = Console(width=120)
    console.print(table)
    console.print(
        f"default run's ground stage (pool of {stage['pool_examples']:.0f} examples from 1,024 cases, "
        f"{stage['drawn']:,} drawn): making {stage['make']:.1f} s (rendering {stage['render']:.1f} s), tokenising "
        f"{stage['tokenise']:.1f} s, updates {stage['update']:.1f} s; rendering "
        f"{stage['render'] / stage['total']:.1%} of {stage['total']:.0f} s"
    )
    console.print(eval_table(m, f"held-out evaluation, {args.eval_cases} cases, ({where})"))
    console.print(
        f"turns per episode {m['eval_steady']['turns']:.2f}; {where}",
    )
    if args.json:
        print(json.dumps({"measured": m, "ground_run": stage, "load": [load_before, load_after]}))


if __name__ == "__main__":
    main()
