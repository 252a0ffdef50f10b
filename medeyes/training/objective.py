"""The dual-stream GRPO objective: advantages, the clipped/shaped surrogate, SFT loss and tensor helpers.

Pure functions, tensors in and tensors out: no model, no environment. The math
and every option are explained in ``docs/objective.md``; METHOD.md section 5 is
the paper's side of it.

Shapes: ``B`` rows (sequences, both streams mixed in any order), ``T`` token
positions, ``V`` vocabulary. A row is on-policy (sampled from the policy being
trained, ``is_expert == False``) or expert (an off-policy GRN/CVS trajectory,
``is_expert == True``). ``group_ids`` ties every row to its prompt (GRPO group).

Metrics are plain floats in fixed namespaces (``stream/on/``, ``stream/off/``,
``loss/``, ``entropy/``). A metric that has no data in a batch (e.g. the ratio
of an empty stream) is left out rather than reported as 0 or NaN; counts
(``stream/*/rows``, ``stream/*/tokens``, ``stream/*/samples``) are always present.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medeyes.training.logprobs import sequence_logprobs_from_logits
from medeyes.training.objective_config import Aggregation, ObjectiveConfig

STREAMS: tuple[tuple[str, bool], ...] = (("on", False), ("off", True))
"""Stream names as used in metric keys, with the ``is_expert`` value of their rows."""


# ----------------------------------------------------------------------------------------------------------------
# Tensor helpers
# ----------------------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is true; 0 (not NaN) where the mask is empty.

    Masked-out values never reach the result, even if they are inf or NaN, and get zero gradient.

    Args:
        x: Values, any shape.
        mask: Same shape as ``x``; nonzero/True marks the positions to average.
        dim: Reduce over this dimension only; None reduces over everything to a scalar.

    Returns:
        A scalar tensor (``dim=None``) or ``x`` reduced over ``dim``.

    >>> masked_mean(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[1, 1, 0]])).item()
    1.5

    """
    if x.shape != mask.shape:
        raise ValueError(
            f"masked_mean: x has shape {tuple(x.shape)} but mask has {tuple(mask.shape)}; they must match."
        )
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    count = keep.to(x.dtype if x.is_floating_point() else torch.float32)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1.0)
    return total.sum(dim=dim) / count.sum(dim=dim).clamp(min=1.0)


