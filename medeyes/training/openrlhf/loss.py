"""The dual-stream objective in OpenRLHF's terms: the policy loss, the KL/entropy reduction, the advantages.

OpenRLHF's PPO actor builds ``PolicyLoss`` itself and reduces its KL and entropy terms with
``aggregate_loss``; its experience maker computes group advantages. :mod:`medeyes.training.openrlhf.patches`
swaps in :class:`DualStreamPolicyLoss`, :func:`reduce_like_medeyes` and :func:`assign_dual_stream_advantages`.
All of it is plain torch, testable without OpenRLHF.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from medeyes.training.advantages import compute_advantages
from medeyes.training.objective import dual_stream_loss, masked_mean
from medeyes.training.objective_config import Aggregation, ObjectiveConfig
from medeyes.training.openrlhf.config import ADVANTAGE_LOG_KEYS, LOG_PREFIX, LOSS_LOG_KEYS


def row_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """One advantage per row from OpenRLHF's per-token ``[B, A]`` advantages (their masked mean); ``[B]`` passes.

    With the advantages :func:`assign_dual_stream_advantages` writes (constant over a row's action tokens) the
    mean is that constant.
    """
    if advantages.dim() == 1:
        return advantages
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and action_mask {tuple(mask.shape)} must match")
    return masked_mean(advantages.float(), mask, dim=1)  # [B]


def expert_flags(info: dict[str, Any] | None, rows: int, device: torch.device | str = "cpu") -> Tensor:
    """``[B]`` bool stream flags from ``Experience.info["medeyes/is_expert"]`` (tensor or list); absent: all False."""
    value = None if info is None else info.get(LOG_PREFIX + "is_expert")
    if value is None:
        return torch.zeros(rows, dtype=torch.bool, device=device)
    if isinstance(value, Tensor):
        flags = value.detach().reshape(-1)
    else:
        flags = torch.tensor([float(v.item() if isinstance(v, Tensor) else v) for v in value])
    if flags.numel() != rows:
        raise ValueError(f"{LOG_PREFIX}is_expert has {flags.numel()} values for a batch of {rows} rows")
    return flags.to(device=device) > 0.5


class DualStreamPolicyLoss(torch.nn.Module):
    """Drop-in for OpenRLHF 0.11.2's ``PolicyLoss`` that computes :func:`~medeyes.training.objective.dual_stream_loss`.

    Same call signature and return tuple as ``PolicyLoss.forward``: ``(loss, clip_ratio, ppo_kl, None, None)``.
    The stream of each row comes from :meth:`bind` (the patched ``training_step`` binds the micro-batch's
    ``Experience.info`` before the call); unbound, every row is on-policy. The loss is rescaled from the
    micro-batch mean to OpenRLHF's global normalisation (``dp_size``, ``batch_num_tokens`` for
    ``token_mean``, ``global_batch_size`` for ``seq_mean_token_mean``), so gradient accumulation and data
    parallelism give one mean over the optimizer step, as OpenRLHF's own loss does.

    Args:
        config: The objective; its ``kl_coef`` and ``entropy_coef`` are not applied here (OpenRLHF applies KL and
            entropy itself, from ``--algo.kl.*`` and ``--actor.entropy_coef``); ``tis_cap`` weighs by the
            ``rollout_log_probs`` OpenRLHF passes (an error without them).

    """

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__()
        base = config or ObjectiveConfig()
        self.config = base.model_copy(update={"kl_coef": 0.0, "entropy_coef": 0.0})
        self.is_expert: Tensor | None = None
        self.info: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}

    def bind(self, is_expert: Tensor | None, info: dict[str, Any] | None = None) -> None:
        """Set the next micro-batch's ``[B]`` stream flags, and the info dict that receives loss metrics."""
        self.is_expert = None if is_expert is None else is_expert.bool()
        self.info = info

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | Tensor | None = None,
        global_batch_size: float | Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, None, None]:
        """Dual-stream loss of one micro-batch, as ``(loss, clip_ratio, ppo_kl, None, None)``."""
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        rows = log_probs.shape[0]
        expert = self.is_expert
        if expert is None:
            expert = torch.zeros(rows, dtype=torch.bool, device=log_probs.device)
        elif expert.numel() != rows:
            raise ValueError(f"bound is_expert has {expert.numel()} rows, the micro-batch {rows}; rebind per batch")
        expert = expert.to(log_probs.device)
        adv = row_advantages(advantages, mask)  # [B]
        # objective.tis_cap: the rollout engine's log-probs against OpenRLHF's recomputed pi_old (dual_stream_loss
        # refuses a tis_cap without them; the export refuses it too, as the launch does not ask for them)
        behaviour = rollout_log_probs if self.config.tis_cap is not None else None
        loss, metrics = dual_stream_loss(
            log_probs, old_log_probs, adv, mask, expert, self.config, behaviour_logprobs=behaviour
        )
        loss = loss * self.global_scale(mask, dp_size, batch_num_tokens, global_batch_size)
        on = mask & ~expert[:, None]
        clip_ratio = torch.tensor(metrics.get("stream/on/clip_frac", 0.0), device=log_probs.device)
        ppo_kl = masked_mean((old_log_probs - log_probs).detach().float(), on)
        self.last_metrics = metrics
        if self.info is not None:
            for key in LOSS_LOG_KEYS:
                self.info[LOG_PREFIX + key] = torch.tensor(float(metrics.get(key, 0.0)), device=log_probs.device)
        return loss, clip_ratio, ppo_kl, None, None

    def global_scale(
        self,
        mask: Tensor,
        dp_size: int,
        batch_num_tokens: float | Tensor | None,
        global_batch_size: float | Tensor | None,
    ) -> Tensor | float:
        """Factor turning the micro-batch mean into OpenRLHF's share of the global mean (1 without totals)."""
        if self.config.aggregation == "token_mean":
            if batch_num_tokens is None:
                return 1.0
            return mask.sum().float() * dp_size / torch.as_tensor(batch_num_tokens, dtype=torch.float32)
        if global_batch_size is None:
            return 1.0
        rows_with_tokens = (mask.sum(dim=1) > 0).sum().float()
        return rows_with_tokens * dp_size / torch.as_tensor(global_batch_size, dtype=torch.float32)


