"""The single-process trainer: the loop over the stages, held-out evaluation, checkpoints, and :func:`train`.

A run is a sequence of stages over one global step counter (``config.stages``); each stage is one module of
:mod:`medeyes.training.stages` whose ``step(step)`` reads top to bottom:

    ground    NLL of single-image grounding answers (random-init models learn to see)  stages/ground.py
    sft       NLL of the expert's turns (the warm start)                                  stages/sft.py
    grpo      collect, tokenise, score, advantages, dual-stream update                   stages/grpo.py

Every random choice of step s derives from (config.seed, s, salt) (:mod:`medeyes.training.schedule`), so an
exact resume needs no RNG juggling. Evaluation runs greedy episodes on a fixed held-out set at step 0, every
``eval.every`` steps and at the end. A checkpoint (model, optimizer, RNG, step) is written atomically every
``checkpoint_every`` steps; :func:`train` resumes from the latest one by default. Metrics go to metrics.jsonl
and TensorBoard in the namespaces train/, eval/, stream/on/, stream/off/.

Use :func:`train` (builds every piece from a :class:`TrainConfig`) or :class:`Trainer` with your own pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medeyes.agents.policy import PolicyAgent
from medeyes.evaluation.blind import blind_accuracy
from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.rollout_summary import summarize
from medeyes.training.checkpoints import check_same_config, load_checkpoint, save_checkpoint, save_final
from medeyes.training.config import TrainConfig
from medeyes.training.expert_data import ExpertPool
from medeyes.training.metrics import MetricsLogger, progress_bar, progress_stats, tool_use_accuracy
from medeyes.training.optim import StageOptimizer
from medeyes.training.rollout_engine import RolloutEngine, make_rollout_engine
from medeyes.training.run_setup import (
    autocast_dtype,
    expert_pool,
    open_run_dir,
    param_dtype_name,
    seed_everything,
)
from medeyes.training.stage_config import HeldOutEvalConfig
from medeyes.training.stages._step import Learner, seed_sampling
from medeyes.training.stages.ground import GroundingEval, GroundPool, GroundStage, build_ground_pool
from medeyes.training.stages.grpo import GRPOStage, RolloutSetting
from medeyes.training.stages.sft import SFTStage
from medeyes_env.env import EnvConfig
from medeyes_env.sources import CaseSource, open_cases

LIVE_KEYS = ("train/loss", "stream/on/reward_mean", "stream/on/tool_share", "alarm/tool_collapse", "eval/accuracy")


# ================================================================================================ the trainer


@dataclass
class TrainResult:
    """What a run produced: where, how long, and the held-out accuracy at its first and last evaluation."""

    run_dir: Path
    steps: int
    seconds: float
    resumed_from: int | None
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    blind_accuracy: float | None = None


STAGE_CODES = {"ground": -1.0, "sft": 0.0, "grpo": 1.0}
"""``train/stage`` in metrics.jsonl."""


class Trainer:
    """Runs the stages of a :class:`TrainConfig` on pieces built elsewhere (see :func:`train`)."""

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        processor: Any,
        policy: PolicyAgent,
        source: CaseSource,
        experts: ExpertPool | None,
        logger: MetricsLogger,
        pool_cases: int,
        ground_pool: list[tuple[list[dict[str, Any]], str]] | None = None,
        engine: RolloutEngine | None = None,
    ):
        """Keep the pieces and build the stages; nothing heavy happens here.

        ``engine``: who generates grpo rollouts (default ``policy``); ``ground_pool``: the ground stage's examples
        (:func:`~medeyes.training.stages.ground.build_ground_pool`).
        """
        self.config = config
        self.model = model
        self.processor = processor
        self.policy = policy
        self.engine = engine or RolloutEngine(policy)
        self.source = source
        self.experts = experts
        self.logger = logger
        self.pool_cases = pool_cases
        self.optim = StageOptimizer(config, model)
        self.learner = Learner(model, processor, torch.device(config.device), autocast_dtype(config), self.optim)
        pool = GroundPool(ground_pool or [], processor)
        rollouts = RolloutSetting(source, config.train_split, config.env, config.rollout_batch, pool_cases)
        grpo_start = first_step(config, "grpo")
        self.stages = {
            "ground": GroundStage(config.ground, config.seed, pool, self.learner),
            "sft": SFTStage(config.sft, config.seed, experts, pool, self.learner),
            "grpo": GRPOStage(
                config.grpo, config.objective, config.seed, grpo_start, rollouts, self.engine, experts, self.learner
            ),
        }
        self._ground_eval: GroundingEval | None = None
        self.eval_history: list[dict[str, float]] = []
        self.blind: float | None = None
        self.live: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ the loop

    def fit(
        self,
        start_step: int = 0,
        optimizer_state: dict | None = None,
        optimizer_stage: str | None = None,
        max_steps: int | None = None,
    ) -> TrainResult:
        """Train from ``start_step`` to ``config.total_steps``; evaluate and checkpoint on schedule.

        ``optimizer_state`` (from a checkpoint) is loaded when ``optimizer_stage`` is the stage of
        ``start_step``; a checkpoint taken at a stage boundary starts the next stage with a fresh AdamW.
        ``max_steps`` stops (after a checkpoint) once this call has run that many steps: a time slice.
        """
        cfg = self.config
        total = cfg.total_steps
        stop = total if max_steps is None else min(total, start_step + max_steps)
        started = time.perf_counter()
        self.blind = self._blind_accuracy()
        if start_step < total and optimizer_state is not None and optimizer_stage == cfg.stage_at(start_step)[0]:
            self.optim.ensure(optimizer_stage, optimizer_state)

        def stats() -> str:
            return progress_stats(self.live, self.blind, cfg.grpo.tool_floor)

        with progress_bar(cfg.progress, total, start_step, stats) as advance:
            if start_step == 0 and cfg.eval.every:
                self.logger.log(0, self._evaluate_and_remember(0))
            for step in range(start_step, stop):
                # Row `done` of metrics.jsonl describes the state after `done` optimizer updates.
                stage, _ = cfg.stage_at(step)
                self.optim.ensure(stage, None)
                t0 = time.perf_counter()
                metrics = self.stages[stage].step(step)
                metrics["train/step_seconds"] = time.perf_counter() - t0
                metrics["train/stage"] = STAGE_CODES[stage]
                done = step + 1
                evaluate = cfg.eval.every and (done % cfg.eval.every == 0 or done == total)
                if evaluate:
                    metrics.update(self._evaluate_and_remember(done))
                metrics["train/elapsed_seconds"] = time.perf_counter() - started
                if evaluate or done % cfg.log_every == 0 or done == total:
                    self.logger.log(done, metrics)
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done in (total, stop):
                    self._checkpoint(done)
                self.live.update({k: v for k, v in metrics.items() if k in LIVE_KEYS})
                advance(stage)
        if stop == total:
            save_final(cfg.run_dir / "final", self.model, self.processor)
        self.logger.close()
        evals = self.eval_history
        return TrainResult(
            run_dir=cfg.run_dir,
            steps=stop,
            seconds=time.perf_counter() - started,
            resumed_from=start_step or None,
            first_eval=evals[0] if evals else {},
            last_eval=evals[-1] if evals else {},
            blind_accuracy=self.blind,
        )

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Greedy episodes on ``eval.cases`` eval-split cases from ``eval.start``: accuracy, IoU, steps, health."""
        cfg = self.config
        self.model.eval()
        sampling = self.policy.sampling
        self.policy.sampling = sampling.model_copy(update={"temperature": cfg.eval.temperature, "seed": cfg.seed})
        seed_sampling(self.policy, cfg.seed)
        try:
            with self.learner.autocast():
                out = held_out_metrics(self.policy, self.source, cfg.eval_split, cfg.eval, cfg.env, cfg.seed)
        finally:
            self.policy.sampling = sampling
        if "ground" in cfg.stages:
            if self._ground_eval is None:
                indices = cfg.eval.indices(self.source.size(cfg.eval_split))
                self._ground_eval = GroundingEval(self.source, cfg.eval_split, indices, cfg.env, cfg.ground, cfg.seed)
            with self.learner.autocast():
                out.update(self._ground_eval.scores(self.policy.backend))
        if self.blind is not None:
            out["eval/blind_accuracy"] = self.blind
        return out

    def _evaluate_and_remember(self, step: int) -> dict[str, float]:
        metrics = self.evaluate()
        self.eval_history.append({"step": float(step), **metrics})
        self.live["eval/accuracy"] = metrics["eval/accuracy"]
        return metrics

    def _blind_accuracy(self) -> float:
        cfg = self.config
        train = [self.source.case(cfg.train_split, i) for i in range(self.pool_cases)]  # type: ignore[arg-type]
        indices = cfg.eval.indices(self.source.size(cfg.eval_split))
        held = [self.source.case(cfg.eval_split, i) for i in indices]  # type: ignore[arg-type]
        return blind_accuracy(train, held)

    # ------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint(self, step: int) -> None:
        cfg = self.config
        extra = {
            "stage": self.optim.stage,
            "config": cfg.model_dump(mode="json"),
            "eval_history": self.eval_history,
        }
        save_checkpoint(cfg.run_dir, step, self.model, self.optim.optimizer, extra, cfg.keep_checkpoints)


