"""Group-relative advantages for a batch that mixes on-policy and expert rows (:func:`compute_advantages`).

Pure functions on ``[B]`` tensors; the modes are explained in ``docs/objective.md``. ``medeyes.training.objective``
re-exports :func:`compute_advantages`, :func:`check_advantage_inputs` and :func:`segment_stats`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medeyes.training.objective_config import ObjectiveConfig

STREAMS: tuple[tuple[str, bool], ...] = (("on", False), ("off", True))
"""Stream names as used in metric keys, with the ``is_expert`` value of their rows."""


def segment_stats(values: Tensor, seg: Tensor, n_seg: int, unbiased: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-segment count, mean, std and an 'all values equal' flag, in float64.

    A segment with fewer than 2 values, or whose values are all exactly equal, has std exactly 0.
    """
    count = torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg, torch.ones_like(values))  # [S]
    total = torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg, values)  # [S]
    mean = total / count.clamp(min=1.0)  # [S]
    sq = torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg, (values - mean[seg]) ** 2)  # [S]
    hi = torch.full((n_seg,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, seg, values, "amax")
    lo = torch.full((n_seg,), torch.inf, dtype=torch.float64).scatter_reduce_(0, seg, values, "amin")
    equal = hi == lo  # [S]; also true for singletons; empty segments (inf vs -inf) are False
    denom = (count - 1.0) if unbiased else count
    std = torch.sqrt(sq / denom.clamp(min=1.0))
    std = torch.where(equal | (count < 2), torch.zeros_like(std), std)
    return count, mean, std, equal | (count < 2)


def check_advantage_inputs(rewards: Tensor, group_ids: Tensor, is_expert: Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` naming the problem unless all are ``[B]``: finite float, long, bool."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}.")
    if group_ids.shape != rewards.shape or is_expert.shape != rewards.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, group_ids {tuple(group_ids.shape)} and is_expert "
            f"{tuple(is_expert.shape)} must all be the same [B]."
        )
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a float tensor, got dtype {rewards.dtype}.")
    if group_ids.dtype != torch.long:
        raise TypeError(f"group_ids must be a long (int64) tensor, got dtype {group_ids.dtype}; use .long().")
    if is_expert.dtype != torch.bool:
        raise TypeError(f"is_expert must be a bool tensor, got dtype {is_expert.dtype}; use .bool().")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards must be finite; rows {bad[:10]} are inf or NaN (score failures as a number).")


def _normalise(centred: Tensor, sigma: Tensor, flat: Tensor, floor: float, config: ObjectiveConfig) -> Tensor:
    """``centred / (max(sigma, floor) + eps)`` (without ``scale_by_std``: ``centred``); a flat set is exactly 0.

    ``centred``, ``sigma``, ``flat``: ``[n]``. Flat (all rewards equal) gives 0, not rounding noise over eps.
    """
    if config.scale_by_std:
        denom = sigma.clamp(min=floor) + config.eps
        centred = centred / torch.where(denom > 0, denom, torch.ones_like(denom))  # denom 0 only if flat
    return torch.where(flat, torch.zeros_like(centred), centred)


def _advantage_stats(
    r: Tensor, adv: Tensor, expert: Tensor, cnt_gs: Tensor, sd_gs: Tensor, n_groups: int
) -> dict[str, float]:
    """Per stream: samples, groups, sigma-zero groups, and reward/advantage moments (:func:`compute_advantages`).

    ``r``, ``adv``, ``expert``: ``[B]``; ``cnt_gs``, ``sd_gs``: ``[2G]`` per (group, stream) segment.
    """
    stats: dict[str, float] = {}
    for name, flag in STREAMS:
        rows = expert == flag  # [B]
        n = int(rows.sum().item())
        groups_k = torch.arange(n_groups) * 2 + int(flag)  # [G] this stream's segment of every group
        present = cnt_gs[groups_k] > 0 if n_groups else torch.zeros(0, dtype=torch.bool)
        stats[f"stream/{name}/samples"] = float(n)
        stats[f"stream/{name}/groups"] = float(present.sum().item())
        stats[f"stream/{name}/sigma_zero_groups"] = float((present & (sd_gs[groups_k] == 0)).sum().item())
        if n:
            rr, aa = r[rows], adv[rows]
            stats[f"stream/{name}/reward_mean"] = rr.mean().item()
            stats[f"stream/{name}/reward_std"] = rr.std(correction=0).item()
            stats[f"stream/{name}/adv_mean"] = aa.mean().item()
            stats[f"stream/{name}/adv_std"] = aa.std(correction=0).item()
            stats[f"stream/{name}/adv_zero_frac"] = (aa == 0).double().mean().item()
    return stats


def compute_advantages(
    rewards: Tensor, group_ids: Tensor, is_expert: Tensor, config: ObjectiveConfig
) -> tuple[Tensor, dict[str, float]]:
    """Group-relative advantages for a batch that mixes on-policy and expert rows.

    On-policy rows, every mode but ``joint``: ``A = (R - mu_on,g) / (sigma_on,g + eps)`` over the on-policy
    rows of the same group ``g``. Expert rows, by ``config.advantage_mode``:

    - ``per_stream``: ``(R - mu_off,g) / (sigma_off,g + eps)`` over the expert rows of group ``g``.
    - ``on_baseline``: ``(R - mu_on,g) / (max(sigma_on,g, sigma_floor) + eps)``; 0 when ``g`` has no
      on-policy row (counted in ``stream/off/no_baseline_groups``).
    - ``batch_floor``: ``(R - mu_off) / (max(sigma_off, sigma_floor) + eps)`` over all expert rows of the batch.
    - ``joint``: every row ``(R - mu_g) / (sigma_g + eps)`` over both streams of group ``g``.

    A set whose rewards are all equal (or that has one row) has ``sigma = 0`` and its rows get advantage
    exactly 0: the paper's "known hole" for the expert stream, counted per stream in
    ``stream/{on,off}/sigma_zero_groups`` (by the per-group per-stream statistics, whatever the mode).
    With ``scale_by_std=False`` the division (and the floor) is skipped.

    Args:
        rewards: ``[B]`` float, finite total rewards.
        group_ids: ``[B]`` long, the prompt each row answers (any integer values).
        is_expert: ``[B]`` bool, True for expert (off-policy) rows.
        config: The objective's configuration.

    Returns:
        ``([B] advantages in rewards' dtype, stats)``. Stats (plain floats), per stream ``s``:
        ``stream/s/samples``, ``stream/s/groups``, ``stream/s/sigma_zero_groups``, and when the stream is
        non-empty ``stream/s/reward_mean``, ``stream/s/reward_std``, ``stream/s/adv_mean``, ``stream/s/adv_std``
        (population std over the stream's rows), ``stream/s/adv_zero_frac`` (share of rows with advantage 0);
        plus ``stream/off/no_baseline_groups``.

    """
    check_advantage_inputs(rewards, group_ids, is_expert)
    device = rewards.device
    r = rewards.detach().to(device="cpu", dtype=torch.float64)  # [B]
    expert = is_expert.detach().cpu()  # [B]
    _, g = torch.unique(group_ids.detach().cpu(), return_inverse=True)  # [B] dense group index in [0, G)
    n_groups = int(g.max().item()) + 1 if g.numel() else 0

    # Per (group, stream) statistics: segment k = 2 * g + is_expert.
    seg = 2 * g + expert.long()  # [B]
    per_stream = segment_stats(r, seg, 2 * n_groups, config.std_unbiased)  # count, mean, std, flat: [2G] each
    cnt_gs, mu_gs, sd_gs, flat_gs = per_stream

    no_baseline_groups = 0
    if config.advantage_mode == "joint":
        _, mu_g, sd_g, flat_g = segment_stats(r, g, n_groups, config.std_unbiased)  # [G] each
        adv = _normalise(r - mu_g[g], sd_g[g], flat_g[g], 0.0, config)
    else:
        own = _normalise(r - mu_gs[seg], sd_gs[seg], flat_gs[seg], 0.0, config)  # [B] per-stream advantage
        adv, no_baseline_groups = _expert_rows(own, r, expert, g, per_stream, config)

    stats = _advantage_stats(r, adv, expert, cnt_gs, sd_gs, n_groups)
    stats["stream/off/no_baseline_groups"] = float(no_baseline_groups)
    return adv.to(device=device, dtype=rewards.dtype), stats


def _expert_rows(
    own: Tensor,
    r: Tensor,
    expert: Tensor,
    g: Tensor,
    per_stream: tuple[Tensor, Tensor, Tensor, Tensor],
    config: ObjectiveConfig,
) -> tuple[Tensor, int]:
    """``own`` ``[B]`` with the expert rows replaced as ``on_baseline``/``batch_floor`` say; groups without baseline.

    ``r``, ``expert``, ``g``: ``[B]`` rewards (float64), expert flags, dense group ids; ``per_stream``: count, mean,
    std, flat ``[2G]`` of :func:`segment_stats` over segments ``2 * g + is_expert``.
    """
    cnt_gs, mu_gs, sd_gs, _ = per_stream
    if config.advantage_mode == "on_baseline":
        on_k = 2 * g  # [B] the on-policy segment of each row's group
        has_on = cnt_gs[on_k] > 0  # [B]
        # The baseline is the on-policy group, so a flat on-policy group does NOT zero the expert row.
        vs_on = _normalise(r - mu_gs[on_k], sd_gs[on_k], torch.zeros_like(expert), config.sigma_floor, config)
        vs_on = torch.where(has_on, vs_on, torch.zeros_like(vs_on))
        return torch.where(expert, vs_on, own), len(torch.unique(g[expert & ~has_on]))
    if config.advantage_mode == "batch_floor" and bool(expert.any()):
        r_off = r[expert]  # [B_off]
        zeros = torch.zeros(r_off.numel(), dtype=torch.long)
        _, mu_b, sd_b, flat_b = segment_stats(r_off, zeros, 1, config.std_unbiased)  # [1] each
        off_adv = _normalise(
            r_off - mu_b[0], sd_b.expand_as(r_off), flat_b.expand_as(r_off), config.sigma_floor, config
        )
        adv = own.clone()
        adv[expert] = off_adv
        return adv, 0
    return own, 0
