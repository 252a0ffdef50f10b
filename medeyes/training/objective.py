"""The dual-stream GRPO objective: the clipped/shaped surrogate, SFT loss and tensor helpers.

Advantages live in :mod:`medeyes.training.advantages`; truncated importance sampling's weights in
:mod:`medeyes.training.mismatch` (applied here, so every trainer that calls :func:`dual_stream_loss` honours
``objective.tis_cap``).

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

from medeyes.training.advantages import STREAMS
from medeyes.training.logprobs import sequence_logprobs_from_logits
from medeyes.training.mismatch import tis_weights
from medeyes.training.objective_config import Aggregation, ObjectiveConfig

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
    config: ObjectiveConfig,
    ref_logprobs: Tensor | None,
    entropy: Tensor | None,
    behaviour_logprobs: Tensor | None,
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
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs ref_logprobs; pass them or set kl_coef=0.")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={config.entropy_coef} > 0 needs entropy; pass it or set entropy_coef=0.")
    if config.tis_cap is not None and behaviour_logprobs is None:
        raise ValueError(
            f"objective.tis_cap={config.tis_cap:g} needs behaviour_logprobs (the log-probs the rollout engine "
            "recorded); pass them or set objective.tis_cap=null."
        )
    if behaviour_logprobs is not None and behaviour_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"behaviour_logprobs has shape {tuple(behaviour_logprobs.shape)} but logprobs has "
            f"{tuple(logprobs.shape)}; they must match."
        )


def dual_stream_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    is_expert: Tensor,
    config: ObjectiveConfig,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    behaviour_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The dual-stream GRPO loss (to minimise) and its per-stream health metrics.

    Per loss token ``t`` of row ``i`` with advantage ``A_i``: on-policy rows the PPO clipped surrogate
    (:func:`_on_policy_terms`); expert rows ``-w A`` with ``w`` the (shaped) ratio ``pi_theta / pi_expert``,
    ``pi_expert := 1`` (:func:`_off_policy_terms`); plus ``kl_coef * k3`` and ``- entropy_coef * entropy``
    (:func:`_regularised`). With ``config.tis_cap`` the on-policy term of each token is weighted by
    ``min(exp(old - behaviour), tis_cap)`` (truncated importance sampling, no gradient). Each term is reduced
    with ``config.aggregation`` over ``loss_mask`` (both streams pooled). Positions outside ``loss_mask`` never
    touch the loss or its gradient, even if they hold inf/NaN padding; rows with an empty mask are skipped; an
    all-empty batch gives loss 0 with a graph.

    Args:
        logprobs: ``[B, T]`` log pi_theta of the taken tokens (with grad).
        old_logprobs: ``[B, T]`` log-probs of the behaviour policy that sampled the on-policy rows.
        advantages: ``[B]`` one advantage per row (from :func:`compute_advantages`).
        loss_mask: ``[B, T]``; nonzero exactly on tokens the policy/expert generated.
        is_expert: ``[B]`` bool, True for expert rows.
        config: The objective's configuration.
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required when ``kl_coef > 0``.
        entropy: ``[B, T]`` per-token policy entropy (with grad for the bonus); required when ``entropy_coef > 0``.
        behaviour_logprobs: ``[B, T]`` log-probs the rollout engine recorded for the on-policy tokens, when
            ``old_logprobs`` are the trainer's recomputation; required when ``config.tis_cap`` is set (truncated
            importance sampling against the training-inference mismatch, :mod:`medeyes.training.mismatch`),
            ignored otherwise.

    Returns:
        ``(loss, metrics)``: a scalar float32 tensor, and plain floats: ``loss/total``, ``loss/policy`` and the
        metrics of :func:`_regularised`, :func:`_stream_metrics` and :func:`_ratio_metrics` (and with
        ``tis_cap`` those of :func:`~medeyes.training.mismatch.tis_weights`).

    """
    inputs = (logprobs, old_logprobs, advantages, loss_mask, is_expert, config, ref_logprobs, entropy)
    _check_loss_inputs(*inputs, behaviour_logprobs)
    mask, on_tok, off_tok = _stream_masks(loss_mask, is_expert)  # [B, T] each
    is_weights, tis = None, {}
    if config.tis_cap is not None and behaviour_logprobs is not None:  # TIS: the engine sampled, not pi_old
        is_weights, tis = tis_weights(old_logprobs, behaviour_logprobs, on_tok, config.tis_cap)  # [B, T]
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    adv = advantages.detach().float()[:, None]  # [B, 1]
    lp = torch.where(mask, logprobs.float(), zero)  # [B, T]; 0 outside the mask: no gradient, no NaN leaks
    old = torch.where(on_tok, old_logprobs.detach().float(), zero)  # [B, T]; expert rows' values are ignored
    ratio = torch.exp(lp - old)  # [B, T]
    on_loss, on_clip_low, on_clip_high = _on_policy_terms(ratio, adv, on_tok, config, is_weights)
    rho = torch.exp(lp)  # [B, T]
    off_loss, off_clipped, weight = _off_policy_terms(rho, adv, off_tok, config)
    pg = torch.where(on_tok, on_loss, torch.where(off_tok, off_loss, zero))  # [B, T]
    policy = _aggregate(pg, mask.float(), config.aggregation)
    total, metrics = _regularised(policy, lp, mask, config, ref_logprobs, entropy)
    if not bool(mask.any()):
        total = total + (lp * 0.0).sum()  # keep a graph so backward() works on an all-empty batch
    metrics["loss/policy"] = policy.item()
    metrics["loss/total"] = total.item()
    clipped = {"on": on_clip_low | on_clip_high, "off": off_clipped}
    metrics.update(_stream_metrics(pg, advantages, is_expert, {"on": on_tok, "off": off_tok}, clipped, config))
    metrics.update(_ratio_metrics(ratio, lp, old, on_tok, on_clip_low, on_clip_high, rho, weight, off_tok))
    metrics.update(tis)
    return total, metrics