def first_step(config: TrainConfig, stage: str) -> int:
    """The global step at which ``stage`` starts (its steps are counted from there)."""
    before = config.stages[: config.stages.index(stage)] if stage in config.stages else []  # type: ignore[arg-type]
    return sum(config.stage_steps(s) for s in before)


# ================================================================================================ evaluation


def held_out_metrics(
    policy: PolicyAgent, source: CaseSource, split: str, config: HeldOutEvalConfig, env: EnvConfig, seed: int
) -> dict[str, float]:
    """``eval/`` metrics of one episode on each of ``split``'s ``eval.cases`` cases from ``eval.start``.

    The caller puts the policy in eval mode and seeds it; this only plays and scores.
    """
    rollout = RolloutConfig(
        split=split,  # type: ignore[arg-type]
        start=config.start,
        n=config.cases,
        samples_per_case=1,
        batch_size=config.batch_size,
        seed=seed,
        env=env,
    )
    result = run_rollout(policy, source, rollout, store=None)
    summary = summarize(result.records, result.seconds)
    out = {
        "eval/accuracy": summary.accuracy,
        "eval/iou": summary.mean_best_iou,
        "eval/steps": summary.mean_steps,
        "eval/turns": summary.mean_turns,
        "eval/reward": summary.mean_reward,
        "eval/parse_rate": summary.parse_rate,
        "eval/scan_share": summary.scan_share,
        "eval/drill_share": summary.drill_share,
        "eval/seconds": result.seconds,
        **tool_use_accuracy(result.records, "eval/"),
    }
    for family, accuracy in summary.accuracy_by_family.items():
        out[f"eval/accuracy/{family}"] = accuracy
    for family, iou in summary.mean_best_iou_by_family.items():
        out[f"eval/iou/{family}"] = iou
    looking = {
        "eval/looking/first_drill_hit": summary.first_drill_hit_share,
        "eval/looking/steps_first_hit": summary.tool_steps_first_hit,
        "eval/looking/steps_first_miss": summary.tool_steps_first_miss,
        "eval/looking/redrill_after_miss": summary.redrill_after_miss,
    }
    out.update({name: value for name, value in looking.items() if value is not None})
    return out