def sft_loss(
    logprobs_or_logits: Tensor,
    loss_mask: Tensor,
    target_ids: Tensor | None = None,
    aggregation: Aggregation = "token_mean",
) -> Tensor:
    """Negative log-likelihood over masked tokens (the warm-start SFT loss), token-mean by default.

    ``aggregation="seq_mean_token_mean"`` averages within each sequence first, so a one-turn trajectory
    weighs as much as a four-turn one (its answer is not drowned by the long one's box coordinates).

    Args:
        logprobs_or_logits: Either ``[B, T]`` log-probabilities of the target tokens, or ``[B, T, V]``
            logits (then ``target_ids`` is required and the log-probs are taken with
            :func:`sequence_logprobs_from_logits`).
        loss_mask: ``[B, T]``; nonzero on the tokens to imitate (the trajectory's model-generated text).
        target_ids: ``[B, T]`` token ids, only with logits.
        aggregation: ``token_mean`` (every masked token weighs the same) or ``seq_mean_token_mean``.

    Returns:
        Scalar loss; 0 (with a graph) when the mask is empty.

    >>> round(sft_loss(torch.tensor([[-1.0, -3.0, -50.0]]), torch.tensor([[1, 1, 0]])).item(), 4)
    2.0
    >>> lp, mask = torch.tensor([[-1.0, -3.0], [-6.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    >>> round(sft_loss(lp, mask).item(), 4), round(sft_loss(lp, mask, aggregation="seq_mean_token_mean").item(), 4)
    (3.3333, 4.0)

    """
    if logprobs_or_logits.dim() == 3:
        if target_ids is None:
            raise ValueError("sft_loss got [B, T, V] logits but no target_ids; pass target_ids=[B, T] token ids.")
        lp = sequence_logprobs_from_logits(logprobs_or_logits, target_ids)
    elif logprobs_or_logits.dim() == 2:
        if target_ids is not None:
            raise ValueError("sft_loss got [B, T] log-probabilities and target_ids; pass target_ids only with logits.")
        lp = logprobs_or_logits.float()
    else:
        raise ValueError(
            f"sft_loss expects [B, T] log-probs or [B, T, V] logits, got shape {tuple(logprobs_or_logits.shape)}."
        )
    if aggregation == "token_mean":
        return masked_mean(-lp, loss_mask)
    mask = loss_mask.to(lp.dtype)
    return _aggregate(torch.where(loss_mask.bool(), -lp, torch.zeros_like(lp)), mask, aggregation)


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


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
    unbiased = config.std_unbiased

    # Per (group, stream) statistics: segment k = 2 * g + is_expert.
    seg = 2 * g + expert.long()  # [B]
    cnt_gs, mu_gs, sd_gs, flat_gs = segment_stats(r, seg, 2 * n_groups, unbiased)  # [2G] each
    on_k = 2 * g  # [B] the on-policy segment of each row's group

    no_baseline_groups = 0
    if config.advantage_mode == "joint":
        _, mu_g, sd_g, flat_g = segment_stats(r, g, n_groups, unbiased)  # [G] each
        adv = _normalise(r - mu_g[g], sd_g[g], flat_g[g], 0.0, config)
    else:
        own = _normalise(r - mu_gs[seg], sd_gs[seg], flat_gs[seg], 0.0, config)  # [B] per-stream advantage
        adv = own
        if config.advantage_mode == "on_baseline":
            has_on = cnt_gs[on_k] > 0  # [B]
            # The baseline is the on-policy group, so a flat on-policy group does NOT zero the expert row.
            vs_on = _normalise(r - mu_gs[on_k], sd_gs[on_k], torch.zeros_like(expert), config.sigma_floor, config)
            vs_on = torch.where(has_on, vs_on, torch.zeros_like(vs_on))
            adv = torch.where(expert, vs_on, own)
            no_baseline_groups = len(torch.unique(g[expert & ~has_on]))
        elif config.advantage_mode == "batch_floor" and bool(expert.any()):
            r_off = r[expert]  # [B_off]
            zeros = torch.zeros(r_off.numel(), dtype=torch.long)
            _, mu_b, sd_b, flat_b = segment_stats(r_off, zeros, 1, unbiased)  # [1] each
            off_adv = _normalise(
                r_off - mu_b[0], sd_b.expand_as(r_off), flat_b.expand_as(r_off), config.sigma_floor, config
            )
            adv = own.clone()
            adv[expert] = off_adv

    stats = _advantage_stats(r, adv, expert, cnt_gs, sd_gs, n_groups)
    stats["stream/off/no_baseline_groups"] = float(no_baseline_groups)
    return adv.to(device=device, dtype=rewards.dtype), stats


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: Aggregation) -> Tensor:
    """Reduce ``[B, T]`` per-token values over ``mask`` to a scalar; rows with no tokens are skipped.

    ``per_token`` must already be 0 (and finite) where ``mask`` is false.
    """
    tokens = mask.sum(dim=1)  # [B]
    if aggregation == "token_mean":
        return per_token.sum() / tokens.sum().clamp(min=1.0)
    row_mean = per_token.sum(dim=1) / tokens.clamp(min=1.0)  # [B]
    has = (tokens > 0).to(per_token.dtype)  # [B]
    return (row_mean * has).sum() / has.sum().clamp(min=1.0)


def _check_loss_inputs(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    is_expert: Tensor,
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}.")
    shape = tuple(logprobs.shape)
    for name, x in (("old_logprobs", old_logprobs), ("loss_mask", loss_mask), ("ref_logprobs", ref_logprobs)):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but logprobs has {shape}; they must match.")
    if entropy is not None and tuple(entropy.shape) != shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)} but logprobs has {shape}; they must match.")
    for name, x in (("advantages", advantages), ("is_expert", is_expert)):
        if tuple(x.shape) != shape[:1]:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; it must be [B] = ({shape[0]},).")
    if is_expert.dtype != torch.bool:
        raise TypeError(f"is_expert must be a bool tensor, got dtype {is_expert.dtype}; use .bool().")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a float tensor, got dtype {logprobs.dtype}.")