def _stream_masks(loss_mask: Tensor, is_expert: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The loss tokens ``[B, T]`` (bool), and of them the on-policy and the expert rows' (``is_expert`` ``[B]``)."""
    mask = loss_mask.bool()  # [B, T]
    expert = is_expert[:, None]  # [B, 1]
    return mask, mask & ~expert, mask & expert


def _on_policy_terms(
    ratio: Tensor, adv: Tensor, on_tok: Tensor, config: ObjectiveConfig, is_weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate ``l = -min(r A, clip(r, 1 - clip_eps, 1 + clip_high) A)``, ``r = exp(logp - old)``.

    ``ratio``, ``on_tok``: ``[B, T]``; ``adv``: ``[B, 1]``; ``is_weights``: ``[B, T]`` truncated importance
    sampling weights (no grad) that multiply ``l``, or None. Returns the per-token loss ``[B, T]`` and where the
    clip zeroed the gradient, below and above (``[B, T]`` bool, on-policy tokens only).
    """
    lo, hi = 1.0 - config.clip_eps, 1.0 + config.clip_high
    on_loss = -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)  # [B, T]
    if is_weights is not None:
        on_loss = on_loss * is_weights.detach().float()  # [B, T]; TIS: the engine sampled, not pi_old
    on_clip_low = on_tok & (ratio < lo) & (adv < 0)  # [B, T] zero-gradient because clipped below
    on_clip_high = on_tok & (ratio > hi) & (adv > 0)  # [B, T] zero-gradient because clipped above
    return on_loss, on_clip_low, on_clip_high


def _off_policy_terms(
    rho: Tensor, adv: Tensor, off_tok: Tensor, config: ObjectiveConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Expert rows: ``l = -w A``, ``w = rho / (rho + gamma)`` if ``off_policy_shaping`` else ``rho``.

    ``rho = exp(logp) = pi_theta / pi_expert`` with ``pi_expert := 1`` (``old_logprobs`` is ignored); with
    ``clip_off_policy`` ``w`` is PPO-clipped against 1. The gradient is ``-A * dw/dlogp * grad(logp)`` with
    ``dw/dlogp = rho`` unshaped (low-probability tokens learn little) and ``gamma rho / (rho + gamma)^2`` shaped
    (largest near ``rho = gamma``, so low-probability expert tokens are emphasised).

    ``rho``, ``off_tok``: ``[B, T]``; ``adv``: ``[B, 1]``. Returns the per-token loss, where the clip zeroed the
    gradient (all False unclipped) and ``w``, each ``[B, T]``.
    """
    lo, hi = 1.0 - config.clip_eps, 1.0 + config.clip_high
    weight = rho / (rho + config.shaping_gamma) if config.off_policy_shaping else rho  # [B, T]
    if config.clip_off_policy:
        off_loss = -torch.minimum(weight * adv, weight.clamp(lo, hi) * adv)  # [B, T]
        off_clipped = off_tok & (((weight < lo) & (adv < 0)) | ((weight > hi) & (adv > 0)))
    else:
        off_loss = -weight * adv  # [B, T]
        off_clipped = torch.zeros_like(off_tok)
    return off_loss, off_clipped, weight


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
    added to the loss only when its coefficient is positive: ``loss/kl`` (the k3 estimate, before ``kl_coef``),
    ``loss/entropy`` and ``entropy/mean``.
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

    ``stream/s/rows``, ``stream/s/tokens``, and when it has tokens ``stream/s/pg_loss``, ``stream/s/adv_mean``,
    ``stream/s/adv_std``, ``stream/s/clip_frac``. ``pg``, ``tokens[s]`` and ``clipped[s]`` are ``[B, T]``;
    ``advantages`` and ``is_expert`` ``[B]``.
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


@torch.no_grad()
def _ratio_metrics(
    ratio: Tensor,
    lp: Tensor,
    old: Tensor,
    on_tok: Tensor,
    on_clip_low: Tensor,
    on_clip_high: Tensor,
    rho: Tensor,
    weight: Tensor,
    off_tok: Tensor,
) -> dict[str, float]:
    """On-policy ratio statistics and approx KL (k3 of ``old`` vs ``lp``); expert rho and shaped weight (all [B, T]).

    On-policy ``stream/on/ratio_{mean,min,max}``, ``stream/on/clip_frac_{low,high}``, ``stream/on/approx_kl``;
    expert ``stream/off/rho_{mean,min,max}`` and ``stream/off/weight_mean`` (the shaped ratio).
    """
    metrics: dict[str, float] = {}
    if on_tok.any():
        sel = ratio[on_tok]
        metrics["stream/on/ratio_mean"] = sel.mean().item()
        metrics["stream/on/ratio_min"] = sel.min().item()
        metrics["stream/on/ratio_max"] = sel.max().item()
        metrics["stream/on/clip_frac_low"] = masked_mean(on_clip_low.float(), on_tok).item()
        metrics["stream/on/clip_frac_high"] = masked_mean(on_clip_high.float(), on_tok).item()
        log_r = (lp - old)[on_tok]
        metrics["stream/on/approx_kl"] = (torch.exp(log_r) - 1.0 - log_r).mean().item()
    if off_tok.any():
        sel = rho[off_tok]
        metrics["stream/off/rho_mean"] = sel.mean().item()
        metrics["stream/off/rho_min"] = sel.min().item()
        metrics["stream/off/rho_max"] = sel.max().item()
        metrics["stream/off/weight_mean"] = weight[off_tok].mean().item()
    return metrics
