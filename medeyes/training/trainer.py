"""The single-process trainer: SFT warm start and (dual-stream) GRPO, read top to bottom.

One optimizer step of the ``grpo`` stage::

    seed      every random choice of step s derives from (config.seed, s): exact resume needs no RNG juggling
    collect   G_on on-policy episodes per case through MedEyesEnv (the one rollout driver), plus G_off expert
              trajectories per case from the trajectory store (dual mode)
    tokenise  each episode with the model's chat template; loss mask = the generated token spans
    score     rewards come from the environment (verifiable components)
    advantage per stream and group (objective.compute_advantages)
    loss      dual_stream_loss over micro-batches (gradient accumulation), backward
    step      clip, AdamW, learning-rate schedule
    log       metrics.jsonl + TensorBoard: train/, stream/on/, stream/off/, eval/

The ``sft`` stage replaces collect..advantage by a batch of expert trajectories and the loss by the
token-mean NLL of the expert's turns. Evaluation runs greedy episodes on a fixed held-out set at step 0,
every ``eval.every`` steps and at the end. A checkpoint (model, optimizer, RNG, step) is written atomically
every ``checkpoint_every`` steps; :func:`train` resumes from the latest one by default.

Use :func:`train` (builds every piece from a :class:`TrainConfig`) or :class:`Trainer` with your own pieces.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medeyes.agents.policy import PolicyAgent
from medeyes.memory_store import MemoryStore
from medeyes.models.episodes import EpisodeTensors, collate, tokenize_record
from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.training.checkpoints import check_same_config, load_checkpoint, save_checkpoint, save_final
from medeyes.training.config import TrainConfig
from medeyes.training.expert_data import ExpertPool
from medeyes.training.ground_pool import build_ground_pool, ground_episode
from medeyes.training.grpo_batch import Collected, StreamStats, score, tokenise
from medeyes.training.held_out import GroundingEval, held_out_metrics
from medeyes.training.logprobs import chunks, masked_token_logprobs, recompute_old_logprobs
from medeyes.training.metrics import (
    MetricsLogger,
    blind_accuracy,
    progress_bar,
    progress_stats,
    tool_collapse_alarm,
    weighted_mean_metrics,
)
from medeyes.training.mismatch import rows_tis_weights
from medeyes.training.objective import dual_stream_loss, sft_loss
from medeyes.training.optim import StageOptimizer
from medeyes.training.rollout_engine import RolloutEngine, make_rollout_engine
from medeyes.training.run_setup import (
    autocast_dtype,
    expert_pool,
    open_run_dir,
    param_dtype_name,
    seed_everything,
)
from medeyes.training.schedule import step_seed
from medeyes.trajectories import TrajectoryRecord
from medeyes_env.errors import ConfigError
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
        """Keep the pieces; nothing heavy happens here. ``engine``: who generates grpo rollouts (default ``policy``)."""
        self.config = config
        self.model = model
        self.processor = processor
        self.policy = policy
        self.engine = engine or RolloutEngine(policy)
        self.source = source
        self.experts = experts
        self.logger = logger
        self.pool_cases = pool_cases
        self.ground_pool = ground_pool or []
        self._ground_tensors: dict[int, EpisodeTensors] = {}
        self._ground_eval: GroundingEval | None = None
        self.device = torch.device(config.device)
        self.autocast_dtype = autocast_dtype(config)
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.optim = StageOptimizer(config, model)
        self.eval_history: list[dict[str, float]] = []
        self.blind: float | None = None
        self.live: dict[str, float] = {}
        self.tool_alarm_shown = False

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
                run_step = {"ground": self.ground_step, "sft": self.sft_step, "grpo": self.grpo_step}[stage]
                metrics = run_step(step)
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

    # ------------------------------------------------------------------------------------------ ground

    def ground_step(self, step: int) -> dict[str, float]:
        """One grounding step: NLL of the answers of ``ground.batch_size`` single-image examples."""
        cfg = self.config
        if not self.ground_pool:
            raise ConfigError("the ground stage has no examples: the first ground.cases training cases hold no region")
        rng = np.random.default_rng(step_seed(cfg.seed, step, 3))
        picks = rng.integers(0, len(self.ground_pool), size=cfg.ground.batch_size)
        t0 = time.perf_counter()
        episodes = self._ground_episodes(picks)
        prep = time.perf_counter() - t0
        self.model.train()
        lr = self.optim.set_lr("ground", step)
        t1 = time.perf_counter()
        batch = collate(episodes, self.pad_id).to(self.device)
        with self._autocast():
            logprobs, _ = masked_token_logprobs(self.model, batch, self._param_dtype())
        # every example weighs the same: a one-word what-answer is not drowned by a where-answer's four boxes
        loss = sft_loss(logprobs, batch.loss_mask[:, 1:], aggregation="seq_mean_token_mean")
        loss.backward()
        grad_norm = self.optim.step("ground")
        tokens = int(batch.attention_mask.sum())
        return {
            "train/loss": float(loss.detach()),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens": float(tokens),
            "train/loss_tokens": float(sum(e.generated_tokens for e in episodes)),
            "train/tokens_per_second": tokens / max(time.perf_counter() - t1, 1e-9),
            "train/prep_seconds": prep,
        }

    def _ground_episodes(self, picks: np.ndarray) -> list[EpisodeTensors]:
        """Pool examples by index, each tokenised once per run.

        A pool example is drawn ~20 times in the default run, and its processor pass (chat template, image
        resize) was a third of a ground step.
        """
        for i in picks:
            if int(i) not in self._ground_tensors:
                self._ground_tensors[int(i)] = ground_episode(self.ground_pool[int(i)], self.processor)
        return [self._ground_tensors[int(i)] for i in picks]

    # ------------------------------------------------------------------------------------------ sft

    def sft_step(self, step: int) -> dict[str, float]:
        """One supervised step: NLL of the expert's turns on ``sft.batch_size`` trajectories."""
        cfg = self.config
        if self.experts is None:
            raise ConfigError("the sft stage needs expert trajectories (expert pool is empty)")
        rng = np.random.default_rng(step_seed(cfg.seed, step, 1))
        records = self.experts.sample(cfg.sft.batch_size, rng)
        t0 = time.perf_counter()
        episodes = [tokenize_record(r, self.experts.store, self.processor, is_expert=True) for r in records]
        if cfg.sft.ground_examples and self.ground_pool:
            picks = rng.integers(0, len(self.ground_pool), size=cfg.sft.ground_examples)
            episodes += self._ground_episodes(picks)
        prep = time.perf_counter() - t0
        self.model.train()
        lr = self.optim.set_lr("sft", step)
        n_tokens = sum(e.generated_tokens for e in episodes)
        losses = []
        tokens_seen = 0
        t1 = time.perf_counter()
        for chunk in chunks(episodes, cfg.sft.grad_accum):
            batch = collate(chunk, self.pad_id).to(self.device)
            with self._autocast():
                logprobs, _ = masked_token_logprobs(self.model, batch, self._param_dtype())
            mask = batch.loss_mask[:, 1:]
            # a mean over the whole step: weight each micro-batch by its share of the step's tokens (or rows)
            if cfg.sft.aggregation == "token_mean":
                share = int(mask.sum()) / max(1, n_tokens)
            else:
                share = int((mask.sum(dim=1) > 0).sum()) / max(1, sum(e.generated_tokens > 0 for e in episodes))
            loss = sft_loss(logprobs, mask, aggregation=cfg.sft.aggregation) * share
            loss.backward()
            losses.append(float(loss.detach()))
            tokens_seen += int(batch.attention_mask.sum())
        grad_norm = self.optim.step("sft")
        seconds = time.perf_counter() - t1
        return {
            "train/loss": sum(losses),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens": float(tokens_seen),
            "train/loss_tokens": float(n_tokens),
            "train/tokens_per_second": tokens_seen / max(seconds, 1e-9),
            "train/prep_seconds": prep,
        }

    # ------------------------------------------------------------------------------------------ grpo

    def grpo_step(self, step: int) -> dict[str, float]:
        """One GRPO step: collect, tokenise, score, advantages, loss, optimizer step (module docstring)."""
        metrics: dict[str, float] = {}
        collected = self._collect(step, metrics)
        episodes = tokenise(collected, self.processor, self.experts.store if self.experts else None, metrics)
        advantages, rows = score(collected, episodes, self.config, metrics)
        floor = self.config.grpo.tool_floor
        self.tool_alarm_shown = tool_collapse_alarm(step, metrics, floor, self.tool_alarm_shown)
        # old log-probs: recorded at generation, or recomputed before the update
        if self.config.grpo.old_logprobs == "recompute":
            self.model.eval()
            with self._autocast():
                recompute_old_logprobs(self.model, episodes, self.pad_id, self.config.grpo.grad_accum, self.device)
        self._update(step, episodes, advantages, rows, metrics)
        return metrics

    def _collect(self, step: int, metrics: dict[str, float]) -> Collected:
        """On-policy episodes (G_on per case) and, in dual mode, expert trajectories (G_off per case)."""
        cfg, g = self.config, self.config.grpo
        _, k = cfg.stage_at(step)
        rng = np.random.default_rng(step_seed(cfg.seed, step, 2))
        blocks = max(1, self.pool_cases // g.prompts_per_step)
        start = (k % blocks) * g.prompts_per_step
        metrics.update(self.engine.prepare(self.model, step))  # vLLM: the weights of the last optimizer step
        t0 = time.perf_counter()
        store = MemoryStore()
        self.model.eval()
        rollout_policy = self.engine.policy
        self._seed_sampling(step_seed(cfg.seed, step, 3), rollout_policy)
        rollout = RolloutConfig(
            split=cfg.train_split,
            n=g.prompts_per_step,
            start=start,
            samples_per_case=g.group_on,
            batch_size=cfg.rollout_batch,
            seed=step_seed(cfg.seed, step, 4),
            env=cfg.env,
        )
        with self._autocast():
            result = run_rollout(rollout_policy, self.source, rollout, store=store)
        self.engine.release()
        on_records = sorted(result.records, key=lambda r: (r.case_id, r.sample_index))
        cases = range(start, start + g.prompts_per_step)
        case_index = {self.source.case(cfg.train_split, i).id: i for i in cases}  # type: ignore[arg-type]
        off_records: list[TrajectoryRecord] = []
        if g.mode == "dual" and self.experts is not None:
            for i in cases:
                off_records += self.experts.for_case(i, g.group_off, rng)
        metrics["train/rollout_seconds"] = time.perf_counter() - t0
        return Collected(on_records, off_records, store, case_index)

    def _update(
        self,
        step: int,
        episodes: list[EpisodeTensors],
        advantages: torch.Tensor,
        rows: list[int],
        metrics: dict[str, float],
    ) -> None:
        """The dual-stream loss over micro-batches of ``rows`` (gradient accumulation), then one optimizer step."""
        cfg = self.config
        self.model.train()
        lr = self.optim.set_lr("grpo", step)
        t2 = time.perf_counter()
        loss_metrics: list[tuple[int, dict[str, float]]] = []
        streams = StreamStats()
        tokens_seen = 0
        for chunk in chunks(rows, cfg.grpo.grad_accum):
            batch = collate([episodes[i] for i in chunk], self.pad_id).to(self.device)
            adv = advantages[chunk].to(self.device)
            with self._autocast():
                logprobs, entropy = masked_token_logprobs(self.model, batch, self._param_dtype(), with_entropy=True)
            mask = batch.loss_mask[:, 1:]  # [b, T-1]
            old = batch.old_logprobs[:, 1:]  # [b, T-1]
            weights = None
            if cfg.objective.tis_cap is not None:  # TIS: the engine's log-probs vs the trainer's recomputation
                on_mask = mask & ~batch.is_expert[:, None]
                weights, tis = rows_tis_weights([episodes[i] for i in chunk], old, on_mask, cfg.objective.tis_cap)
                metrics.update(tis)  # the last micro-batch's
            loss, lm = dual_stream_loss(logprobs, old, adv, mask, batch.is_expert, cfg.objective, is_weights=weights)
            (loss * len(chunk) / len(rows)).backward()
            loss_metrics.append((len(chunk), lm))
            tokens_seen += int(batch.attention_mask.sum())
            streams.add(logprobs, old, entropy, mask, batch.is_expert)
        grad_norm = self.optim.step("grpo")
        seconds = time.perf_counter() - t2
        metrics.update(weighted_mean_metrics(loss_metrics))
        metrics.update(streams.metrics())
        metrics.update(
            {
                "train/loss": metrics.get("loss/total", 0.0),
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens": float(tokens_seen),
                "train/tokens_per_second": tokens_seen / max(seconds, 1e-9),
                "train/update_seconds": seconds,
                "train/retokenized_on_turns": float(sum(e.retokenized_turns for e in episodes if not e.is_expert)),
            }
        )

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Greedy episodes on ``eval.cases`` eval-split cases from ``eval.start``: accuracy, IoU, steps, health."""
        cfg = self.config
        self.model.eval()
        sampling = self.policy.sampling
        self.policy.sampling = sampling.model_copy(update={"temperature": cfg.eval.temperature, "seed": cfg.seed})
        self._seed_sampling(cfg.seed)
        try:
            with self._autocast():
                out = held_out_metrics(self.policy, self.source, cfg)
        finally:
            self.policy.sampling = sampling
        if "ground" in cfg.stages:
            if self._ground_eval is None:
                self._ground_eval = GroundingEval(self.source, cfg)
            with self._autocast():
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

    # ------------------------------------------------------------------------------------------ plumbing

    def _seed_sampling(self, seed: int, policy: PolicyAgent | None = None) -> None:
        policy = policy or self.policy
        policy.sampling = policy.sampling.model_copy(update={"seed": seed})
        backend = policy.backend
        if hasattr(backend, "calls"):
            backend.calls = 0

    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _checkpoint(self, step: int) -> None:
        cfg = self.config
        extra = {
            "stage": self.optim.stage,
            "config": cfg.model_dump(mode="json"),
            "eval_history": self.eval_history,
        }
        save_checkpoint(cfg.run_dir, step, self.model, self.optim.optimizer, extra, cfg.keep_checkpoints)


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
    from medeyes.agents.transformers_backend import TransformersBackend
    from medeyes.models import load_policy_model

    cfg = config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    checkpoint = open_run_dir(cfg, resume)

    seed_everything(cfg.seed)

    model, processor = load_policy_model(cfg.model, device=cfg.device, dtype=param_dtype_name(cfg))
    source = open_cases(cfg.data, cfg.data_options)
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
    ground_pool = build_ground_pool(cfg, source) if wants_ground else None
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