# ================================================================================================ entry point


def train(config: TrainConfig, resume: bool = True, max_steps: int | None = None) -> TrainResult:
    """Build every piece from ``config`` and run it; resume from ``run_dir``'s latest checkpoint when there is one.

    ``max_steps`` runs at most that many steps in this call (then checkpoints and returns); call again to go on.

    Raises:
        ConfigError: ``run_dir`` holds a checkpoint of a different configuration (pass ``resume=False`` or use
            another directory).
        UnsafePathError: ``checkpoints/latest`` points outside ``run_dir``.
        RecordError: a checkpoint file is malformed or in the old pickle format.

    """
    from medeyes.agents.backends.transformers import TransformersBackend
    from medeyes.models.factory import load_policy_model

    cfg = config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    checkpoint = open_run_dir(cfg, resume)

    seed_everything(cfg.seed)

    model, processor = load_policy_model(cfg.model, device=cfg.device, dtype=param_dtype_name(cfg))
    source = open_cases(cfg.data, cfg.data_options.model_dump())
    pool_cases, experts = expert_pool(cfg, source)

    start_step, optimizer_state = 0, None
    if checkpoint is not None:
        check_same_config(checkpoint, cfg.model_dump(mode="json"))  # before any tensor is read
        state = load_checkpoint(checkpoint, model)
        start_step, optimizer_state = int(state["step"]), state["optimizer"]
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, resume_step=start_step if checkpoint else None)
    backend = TransformersBackend(model, processor, device=cfg.device)
    policy = PolicyAgent(backend, cfg.sampling, name="policy")
    wants_ground = cfg.stage_steps("ground") or (cfg.stage_steps("sft") and cfg.sft.ground_examples)
    ground_pool = build_ground_pool(cfg.ground, cfg.env, source, cfg.train_split, cfg.seed) if wants_ground else None
    engine = make_rollout_engine(cfg, policy, param_dtype_name(cfg), start_step)
    try:
        trainer = Trainer(cfg, model, processor, policy, source, experts, logger, pool_cases, ground_pool, engine)
        optimizer_stage = None
        if checkpoint is not None:
            trainer.eval_history = list(state.get("eval_history", []))
            optimizer_stage = state.get("stage")
        return trainer.fit(start_step, optimizer_state, optimizer_stage, max_steps)
    finally:
        engine.close()
