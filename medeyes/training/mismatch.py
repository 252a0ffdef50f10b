"""Training-inference mismatch: the log-prob gap between the engine that sampled and the model that trains.

A rollout engine (vLLM, or transformers with a KV cache) and the trainer's forward pass compute the same
policy with different kernels, so ``log pi_behaviour`` (recorded at generation) and ``log pi_train_old``
(the trainer's recomputation with the same weights, before the update) differ per token. The PPO ratio
``exp(logp - old)`` then mixes two policies. Truncated importance sampling (TIS; TRL's
``vllm_importance_sampling_correction`` with ``vllm_importance_sampling_cap``, verl's ``tis_imp_ratio_cap``,
OpenRLHF's ``enable_vllm_is_correction``) re-weights each on-policy token's loss by

    w_t = min(exp(logp_train_old_t - logp_behaviour_t), C)

with the ratio computed against ``logp_train_old``. ``w`` carries no gradient; capping it at ``C`` bounds
the variance that a few tokens the engine found unlikely would otherwise add.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def truncated_is_weights(train_old: Tensor, behaviour: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Per-token TIS weights ``min(exp(train_old - behaviour), cap)`` on ``mask``, 1 elsewhere (no grad).

    Args:
        train_old: ``[B, T]`` log-probs of the sampled tokens under the trainer's model before the update.
        behaviour: ``[B, T]`` log-probs the rollout engine recorded for the same tokens.
        mask: ``[B, T]``; the on-policy loss tokens. Outside it the weight is 1, whatever the inputs hold.
        cap: ``C > 0``, the largest weight.

    >>> truncated_is_weights(torch.tensor([[0.0, -1.0, -5.0]]), torch.tensor([[-1.0, -1.0, 0.0]]),
    ...                      torch.tensor([[1, 1, 0]]), cap=2.0)
    tensor([[2., 1., 1.]])

    """
    if not cap > 0:
        raise ValueError(f"truncated_is_weights: cap={cap!r}; it must be > 0 (e.g. 2.0, TRL's default)")
    if train_old.shape != behaviour.shape or train_old.shape != mask.shape:
        raise ValueError(
            f"truncated_is_weights: train_old {tuple(train_old.shape)}, behaviour {tuple(behaviour.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape [B, T]"
        )
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=train_old.device)
    log_w = torch.where(keep, train_old.detach().float() - behaviour.detach().float(), zero)  # [B, T]
    return torch.exp(log_w).clamp(max=cap)  # [B, T]; exp(0) = 1 outside the mask


def tis_metrics(weights: Tensor, mask: Tensor, cap: float) -> dict[str, float]:
    """``stream/on/tis_weight_mean`` and ``stream/on/tis_capped_frac`` over ``mask`` (empty mask: no metrics).

    >>> tis_metrics(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([[1, 1, 0]]), cap=2.0)
    {'stream/on/tis_weight_mean': 1.25, 'stream/on/tis_capped_frac': 0.5}

    """
    keep = mask.bool()
    if not bool(keep.any()):
        return {}
    sel = weights[keep]
    return {
        "stream/on/tis_weight_mean": float(sel.mean()),
        "stream/on/tis_capped_frac": float((sel >= cap).float().mean()),
    }


def tis_weights(train_old: Tensor, behaviour: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, dict[str, float]]:
    """:func:`truncated_is_weights` ``[B, T]`` over ``mask`` and their metrics (what ``dual_stream_loss`` applies).

    Metrics: :func:`tis_metrics` plus ``stream/on/behaviour_logprob_gap``, the mean |logp_train_old -
    logp_behaviour| over ``mask`` (``stream/on/logprob_gap`` compares with pi_old, which is then the trainer's own).

    >>> w, m = tis_weights(torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[1, 1]]), 2.0)
    >>> w.tolist(), m["stream/on/behaviour_logprob_gap"]
    ([[2.0, 1.0]], 0.5)
    """
    weights = truncated_is_weights(train_old, behaviour, mask, cap)
    metrics = tis_metrics(weights, mask, cap)
    keep = mask.bool()
    if bool(keep.any()):
        metrics["stream/on/behaviour_logprob_gap"] = float((train_old.float() - behaviour)[keep].abs().mean())
    return weights, metrics


def behaviour_logprobs(episodes: Sequence[Any], like: Tensor) -> Tensor:
    """The behaviour log-probs ``[b, T-1]`` of a micro-batch of episodes, shaped and placed like ``like``.

    Each episode's are those :func:`~medeyes.training.logprobs.recompute_old_logprobs` kept in
    ``meta["behaviour_logprobs"]`` (``[T]``, aligned with ``input_ids``) before it overwrote ``old_logprobs``.
    """
    behaviour = torch.zeros_like(like, dtype=torch.float32)  # [b, T-1]
    for row, e in enumerate(episodes):
        if "behaviour_logprobs" not in e.meta:
            raise ValueError("objective.tis_cap needs the behaviour log-probs: run recompute_old_logprobs first")
        behaviour[row, : e.length - 1] = e.meta["behaviour_logprobs"][1:].to(behaviour)
    return behaviour
