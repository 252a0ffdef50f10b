"""The ``sft`` stage: supervised warm start on expert trajectories, one step read top to bottom.

A step samples ``sft.batch_size`` expert (GRN + CVS) trajectories, tokenises them with the model's chat
template (the loss mask is the expert's turns), adds ``sft.ground_examples`` ground-stage examples
(co-training), and minimises the NLL of the masked tokens over ``sft.grad_accum`` micro-batches.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medeyes.models.episodes import tokenize_record
from medeyes.training.expert_data import ExpertPool
from medeyes.training.objective import sft_loss
from medeyes.training.schedule import SFT_BATCH_SALT, step_seed
from medeyes.training.stage_config import SFTConfig
from medeyes.training.stages._step import Learner, step_metrics
from medeyes.training.stages.ground import GroundPool
from medeyes_env.errors import ConfigError


class SFTStage:
    """One supervised step: NLL of the expert's turns (plus ground examples), optimizer step."""

    def __init__(
        self, config: SFTConfig, seed: int, experts: ExpertPool | None, ground: GroundPool, learner: Learner
    ) -> None:
        """``seed``: the run's; ``experts``: the expert pool (None: this stage cannot run); ``ground``: co-training."""
        self.config = config
        self.seed = seed
        self.experts = experts
        self.ground = ground
        self.learner = learner

    def step(self, step: int) -> dict[str, float]:
        """One supervised step: NLL of the expert's turns on ``sft.batch_size`` trajectories."""
        cfg, learner = self.config, self.learner
        if self.experts is None:
            raise ConfigError("the sft stage needs expert trajectories (expert pool is empty)")
        # sample
        rng = np.random.default_rng(step_seed(self.seed, step, SFT_BATCH_SALT))
        records = self.experts.sample(cfg.batch_size, rng)
        t0 = time.perf_counter()
        episodes = [tokenize_record(r, self.experts.store, learner.processor, is_expert=True) for r in records]
        if cfg.ground_examples and self.ground:
            picks = rng.integers(0, len(self.ground), size=cfg.ground_examples)
            episodes += self.ground.episodes(picks)
        prep = time.perf_counter() - t0
        # loss: a mean over the whole step, each micro-batch weighted by its share of the step's tokens (or rows)
        learner.model.train()
        lr = learner.optim.set_lr("sft", step)
        n_tokens = sum(e.generated_tokens for e in episodes)
        n_rows = sum(e.generated_tokens > 0 for e in episodes)
        t1 = time.perf_counter()

        def expert_nll(rows: list[int], batch: Any, logprobs: Any, entropy: Any) -> Any:
            mask = batch.loss_mask[:, 1:]
            if cfg.aggregation == "token_mean":
                share = int(mask.sum()) / max(1, n_tokens)
            else:
                share = int((mask.sum(dim=1) > 0).sum()) / max(1, n_rows)
            return sft_loss(logprobs, mask, aggregation=cfg.aggregation) * share

        losses, tokens = learner.accumulate(episodes, list(range(len(episodes))), cfg.grad_accum, expert_nll)
        # step
        grad_norm = learner.optim.step("sft")
        return {
            **step_metrics(sum(losses), lr, grad_norm, tokens, time.perf_counter() - t1),
            "train/loss_tokens": float(n_tokens),
            "train/prep_seconds": prep,
        }
