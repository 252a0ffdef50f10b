"""The optimizer of a staged run: one AdamW per stage, its learning-rate schedule, clipped steps.

A new stage starts with a fresh AdamW (its own learning rate, betas and decay); a checkpoint taken inside a
stage carries the state, one taken at a stage boundary does not need to.
"""

from __future__ import annotations

import torch

from medeyes.training.config import TrainConfig
from medeyes.training.schedule import learning_rate


class StageOptimizer:
    """AdamW over the model's trainable parameters, rebuilt when the stage changes."""

    def __init__(self, config: TrainConfig, model: torch.nn.Module) -> None:
        """Nothing is built until :meth:`ensure` names a stage."""
        self.config = config
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage: str | None = None

    def ensure(self, stage: str, state: dict | None) -> None:
        """An AdamW for ``stage`` (kept when it already is that stage's), loaded from ``state`` when given."""
        if self.optimizer is not None and self.stage == stage:
            return
        optim = self.config.optim(stage)  # type: ignore[arg-type]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps
        )
        if state is not None:
            self.optimizer.load_state_dict(state)
        self.stage = stage

    def set_lr(self, stage: str, step: int) -> float:
        """Set and return the learning rate of global step ``step`` (its position within ``stage``)."""
        cfg = self.config
        optim = cfg.optim(stage)  # type: ignore[arg-type]
        _, k = cfg.stage_at(step)
        lr = learning_rate(optim, k, cfg.stage_steps(stage))  # type: ignore[arg-type]
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, stage: str) -> float:
        """Clip the gradient norm (``grad_clip``), step, zero the gradients; return the norm before clipping."""
        optim = self.config.optim(stage)  # type: ignore[arg-type]
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip else float("inf"))
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)
