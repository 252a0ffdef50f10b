"""The dual-stream GRPO objective's settings, apart from its math so that reading a config needs no torch.

The math is in :mod:`medeyes.training.objective`; every option is explained in ``docs/objective.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.errors import ConfigError

AdvantageMode = Literal["per_stream", "on_baseline", "batch_floor", "joint"]
"""How expert-stream advantages are normalised (on-policy rows are the same in every mode but "joint").

- ``per_stream`` (paper): each row against the mean/std of its own stream within its own group.
- ``on_baseline`` (LUFFY's ``grpo_split``): expert rows against the on-policy mean/std of their group.
- ``batch_floor``: expert rows against the mean/std of all expert rows of the batch, std floored.
- ``joint``: plain GRPO over the mixed group (both streams pooled): the "reward assimilation"
  the paper's decoupling is meant to prevent; kept as an ablation.
"""

Aggregation = Literal["seq_mean_token_mean", "token_mean"]


class ObjectiveConfig(BaseModel):
    """Every knob of the dual-stream GRPO objective; defaults are the paper's (METHOD.md section 5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    advantage_mode: AdvantageMode = Field(
        default="on_baseline",
        description=(
            "How advantages are normalised. 'on_baseline' (default; LUFFY): expert rows against their group's "
            "on-policy mean/std, std floored at sigma_floor. 'per_stream' (the paper's formula as written): "
            "mean/std within the row's own stream of its own group; when every kept demonstration of a prompt is "
            "correct, sigma_off = 0 and every expert row gets advantage 0 (86% of expert groups in the default "
            "run: docs/objective.md). "
            "'batch_floor': expert rows against all expert rows of the batch, std floored at sigma_floor. "
            "'joint': one mean/std over both streams of the group (reward assimilation; ablation only)."
        ),
    )
    eps: float = Field(default=1e-6, ge=0.0, description="Added to the std in every advantage denominator.")
    std_unbiased: bool = Field(
        default=True,
        description=(
            "Bessel-corrected (n-1) group std, as torch.std, TRL, veRL and LUFFY use; False for the population "
            "(n) std. A group with fewer than 2 rows has std 0 either way."
        ),
    )
    sigma_floor: float = Field(
        default=0.1,
        ge=0.0,
        description=(
            "Lower bound on the std that divides expert advantages in 'on_baseline' and 'batch_floor' "
            "(denominator max(sigma, sigma_floor) + eps), so an all-equal on-policy group cannot blow an "
            "expert advantage up to 1/eps. 0 disables. Not used by 'per_stream' or 'joint'."
        ),
    )
    scale_by_std: bool = Field(
        default=True,
        description="Divide centred rewards by the std (GRPO). False: advantage = reward - mean (Dr. GRPO).",
    )
    clip_eps: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="PPO clip range of the on-policy ratio: clip(r, 1 - clip_eps, 1 + clip_eps_high).",
    )
    clip_eps_high: float | None = Field(
        default=None,
        gt=0.0,
        description="Upper clip range for asymmetric clipping (DAPO 'clip-higher'); None means clip_eps.",
    )
    off_policy_shaping: bool = Field(
        default=False,
        description="Replace the expert ratio rho = pi_theta by f(rho) = rho / (rho + shaping_gamma) (LUFFY).",
    )
    shaping_gamma: float = Field(default=0.1, gt=0.0, description="gamma of the policy shaping f(p) = p / (p + gamma).")
    clip_off_policy: bool = Field(
        default=False,
        description=(
            "Apply the on-policy PPO clip to the (shaped) expert ratio as if pi_old = pi_expert = 1. Off by "
            "default (paper, LUFFY): with rho <= 1 it only zeroes the gradient of negative-advantage expert "
            "tokens whose probability is below 1 - clip_eps."
        ),
    )
    aggregation: Aggregation = Field(
        default="seq_mean_token_mean",
        description=(
            "How per-token losses become one scalar. 'seq_mean_token_mean' (paper): mean over each row's "
            "loss tokens, then mean over rows that have any. 'token_mean': mean over all loss tokens of the "
            "batch, so long rows weigh more."
        ),
    )
    tis_cap: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "Truncated importance sampling against the training-inference mismatch (TRL's "
            "vllm_importance_sampling_cap, verl's tis_imp_ratio_cap): each on-policy token's loss is weighted by "
            "min(exp(logp_train_old - logp_behaviour), tis_cap), where logp_behaviour is what the rollout engine "
            "recorded and logp_train_old the trainer's recomputation before the update (needs "
            "grpo.old_logprobs=recompute). None: off. TRL's default cap is 2."
        ),
    )
    kl_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the k3 KL estimate to a reference policy (paper: 0). > 0 requires ref_logprobs.",
    )
    entropy_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the entropy bonus subtracted from the loss (paper: 0). > 0 requires entropy.",
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> ObjectiveConfig:
        floored = self.advantage_mode in ("on_baseline", "batch_floor") and self.scale_by_std
        if floored and self.sigma_floor == 0.0 and self.eps == 0.0:
            raise ConfigError(
                f"advantage_mode={self.advantage_mode!r} with sigma_floor=0 and eps=0 divides by zero when "
                "the baseline group's rewards are all equal; set sigma_floor > 0 (e.g. 0.1) or eps > 0."
            )
        return self

    @property
    def clip_high(self) -> float:
        """The upper clip range actually used (``clip_eps_high`` or ``clip_eps``)."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