def dual_stream_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    is_expert: Tensor,
    config: ObjectiveConfig,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The dual-stream GRPO loss (to minimise) and its per-stream health metrics.

    Per loss token ``t`` of row ``i`` with advantage ``A_i``:

    - on-policy rows: ``r = exp(logprobs - old_logprobs)``,
      ``l = -min(r A, clip(r, 1 - clip_eps, 1 + clip_high) A)`` (PPO).
    - expert rows: ``rho = exp(logprobs)`` (``pi_expert := 1``; ``old_logprobs`` is ignored),
      ``w = rho / (rho + gamma)`` if ``off_policy_shaping`` else ``rho``, ``l = -w A`` (or the PPO clip of
      ``w`` against 1 if ``clip_off_policy``). The gradient is ``-A * dw/dlogp * grad(logp)`` with
      ``dw/dlogp = rho`` unshaped (low-probability tokens learn little) and ``gamma rho / (rho + gamma)^2``
      shaped (largest near ``rho = gamma``, so low-probability expert tokens are emphasised).
    - plus ``kl_coef * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` and ``- entropy_coef * entropy``.

    Each term is reduced with ``config.aggregation`` over ``loss_mask`` (both streams pooled). Positions
    outside ``loss_mask`` never touch the loss or its gradient, even if they hold inf/NaN padding; rows with
    an empty mask are skipped; an all-empty batch gives loss 0 with a graph.

    Args:
        logprobs: ``[B, T]`` log pi_theta of the taken tokens (with grad).
        old_logprobs: ``[B, T]`` log-probs of the behaviour policy that sampled the on-policy rows.
        advantages: ``[B]`` one advantage per row (from :func:`compute_advantages`).
        loss_mask: ``[B, T]``; nonzero exactly on tokens the policy/expert generated.
        is_expert: ``[B]`` bool, True for expert rows.
        config: The objective's configuration.
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required when ``kl_coef > 0``.
        entropy: ``[B, T]`` per-token policy entropy (with grad for the bonus); required when
            ``entropy_coef > 0``.

    Returns:
        ``(loss, metrics)``: a scalar float32 tensor, and plain floats: ``loss/total``, ``loss/policy``,
        ``loss/kl`` (the k3 estimate, before ``kl_coef``, when ``ref_logprobs`` is given), ``loss/entropy``
        and ``entropy/mean`` (when ``entropy`` is given); per stream ``stream/s/rows``, ``stream/s/tokens``,
        and when it has tokens ``stream/s/pg_loss``, ``stream/s/adv_mean``, ``stream/s/adv_std``,
        ``stream/s/clip_frac``; on-policy ``stream/on/ratio_{mean,min,max}``,
        ``stream/on/clip_frac_{low,high}``, ``stream/on/approx_kl`` (k3 of old vs new);
        expert ``stream/off/rho_{mean,min,max}`` and ``stream/off/weight_mean`` (the shaped ratio).

    """
    _check_loss_inputs(logprobs, old_logprobs, advantages, loss_mask, is_expert, ref_logprobs, entropy)
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs ref_logprobs; pass them or set kl_coef=0.")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef} > 0 needs entropy; pass it or set entropy_coef=0.")

    mask = loss_mask.bool()  # [B, T]
    maskf = mask.float()  # [B, T]
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)

    adv = advantages.detach().float()[:, None]  # [B, 1]
    expert = is_expert[:, None]  # [B, 1]
    on_tok = mask & ~expert  # [B, T]
    off_tok = mask & expert  # [B, T]
    lp = torch.where(mask, logprobs.float(), zero)  # [B, T]; 0 outside the mask: no gradient, no NaN leaks
    old = torch.where(on_tok, old_logprobs.detach().float(), zero)  # [B, T]; expert rows' values are ignored
    lo, hi = 1.0 - config.clip_eps, 1.0 + config.clip_high

    # On-policy: PPO clipped surrogate.
    ratio = torch.exp(lp - old)  # [B, T]
    on_loss = -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)  # [B, T]
    on_clip_low = on_tok & (ratio < lo) & (adv < 0)  # [B, T] zero-gradient because clipped below
    on_clip_high = on_tok & (ratio > hi) & (adv > 0)  # [B, T] zero-gradient because clipped above

    # Expert: rho = pi_theta / pi_expert with pi_expert := 1, optionally shaped, unclipped by default.
    rho = torch.exp(lp)  # [B, T]
    weight = rho / (rho + config.shaping_gamma) if config.off_policy_shaping else rho  # [B, T]
    if config.clip_off_policy:
        off_loss = -torch.minimum(weight * adv, weight.clamp(lo, hi) * adv)  # [B, T]
        off_clipped = off_tok & (((weight < lo) & (adv < 0)) | ((weight > hi) & (adv > 0)))
    else:
        off_loss = -weight * adv  # [B, T]
        off_clipped = torch.zeros_like(off_tok)

    pg = torch.where(on_tok, on_loss, torch.where(off_tok, off_loss, zero))  # [B, T]
    policy = _aggregate(pg, maskf, config.aggregation)
    total, metrics = _regularised(policy, lp, mask, config, ref_logprobs, entropy)
    if not bool(mask.any()):
        total = total + (lp * 0.0).sum()  # keep a graph so backward() works on an all-empty batch
    metrics["loss/policy"] = policy.item()
    metrics["loss/total"] = total.item()

    clipped = {"on": on_clip_low | on_clip_high, "off": off_clipped}
    metrics.update(_stream_metrics(pg, advantages, is_expert, {"on": on_tok, "off": off_tok}, clipped, config))
    with torch.no_grad():
        metrics.update(_ratio_metrics(ratio, lp - old, on_tok, on_clip_low, on_clip_high, rho, weight, off_tok))
    return total, metrics


def _regularised(
    policy: Tensor,
    lp: Tensor,
    mask: Tensor,
    config: ObjectiveConfig,
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    """``policy + kl_coef * k3 - entropy_coef * entropy`` (each aggregated over ``mask`` ``[B, T]``) and their values.

    ``k3 = exp(ref - logp) - (ref - logp) - 1`` per token; a term is reported when its input is given, and
    added to the loss only when its coefficient is positive.
    """
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    maskf = mask.float()  # [B, T]
    total = policy
    metrics: dict[str, float] = {}
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.detach().float(), zero) - lp  # [B, T], 0 outside the mask
        k3 = torch.where(mask, torch.exp(d) - d - 1.0, zero)  # [B, T]
        kl = _aggregate(k3, maskf, config.aggregation)
        if config.kl_coef > 0:
            total = total + config.kl_coef * kl
        metrics["loss/kl"] = kl.item()
    if entropy is not None:
        ent = torch.where(mask, entropy.float(), zero)  # [B, T]
        ent_agg = _aggregate(ent, maskf, config.aggregation)
        if config.entropy_coef > 0:
            total = total - config.entropy_coef * ent_agg
        metrics["loss/entropy"] = ent_agg.item()
        metrics["entropy/mean"] = masked_mean(ent.detach(), mask).item()
    return total, metrics


@torch.no_grad()
def _stream_metrics(
    pg: Tensor,
    advantages: Tensor,
    is_expert: Tensor,
    tokens: dict[str, Tensor],
    clipped: dict[str, Tensor],
    config: ObjectiveConfig,
) -> dict[str, float]:
    """Per stream: rows and tokens always; advantage mean/std, policy-gradient loss and clip share when it has tokens.

    ``pg``, ``tokens[s]`` and ``clipped[s]`` are ``[B, T]``; ``advantages`` and ``is_expert`` ``[B]``.
    """
    zero = torch.zeros((), dtype=torch.float32, device=pg.device)
    metrics: dict[str, float] = {}
    for name, flag in STREAMS:
        rows = is_expert == flag  # [B]
        tok = tokens[name]
        n_tok = int(tok.sum().item())
        metrics[f"stream/{name}/rows"] = float(rows.sum().item())
        metrics[f"stream/{name}/tokens"] = float(n_tok)
        if n_tok == 0:
            continue
        a = advantages.detach().float()[rows]
        metrics[f"stream/{name}/adv_mean"] = a.mean().item()
        metrics[f"stream/{name}/adv_std"] = a.std(correction=0).item()
        metrics[f"stream/{name}/pg_loss"] = _aggregate(
            torch.where(tok, pg, zero), tok.float(), config.aggregation
        ).item()
        metrics[f"stream/{name}/clip_frac"] = masked_mean(clipped[name].float(), tok).item()
    return metrics


def _ratio_metrics(
    ratio: Tensor,
    log_ratio: Tensor,
    on_tok: Tensor,
    on_clip_low: Tensor,
    on_clip_high: Tensor,
    rho: Tensor,
    weight: Tensor,
    off_tok: Tensor,
) -> dict[str, float]:
    """On-policy ratio statistics and approx KL (k3 of old vs new); expert rho and shaped weight (all ``[B, T]``)."""
    metrics: dict[str, float] = {}
    if on_tok.any():
        sel = ratio[on_tok]
        metrics["stream/on/ratio_mean"] = sel.mean().item()
        metrics["stream/on/ratio_min"] = sel.min().item()
        metrics["stream/on/ratio_max"] = sel.max().item()
        metrics["stream/on/clip_frac_low"] = masked_mean(on_clip_low.float(), on_tok).item()
        metrics["stream/on/clip_frac_high"] = masked_mean(on_clip_high.float(), on_tok).item()
        log_r = log_ratio[on_tok]
        metrics["stream/on/approx_kl"] = (torch.exp(log_r) - 1.0 - log_r).mean().item()
    if off_tok.any():
        sel = rho[off_tok]
        metrics["stream/off/rho_mean"] = sel.mean().item()
        metrics["stream/off/rho_min"] = sel.min().item()
        metrics["stream/off/rho_max"] = sel.max().item()
        metrics["stream/off/weight_mean"] = weight[off_tok].mean().item()
    return metrics
