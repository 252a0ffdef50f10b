"""What every stage's optimizer step shares: the model's forward under autocast, micro-batches, step metrics.

:class:`Learner` holds the model being trained and what a step needs around it; :meth:`Learner.accumulate` is
the one gradient-accumulation loop (collate a micro-batch, forward, the stage's loss, backward) and
:func:`step_metrics` the one builder of a step's ``train/`` numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from medeyes.agents.backends.seeds import SeededCalls
from medeyes.agents.policy import PolicyAgent
from medeyes.models.episodes import EpisodeTensors, collate
from medeyes.training.logprobs import chunks, masked_token_logprobs
from medeyes.training.optim import StageOptimizer

ChunkLoss = Callable[[list[int], Any, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(rows, batch, logprobs [b, T-1], entropy [b, T-1] or None) -> the loss to backpropagate`` of a micro-batch."""


class Learner:
    """The model being trained, its processor, device, padding id, autocast and optimizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        optim: StageOptimizer,
    ) -> None:
        """Keep the pieces; the padding id is the processor's."""
        self.model = model
        self.processor = processor
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.optim = optim
        self.pad_id = int(processor.tokenizer.pad_token_id)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where the run asked for it (``dtype: auto`` on CUDA), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def param_dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    def accumulate(
        self,
        episodes: Sequence[EpisodeTensors],
        rows: list[int],
        micro_batches: int,
        chunk_loss: ChunkLoss,
        with_entropy: bool = False,
    ) -> tuple[list[float], int]:
        """Gradient accumulation: ``rows`` of ``episodes`` in ``micro_batches`` parts, each forward, loss, backward.

        ``chunk_loss`` returns the micro-batch's loss already scaled to its share of the step. Returns the
        backpropagated losses (one float per micro-batch) and the tokens the forward passes saw.
        """
        losses: list[float] = []
        tokens = 0
        for chunk in chunks(rows, micro_batches):
            batch = collate([episodes[i] for i in chunk], self.pad_id).to(self.device)
            with self.autocast():
                logprobs, entropy = masked_token_logprobs(
                    self.model, batch, self.param_dtype(), with_entropy=with_entropy
                )
            loss = chunk_loss(chunk, batch, logprobs, entropy)
            loss.backward()
            losses.append(float(loss.detach()))
            tokens += int(batch.attention_mask.sum())
        return losses, tokens


def step_metrics(loss: float, lr: float, grad_norm: float, tokens: int, seconds: float) -> dict[str, float]:
    """The ``train/`` numbers every stage logs for one optimizer step.

    >>> step_metrics(0.5, 1e-3, 2.0, 100, 0.5)["train/tokens_per_second"]
    200.0
    """
    return {
        "train/loss": loss,
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/tokens": float(tokens),
        "train/tokens_per_second": tokens / max(seconds, 1e-9),
    }


def seed_sampling(policy: PolicyAgent, seed: int) -> None:
    """Give ``policy`` the sampling seed ``seed`` and restart its backend's per-call seed counter.

    Called before each evaluation and each step's rollouts, so the same step samples the same tokens after a
    resume.
    """
    policy.sampling = policy.sampling.model_copy(update={"seed": seed})
    backend = policy.backend
    if isinstance(backend, SeededCalls):
        backend.reset_calls()