# ================================================================================================ advantages


def stream_advantages(
    rewards: Tensor, is_expert: Tensor, n_samples_per_prompt: int, config: ObjectiveConfig
) -> tuple[Tensor, dict[str, float]]:
    """Decoupled advantages of a rollout batch in OpenRLHF's prompt order (group ``i`` = rows ``i*n .. i*n+n-1``).

    >>> adv, _ = stream_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([False, False, True, True]),
    ...                            4, ObjectiveConfig())
    >>> [round(a, 3) for a in adv.tolist()]  # on_baseline: expert rows against the on-policy mean and std
    [-0.707, 0.707, 0.707, 0.707]
    """
    n = int(n_samples_per_prompt)
    if n < 1 or rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of n_samples_per_prompt={n}")
    groups = torch.arange(rewards.numel()) // n  # [N]
    return compute_advantages(rewards.float(), groups, is_expert.bool().cpu(), config)


def assign_dual_stream_advantages(
    experiences: Sequence[Any], n_samples_per_prompt: int, config: ObjectiveConfig
) -> dict[str, float]:
    """Write per-stream advantages into OpenRLHF ``Experience`` micro-batches (in place); returns the stats.

    Reads ``index`` (original sample order), ``rewards``, ``action_mask`` and ``info["medeyes/is_expert"]``;
    writes ``advantages`` and ``returns`` (``[B, A]``: the row advantage on every action token),
    ``info["return"]``, ``info["medeyes/advantage"]``, the :data:`ADVANTAGE_LOG_KEYS` stats, and clears ``kl``.
    """
    lengths = [len(e.index) for e in experiences]
    order = torch.tensor([i for e in experiences for i in e.index], dtype=torch.long)
    raw = torch.cat([e.rewards.reshape(-1).float() for e in experiences])
    raw_flags = torch.cat([expert_flags(e.info, len(e.index)) for e in experiences])
    rewards = torch.empty_like(raw)
    rewards[order] = raw
    flags = torch.empty_like(raw_flags)
    flags[order] = raw_flags
    adv, stats = stream_advantages(rewards, flags, n_samples_per_prompt, config)
    for experience, row_adv, row_reward in zip(experiences, adv[order].split(lengths), raw.split(lengths), strict=True):
        mask = experience.action_mask
        token_adv = row_adv[:, None].to(torch.float32) * mask.to(torch.float32)  # [B, A]
        experience.advantages = token_adv
        experience.returns = token_adv.clone()
        experience.info["return"] = row_reward
        experience.info[LOG_PREFIX + "advantage"] = row_adv.float()
        for key in ADVANTAGE_LOG_KEYS:
            experience.info[LOG_PREFIX + key] = torch.full((len(row_adv),), float(stats.get(key, 0.0)))
        experience.kl = None
    return stats


def reduce_like_medeyes(aggregate_loss: Callable[..., Tensor], aggregation: Aggregation) -> Callable[..., Tensor]:
    """OpenRLHF's ``aggregate_loss`` with its reduction fixed to the MedEyes ``aggregation``.

    OpenRLHF 0.11.2's ``ActorPPOTrainer.training_step`` reduces the KL (``--algo.kl.use_loss``) and entropy
    (``--actor.entropy_coef``) terms with ``aggregate_loss(x, mask, **loss_batch_info)``, whose default is a
    token mean whatever ``--actor.loss_agg_mode`` says, while :func:`~medeyes.training.objective.dual_stream_loss`
    reduces every term with ``ObjectiveConfig.aggregation``. Patched into ``ppo_actor`` (only those two calls
    use it there), both trainers weigh KL and entropy alike. The global normalisers are kept.
    """
    token_level = aggregation == "token_mean"

    @functools.wraps(aggregate_loss)
    def aggregate(loss: Tensor, loss_mask: Tensor, **kwargs: Any) -> Tensor:
        kwargs["token_level_loss"] = token_level
        return aggregate_loss(loss, loss_mask, **kwargs)

    return aggregate
