"""Dual-stream GRPO objective: hand-computed tensors for every option, then vectorised vs plain-loop references."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from pydantic import ValidationError

from medeyes.training.advantages import compute_advantages
from medeyes.training.logprobs import entropy_from_logits, sequence_logprobs_from_logits
from medeyes.training.objective import (
    dual_stream_loss,
    masked_mean,
    sft_loss,
)
from medeyes.training.objective_config import ObjectiveConfig
from medeyes.training.shaping import curiosity_bonus, flat_groups

F = torch.float32


def paper_config(**overrides) -> ObjectiveConfig:
    """The objective with the paper's per-stream statistics (the default is on_baseline since issue 20)."""
    return ObjectiveConfig(**{"advantage_mode": "per_stream", **overrides})


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F)


def ids(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def flags(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.bool)


def approx(x, rel: float = 1e-5, abs: float = 1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


def assert_tensor(x: torch.Tensor, expected) -> None:
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers_except_the_expert_baseline():
    c = ObjectiveConfig()
    assert c.advantage_mode == "on_baseline"  # the paper's per_stream zeroes the expert stream (sigma_off = 0)
    assert (c.eps, c.clip_eps, c.clip_high, c.shaping_gamma, c.sigma_floor) == (1e-6, 0.2, 0.2, 0.1, 0.1)
    assert c.scale_by_std and c.std_unbiased
    assert not c.off_policy_shaping and not c.clip_off_policy
    assert c.aggregation == "seq_mean_token_mean"
    assert (c.kl_coef, c.entropy_coef) == (0.0, 0.0)
    assert all(f.description for f in ObjectiveConfig.model_fields.values())


@pytest.mark.parametrize(
    "kwargs",
    [{"clip_eps": 0.0}, {"clip_eps": 1.0}, {"shaping_gamma": 0.0}, {"kl_coef": -1.0}, {"advantage_mode": "mixed"}],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValidationError):
        paper_config(**kwargs)


def test_config_rejects_unknown_field():
    with pytest.raises(ValidationError, match=r"Extra inputs are not permitted"):
        paper_config(clip_range=0.2)


def test_config_cross_field_rule_names_the_fix():
    with pytest.raises(ValidationError, match=r"sigma_floor=0 and eps=0 divides by zero .* set sigma_floor > 0"):
        paper_config(advantage_mode="on_baseline", sigma_floor=0.0, eps=0.0)
    paper_config(advantage_mode="on_baseline", sigma_floor=0.0, eps=1e-6)  # allowed
    paper_config(advantage_mode="per_stream", eps=0.0)  # allowed: flat groups are exactly 0, never 0/0


# ----------------------------------------------------------------------------------------------------------------
# Advantages, hand-computed
# ----------------------------------------------------------------------------------------------------------------

# Group 0: on-policy [1, 0, 1, 0], expert [1, 0]. Group 1: expert [1, 1, 1] (sigma_off = 0, the known hole).
R = t(1, 0, 1, 0, 1, 0, 1, 1, 1)
G = ids(0, 0, 0, 0, 0, 0, 1, 1, 1)
E = flags(0, 0, 0, 0, 1, 1, 1, 1, 1)
S3 = 1 / math.sqrt(3)  # unbiased std of [1, 0, 1, 0] is sqrt(1/3)


def test_per_stream_unbiased_std():
    adv, stats = compute_advantages(R, G, E, paper_config(eps=0.0))
    # on: 0.5 / sqrt(1/3) = 0.8660; expert [1, 0]: 0.5 / sqrt(0.5) = 0.7071; group 1 flat -> 0
    h = 0.5 / S3
    assert adv.tolist() == approx([h, -h, h, -h, 0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0, 0, 0])
    assert adv.dtype == F
    assert stats["stream/off/sigma_zero_groups"] == 1.0
    assert stats["stream/on/sigma_zero_groups"] == 0.0
    assert stats["stream/off/groups"] == 2.0 and stats["stream/on/groups"] == 1.0
    assert stats["stream/off/samples"] == 5.0 and stats["stream/on/samples"] == 4.0
    assert stats["stream/off/adv_zero_frac"] == approx(3 / 5)
    assert stats["stream/on/reward_mean"] == approx(0.5)
    assert stats["stream/off/reward_mean"] == approx(0.8)


def test_per_stream_population_std():
    adv, _ = compute_advantages(R, G, E, paper_config(eps=0.0, std_unbiased=False))
    assert adv.tolist() == approx([1, -1, 1, -1, 1, -1, 0, 0, 0])


def test_per_stream_eps_is_added_to_sigma():
    adv, _ = compute_advantages(R, G, E, paper_config(eps=0.01, std_unbiased=False))
    assert adv[0].item() == approx(0.5 / 0.51)


def test_sigma_zero_gives_exact_zero_not_rounding_noise():
    # 0.1 + 0.2 three times: the float mean is not bit-identical to the values, (R - mu) / eps would be ~1e-11.
    x = 0.1 + 0.2
    adv, stats = compute_advantages(t(x, x, x), ids(0, 0, 0), flags(1, 1, 1), paper_config())
    assert adv.tolist() == [0.0, 0.0, 0.0]
    assert stats["stream/off/sigma_zero_groups"] == 1.0
    assert stats["stream/off/adv_zero_frac"] == 1.0


def test_single_expert_per_group_is_sigma_zero():
    adv, stats = compute_advantages(t(1, 0, 1, 0.7), ids(0, 0, 0, 1), flags(0, 0, 1, 1), paper_config())
    assert adv[2:].tolist() == [0.0, 0.0]
    assert stats["stream/off/sigma_zero_groups"] == 2.0


def test_on_baseline_uses_on_policy_stats_with_floor():
    # g0: on [1, 0, 1, 0] (pop std 0.5), expert 1.0 and 0.75. g1: on [0, 0] (flat), expert 1.0.
    r = t(1, 0, 1, 0, 1, 0.75, 0, 0, 1)
    g = ids(0, 0, 0, 0, 0, 0, 1, 1, 1)
    e = flags(0, 0, 0, 0, 1, 1, 0, 0, 1)
    cfg = paper_config(advantage_mode="on_baseline", eps=0.0, std_unbiased=False)
    adv, stats = compute_advantages(r, g, e, cfg)
    # expert: (1 - .5)/.5 = 1, (.75 - .5)/.5 = .5; g1 expert: (1 - 0) / max(0, 0.1) = 10; flat on rows -> 0
    assert adv.tolist() == approx([1, -1, 1, -1, 1.0, 0.5, 0, 0, 10.0])
    assert stats["stream/on/sigma_zero_groups"] == 1.0
    # without the floor, a flat on-policy group sends the expert advantage to 1/eps
    adv, _ = compute_advantages(r, g, e, cfg.model_copy(update={"sigma_floor": 0.0, "eps": 1e-6}))
    assert adv[-1].item() == approx(1e6, rel=1e-4)


def test_on_baseline_group_without_on_policy_rows_is_zero_and_counted():
    adv, stats = compute_advantages(
        t(1, 0, 1, 0.5), ids(0, 0, 0, 7), flags(0, 0, 1, 1), paper_config(advantage_mode="on_baseline")
    )
    assert adv[3].item() == 0.0
    assert stats["stream/off/no_baseline_groups"] == 1.0


def test_batch_floor_pools_all_expert_rows():
    # expert rows over both groups: [1, 0, 1, 1, 1], mean .8, unbiased std sqrt(.2)
    adv, _ = compute_advantages(R, G, E, paper_config(advantage_mode="batch_floor", eps=0.0))
    s = math.sqrt(0.2)
    assert adv[4:].tolist() == approx([0.2 / s, -0.8 / s, 0.2 / s, 0.2 / s, 0.2 / s])
    assert adv[:4].tolist() == approx([0.5 / S3, -0.5 / S3, 0.5 / S3, -0.5 / S3])  # on rows as per_stream


def test_batch_floor_floors_a_small_sigma():
    # experts 0.5 and 0.52 in different groups: pop std 0.01 < floor 0.1 -> +-0.01 / 0.1
    cfg = paper_config(advantage_mode="batch_floor", eps=0.0, std_unbiased=False)
    adv, _ = compute_advantages(t(0.5, 0.52), ids(0, 1), flags(1, 1), cfg)
    assert adv.tolist() == approx([-0.1, 0.1], rel=1e-4)
    adv, _ = compute_advantages(t(0.5, 0.5), ids(0, 1), flags(1, 1), cfg)
    assert adv.tolist() == [0.0, 0.0]


def test_joint_pools_both_streams_of_a_group():
    adv, _ = compute_advantages(R, G, E, paper_config(advantage_mode="joint", eps=0.0))
    s = math.sqrt(1.5 / 5)  # g0 = [1, 0, 1, 0, 1, 0]
    assert adv.tolist() == approx([0.5 / s, -0.5 / s] * 3 + [0, 0, 0])


@pytest.mark.parametrize("mode", ["per_stream", "on_baseline", "batch_floor", "joint"])
def test_no_std_scaling_is_reward_minus_mean(mode):
    r = t(1, 0, 1, 0, 1, 0.5, 1, 1)
    g = ids(0, 0, 0, 0, 0, 0, 1, 1)
    e = flags(0, 0, 0, 0, 1, 1, 1, 1)
    adv, _ = compute_advantages(r, g, e, paper_config(advantage_mode=mode, scale_by_std=False))
    off = {
        "per_stream": [0.25, -0.25, 0, 0],  # vs own mean .75; g1 flat
        "on_baseline": [0.5, 0.0, 0, 0],  # vs mu_on .5; g1 has no on rows
        "batch_floor": [1 - 0.875, 0.5 - 0.875, 1 - 0.875, 1 - 0.875],  # vs batch expert mean .875
        "joint": [1 - 3.5 / 6, 0.5 - 3.5 / 6, 0, 0],  # g0 pooled mean 3.5 / 6
    }[mode]
    on = [1 - 3.5 / 6, -3.5 / 6] * 2 if mode == "joint" else [0.5, -0.5, 0.5, -0.5]
    assert adv.tolist() == approx(on + off)


def test_group_ids_may_be_any_integers_in_any_order():
    perm = torch.tensor([8, 3, 0, 5, 1, 7, 2, 6, 4])
    relabel = {0: 1234, 1: -5}
    g = torch.tensor([relabel[int(x)] for x in G[perm]], dtype=torch.long)
    adv, _ = compute_advantages(R[perm], g, E[perm], paper_config())
    ref, _ = compute_advantages(R, G, E, paper_config())
    assert adv.tolist() == approx(ref[perm].tolist())


def test_empty_stream_and_empty_batch_stats():
    adv, stats = compute_advantages(t(1, 0), ids(0, 0), flags(0, 0), paper_config(advantage_mode="batch_floor"))
    assert stats["stream/off/samples"] == 0.0 and stats["stream/off/groups"] == 0.0
    assert "stream/off/adv_mean" not in stats
    assert all(math.isfinite(v) for v in stats.values())
    adv, stats = compute_advantages(t(), ids(), flags(), paper_config())
    assert adv.shape == (0,) and stats["stream/on/samples"] == 0.0


def test_advantage_input_errors_name_the_problem():
    cfg = paper_config()
    with pytest.raises(TypeError, match=r"group_ids must be a long \(int64\) tensor, got dtype torch.int32; use .long"):
        compute_advantages(t(1, 0), torch.tensor([0, 0], dtype=torch.int32), flags(0, 0), cfg)
    with pytest.raises(TypeError, match="is_expert must be a bool tensor"):
        compute_advantages(t(1, 0), ids(0, 0), ids(0, 0), cfg)
    with pytest.raises(ValueError, match=r"must all be the same \[B\]"):
        compute_advantages(t(1, 0), ids(0), flags(0, 0), cfg)
    with pytest.raises(ValueError, match=r"rewards must be finite; rows \[1\]"):
        compute_advantages(t(1, float("nan")), ids(0, 0), flags(0, 0), cfg)


# ----------------------------------------------------------------------------------------------------------------
# Curiosity bonus (Pixel Reasoner) and flat groups (DAPO), hand-computed
# ----------------------------------------------------------------------------------------------------------------


def test_curiosity_bonus_pays_tool_use_below_the_group_threshold():
    # group 7: 1 of 5 used a tool (rate 0.2); group 3: 2 of 4 (rate 0.5); group 9: none (rate 0)
    used = flags(1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0)
    g = ids(7, 7, 7, 7, 7, 3, 3, 3, 3, 9, 9)
    bonus = curiosity_bonus(used, g, coef=0.5, threshold=0.3)
    assert bonus.dtype == torch.float32
    assert bonus.tolist() == approx([0.5 * 0.1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # 0.5 * (0.3 - 0.2)
    loud = curiosity_bonus(used, g, coef=2.0, threshold=0.6)
    assert loud.tolist() == approx([2 * 0.4, 0, 0, 0, 0, 2 * 0.1, 2 * 0.1, 0, 0, 0, 0])
    # batch scope: 3 of 11 used a tool
    batch = curiosity_bonus(used, g, coef=1.0, threshold=0.5, scope="batch")
    assert batch.tolist() == approx([0.5 - 3 / 11 if u else 0.0 for u in used.tolist()])
    assert curiosity_bonus(used, g, coef=0.0, threshold=1.0).abs().sum() == 0.0
    assert curiosity_bonus(flags(1, 1), ids(0, 0), 1.0, 1.0).tolist() == [0.0, 0.0]  # rate 1 reaches any threshold
    assert curiosity_bonus(flags(), ids(), 1.0, 0.5).shape == (0,)


def test_curiosity_bonus_input_errors():
    with pytest.raises(ValueError, match=r"coef >= 0 and 0 <= threshold <= 1, got coef=0.5, threshold=1.5"):
        curiosity_bonus(flags(1), ids(0), 0.5, 1.5)
    with pytest.raises(TypeError, match="used_tool must be bool and group_ids long"):
        curiosity_bonus(ids(1), ids(0), 0.5, 0.3)
    with pytest.raises(ValueError, match=r"must both be \[N\], got \(2,\) and \(1,\)"):
        curiosity_bonus(flags(1, 0), ids(0), 0.5, 0.3)
    with pytest.raises(ValueError, match="scope must be 'group' or 'batch', got 'prompt'"):
        curiosity_bonus(flags(1), ids(0), 0.5, 0.3, scope="prompt")  # type: ignore[arg-type]


def test_flat_groups_judge_on_policy_rewards_only():
    rewards = t(1.0, 1.0, 0.2, 0.0, 1.0, 0.5, 0.7, 0.3, 0.3, 0.9)
    groups = ids(5, 5, 5, 2, 2, 2, 8, 4, 4, 4)
    expert = flags(0, 0, 1, 0, 0, 1, 1, 0, 1, 1)
    # group 5: on rewards 1, 1 (flat; its expert row too); group 2: 0, 1 (not flat);
    # group 8: expert only (never flat); group 4: a single on-policy row (flat)
    assert flat_groups(rewards, groups, expert).tolist() == [
        True, True, True, False, False, False, False, True, True, True
    ]  # fmt: skip
    # the same groups get on-policy advantage exactly 0
    adv, _ = compute_advantages(rewards, groups, expert, paper_config())
    on_flat = flat_groups(rewards, groups, expert) & ~expert
    assert (adv[on_flat] == 0).all()
    assert flat_groups(t(), ids(), flags()).shape == (0,)
    with pytest.raises(TypeError, match="is_expert must be a bool tensor"):
        flat_groups(t(1.0), ids(0), ids(0))


# ----------------------------------------------------------------------------------------------------------------
# Loss, hand-computed
# ----------------------------------------------------------------------------------------------------------------


def run_loss(lp, old, adv, mask, expert, cfg, **kw):
    lp = lp.clone().requires_grad_(True)
    loss, m = dual_stream_loss(lp, old, adv, mask, expert, cfg, **kw)
    loss.backward()
    return loss.item(), lp.grad, m


def one_on_row(ratio: float, a: float, cfg=None):
    old = t(-1.0, -2.0)[None]
    lp = old + math.log(ratio)
    return run_loss(lp, old, t(a), torch.ones(1, 2), flags(0), cfg or paper_config())


def test_on_policy_unclipped():
    loss, grad, m = one_on_row(1.1, 1.0)
    assert loss == approx(-1.1)
    assert_tensor(grad, [[-1.1 / 2, -1.1 / 2]])  # d(-rA)/dlogp = -rA, mean over 2 tokens
    assert m["stream/on/clip_frac"] == 0.0
    assert m["stream/on/ratio_mean"] == approx(1.1) and m["stream/on/ratio_max"] == approx(1.1)


@pytest.mark.parametrize(
    ("ratio", "a", "loss", "grad", "frac_key"),
    [
        (1.5, 1.0, -1.2, 0.0, "stream/on/clip_frac_high"),  # clipped above: no gradient
        (0.5, -1.0, 0.8, 0.0, "stream/on/clip_frac_low"),  # clipped below: no gradient
        (1.5, -1.0, 1.5, 0.75, None),  # outside the range but on the pessimistic side: not clipped
        (0.5, 1.0, -0.5, -0.25, None),
    ],
)
def test_on_policy_clipping(ratio, a, loss, grad, frac_key):
    got, g, m = one_on_row(ratio, a)
    assert got == approx(loss)
    assert_tensor(g, [[grad, grad]])
    assert m["stream/on/clip_frac"] == (1.0 if frac_key else 0.0)
    if frac_key:
        assert m[frac_key] == 1.0


def test_asymmetric_clip_high():
    assert one_on_row(1.25, 1.0)[0] == approx(-1.2)
    assert one_on_row(1.25, 1.0, paper_config(clip_eps_high=0.3))[0] == approx(-1.25)
    assert one_on_row(0.7, -1.0, paper_config(clip_eps_high=0.3))[0] == approx(0.8)  # low side still 0.2


def test_expert_rows_use_pi_theta_and_ignore_old_logprobs():
    lp = torch.log(t(0.5))[None]
    for old in (t(0.0)[None], t(float("nan"))[None], t(-100.0)[None]):
        loss, grad, m = run_loss(lp, old, t(2.0), torch.ones(1, 1), flags(1), paper_config())
        assert loss == approx(-1.0)  # -rho * A = -0.5 * 2
        assert_tensor(grad, [[-1.0]])  # d(-A e^lp)/dlp = -A rho
        assert m["stream/off/rho_mean"] == approx(0.5)
        assert "stream/on/ratio_mean" not in m


def test_expert_shaping_value_and_gradient():
    cfg = paper_config(off_policy_shaping=True)
    loss, grad, m = run_loss(torch.log(t(0.5))[None], t(0.0)[None], t(2.0), torch.ones(1, 1), flags(1), cfg)
    assert loss == approx(-2 * 0.5 / 0.6)
    assert grad.item() == approx(-2 * 0.1 * 0.5 / 0.6**2)  # -A * gamma rho / (rho + gamma)^2
    assert m["stream/off/weight_mean"] == approx(0.5 / 0.6) and m["stream/off/rho_mean"] == approx(0.5)


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_shaping_gradient_matches_hand_derivative_over_rho(gamma):
    rho = t(1e-4, 0.01, 0.05, 0.1, 0.3, 0.9, 0.999)
    a = -1.5
    cfg = paper_config(off_policy_shaping=True, shaping_gamma=gamma, aggregation="token_mean")
    n = rho.numel()
    _, grad, _ = run_loss(torch.log(rho)[None], torch.zeros(1, n), t(a), torch.ones(1, n), flags(1), cfg)
    hand = -a * gamma * rho / (rho + gamma) ** 2 / n
    assert grad[0].tolist() == approx(hand.tolist(), rel=1e-4)
    # unshaped: -A rho / n, vanishing for rare tokens; shaped peaks at rho = gamma
    _, grad_raw, _ = run_loss(torch.log(rho)[None], torch.zeros(1, n), t(a), torch.ones(1, n), flags(1), paper_config())
    assert grad_raw[0].tolist() == approx((-a * rho / n).tolist(), rel=1e-4)
    assert int(grad[0].abs().argmax()) == int((rho - gamma).abs().argmin())


def test_clip_off_policy_only_zeroes_low_probability_negative_tokens():
    lp = torch.log(t(0.5))[None]
    off = paper_config(clip_off_policy=True)
    loss, grad, m = run_loss(lp, t(0.0)[None], t(-1.0), torch.ones(1, 1), flags(1), off)
    assert loss == approx(0.8) and grad.item() == 0.0 and m["stream/off/clip_frac"] == 1.0
    loss, grad, m = run_loss(lp, t(0.0)[None], t(-1.0), torch.ones(1, 1), flags(1), paper_config())
    assert loss == approx(0.5) and grad.item() == approx(0.5) and m["stream/off/clip_frac"] == 0.0
    loss, grad, _ = run_loss(lp, t(0.0)[None], t(1.0), torch.ones(1, 1), flags(1), off)
    assert loss == approx(-0.5) and grad.item() == approx(-0.5)  # positive advantage: unaffected


def test_aggregations_differ_on_unequal_lengths():
    # ratio 1 everywhere; row 0: A=-1, 1 token (loss 1); row 1: A=-3, 3 tokens (loss 3 each)
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=F)
    args = (lp, lp.clone(), t(-1.0, -3.0), mask, flags(0, 0))
    seq, g_seq, _ = run_loss(*args, paper_config())
    tok, g_tok, _ = run_loss(*args, paper_config(aggregation="token_mean"))
    assert seq == approx((1 + 3) / 2)
    assert tok == approx((1 + 3 * 3) / 4)
    assert_tensor(g_seq, [[0.5, 0, 0], [0.5, 0.5, 0.5]])  # d/dlogp of -rA/(n_i * rows): 1/2, 3/(3*2)
    assert_tensor(g_tok, [[0.25, 0, 0], [0.75, 0.75, 0.75]])


def test_kl_k3_value_gradient_and_coefficient():
    lp = t(-1.0, -2.0)[None]
    ref = lp + math.log(2.0)  # ref - lp = log 2: k3 = 2 - log 2 - 1
    k3 = 1 - math.log(2.0)
    cfg = paper_config(kl_coef=0.5)
    loss, grad, m = run_loss(lp, lp.clone(), t(0.0), torch.ones(1, 2), flags(0), cfg, ref_logprobs=ref)
    assert m["loss/kl"] == approx(k3) and m["loss/policy"] == approx(0.0)
    assert loss == approx(0.5 * k3) and m["loss/total"] == approx(0.5 * k3)
    assert_tensor(grad, [[0.5 * (1 - 2) / 2] * 2])  # d k3 / d lp = 1 - e^(ref - lp)
    # kl_coef = 0: reported, not added; identical policies: 0
    loss, _, m = run_loss(lp, lp.clone(), t(0.0), torch.ones(1, 2), flags(0), paper_config(), ref_logprobs=ref)
    assert loss == approx(0.0) and m["loss/kl"] == approx(k3)
    assert run_loss(lp, lp.clone(), t(0.0), torch.ones(1, 2), flags(0), cfg, ref_logprobs=lp)[2]["loss/kl"] == 0.0


def test_kl_or_entropy_coef_without_tensor_is_an_error():
    args = (torch.zeros(1, 1), torch.zeros(1, 1), t(0.0), torch.ones(1, 1), flags(0))
    with pytest.raises(ValueError, match=r"kl_coef=0.1 > 0 needs ref_logprobs"):
        dual_stream_loss(*args, paper_config(kl_coef=0.1))
    with pytest.raises(ValueError, match=r"entropy_coef=0.01 > 0 needs entropy"):
        dual_stream_loss(*args, paper_config(entropy_coef=0.01))


def test_entropy_bonus():
    lp = torch.zeros(1, 3)
    ent = t(1.0, 3.0, 99.0)[None].requires_grad_(True)
    mask = t(1, 1, 0)[None]
    loss, m = dual_stream_loss(lp, lp, t(0.0), mask, flags(0), paper_config(entropy_coef=0.01), entropy=ent)
    loss.backward()
    assert loss.item() == approx(-0.01 * 2.0)
    assert m["entropy/mean"] == approx(2.0) and m["loss/entropy"] == approx(2.0)
    assert_tensor(ent.grad, [[-0.005, -0.005, 0.0]])


def test_only_on_policy_rows_and_only_expert_rows():
    lp = torch.log(t(0.5, 0.25))[None].repeat(2, 1)
    for expert, present, absent in ((flags(0, 0), "on", "off"), (flags(1, 1), "off", "on")):
        loss, grad, m = run_loss(lp, lp.clone(), t(1.0, -1.0), torch.ones(2, 2), expert, paper_config())
        assert math.isfinite(loss) and torch.isfinite(grad).all()
        assert m[f"stream/{absent}/rows"] == 0.0 and m[f"stream/{absent}/tokens"] == 0.0
        assert f"stream/{absent}/adv_mean" not in m and f"stream/{present}/pg_loss" in m
        assert all(math.isfinite(v) for v in m.values())


def test_empty_mask_rows_and_padding_do_not_leak():
    # row 1 has no loss tokens and garbage everywhere; row 0 has garbage in its padding.
    inf, nan = float("inf"), float("nan")
    lp = torch.tensor([[math.log(0.5), -inf], [nan, -inf]])
    old = torch.tensor([[math.log(0.5), nan], [inf, nan]])
    ref = torch.tensor([[math.log(0.5), nan], [nan, -inf]])
    ent = torch.tensor([[0.7, nan], [inf, nan]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    for expert in (flags(0, 1), flags(1, 0), flags(1, 1)):
        for agg in ("seq_mean_token_mean", "token_mean"):
            cfg = paper_config(aggregation=agg, kl_coef=0.1, entropy_coef=0.01)
            loss, grad, m = run_loss(lp, old, t(1.0, 5.0), mask, expert, cfg, ref_logprobs=ref, entropy=ent)
            pg = -1.0 if not expert[0] else -0.5  # ratio 1 vs rho 0.5, A = 1, one token
            assert loss == approx(pg - 0.01 * 0.7)  # the empty row does not dilute the mean
            assert torch.isfinite(grad).all() and grad[1].abs().sum() == 0 and grad[0, 1] == 0
            assert all(math.isfinite(v) for v in m.values())


def test_all_empty_mask_gives_zero_loss_with_a_graph():
    lp = torch.full((2, 3), float("nan"))
    loss, grad, m = run_loss(lp, lp, t(1.0, -1.0), torch.zeros(2, 3), flags(0, 1), paper_config())
    assert loss == 0.0 and grad.abs().sum() == 0
    assert m["stream/on/tokens"] == 0.0 and m["stream/off/tokens"] == 0.0


def test_loss_input_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"loss_mask has shape \(2, 2\) but logprobs has \(2, 3\)"):
        dual_stream_loss(z, z, t(0, 0), torch.ones(2, 2), flags(0, 0), paper_config())
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); it must be \[B\] = \(2,\)"):
        dual_stream_loss(z, z, t(0, 0, 0), z, flags(0, 0), paper_config())
    with pytest.raises(TypeError, match="is_expert must be a bool tensor"):
        dual_stream_loss(z, z, t(0, 0), z, ids(0, 0), paper_config())


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, m).item() == approx(1.5)
    assert masked_mean(x, m, dim=1).tolist() == approx([1.5, 0.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    with pytest.raises(ValueError, match="masked_mean: x has shape"):
        masked_mean(x, m[:, :2])


@pytest.mark.parametrize(("temperature", "chunk"), [(1.0, 1024), (0.7, 3), (1.3, 1)])
def test_sequence_logprobs_match_log_softmax_gather(temperature, chunk):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    target = torch.randint(0, 11, (2, 5))
    got = sequence_logprobs_from_logits(logits, target, temperature=temperature, chunk_size=chunk)
    want = torch.log_softmax(logits / temperature, dim=-1).gather(-1, target[..., None]).squeeze(-1)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_sequence_logprobs_on_a_shifted_non_contiguous_slice():
    torch.manual_seed(3)
    logits = torch.randn(3, 6, 10)
    tokens = torch.randint(0, 10, (3, 6))
    got = sequence_logprobs_from_logits(logits[:, :-1], tokens[:, 1:], chunk_size=2)
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, want)


def test_sequence_logprobs_padding_ids_give_zero_and_bf16_works():
    logits = torch.randn(1, 3, 7).bfloat16()
    lp = sequence_logprobs_from_logits(logits, torch.tensor([[2, -100, 6]]))
    assert lp.dtype == F and lp[0, 1].item() == 0.0 and lp[0, 0].item() < 0
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\] and target_ids \[B, T\] with the same B and T"):
        sequence_logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        sequence_logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long), temperature=0)


def test_entropy_from_logits():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 9)
    for temp, chunk in ((1.0, 1024), (0.5, 3)):
        p = torch.softmax(logits / temp, -1)
        want = -(p * torch.log(p)).sum(-1)
        torch.testing.assert_close(entropy_from_logits(logits, temperature=temp, chunk_size=chunk), want)
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == approx(math.log(8))


def test_sft_loss_from_logprobs_and_logits():
    lp = t(-1.0, -3.0, -50.0)[None]
    assert sft_loss(lp, t(1, 1, 0)[None]).item() == approx(2.0)
    assert sft_loss(lp, torch.zeros(1, 3)).item() == 0.0
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5)
    target = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F)
    want = masked_mean(-torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1), mask)
    torch.testing.assert_close(sft_loss(logits, mask, target_ids=target), want)
    with pytest.raises(ValueError, match="no target_ids"):
        sft_loss(logits, mask)
    with pytest.raises(ValueError, match="pass target_ids only with logits"):
        sft_loss(lp, mask, target_ids=target)


# ----------------------------------------------------------------------------------------------------------------
# Vectorised vs plain-loop references on random inputs (CleanRL style)
# ----------------------------------------------------------------------------------------------------------------


def ref_std(xs: list[float], unbiased: bool) -> float:
    n = len(xs)
    if n < 2 or len(set(xs)) == 1:
        return 0.0
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1 if unbiased else n))


def ref_advantages(rewards: list[float], groups: list[int], expert: list[bool], c: ObjectiveConfig) -> list[float]:
    def norm(x, pool, floor=0.0, flat_zero=True):
        if not pool:
            return 0.0
        if flat_zero and len(set(pool)) == 1:
            return 0.0
        centred = x - sum(pool) / len(pool)
        return centred / (max(ref_std(pool, c.std_unbiased), floor) + c.eps) if c.scale_by_std else centred

    out = []
    for i, (r, g, e) in enumerate(zip(rewards, groups, expert, strict=True)):
        same = [j for j in range(len(rewards)) if groups[j] == g]
        own = [rewards[j] for j in same if expert[j] == e]
        if c.advantage_mode == "joint":
            out.append(norm(r, [rewards[j] for j in same]))
        elif not e or c.advantage_mode == "per_stream":
            out.append(norm(r, own))
        elif c.advantage_mode == "on_baseline":
            on = [rewards[j] for j in same if not expert[j]]
            out.append(norm(r, on, c.sigma_floor, flat_zero=False))
        else:  # batch_floor
            out.append(norm(r, [rewards[j] for j in range(len(rewards)) if expert[j]], c.sigma_floor))
        assert i == len(out) - 1
    return out


def random_batch(rng: random.Random):
    rewards, groups, expert = [], [], []
    for g in rng.sample(range(100), 6):
        n_on, n_off = rng.choice([0, 1, 3, 8]), rng.choice([0, 1, 2, 6])
        flat = rng.random() < 0.3  # plenty of sigma = 0 groups
        for e in [False] * n_on + [True] * n_off:
            base = 0.7 if e else 0.3
            rewards.append(base if flat else rng.choice([0.0, 0.2, 0.3, 0.7, 0.9, 1.0, rng.random()]))
            groups.append(g)
            expert.append(e)
    order = list(range(len(rewards)))
    rng.shuffle(order)
    return [rewards[i] for i in order], [groups[i] for i in order], [expert[i] for i in order]


@pytest.mark.parametrize(
    ("mode", "unbiased", "scale"),
    list(itertools.product(["per_stream", "on_baseline", "batch_floor", "joint"], [True, False], [True, False])),
)
def test_advantages_match_plain_loop_reference(mode, unbiased, scale):
    cfg = paper_config(advantage_mode=mode, std_unbiased=unbiased, scale_by_std=scale)
    rng = random.Random(f"{mode}-{unbiased}-{scale}")  # str seeds are deterministic (not hash())
    for _ in range(5):
        r, g, e = random_batch(rng)
        adv, stats = compute_advantages(torch.tensor(r, dtype=torch.float64), ids(*g), torch.tensor(e), cfg)
        assert adv.tolist() == approx(ref_advantages(r, g, e, cfg), rel=1e-9, abs=1e-12)
        off_groups = {gg for gg, ee in zip(g, e, strict=True) if ee}
        flat_off = sum(
            1
            for gg in off_groups
            if ref_std([x for x, g2, e2 in zip(r, g, e, strict=True) if g2 == gg and e2], True) == 0
        )
        assert stats["stream/off/sigma_zero_groups"] == flat_off


def ref_loss(lp, old, adv, mask, expert, c: ObjectiveConfig, ref=None, ent=None):
    """Token by token, row by row, with torch scalars so autograd gives the reference gradient too."""
    lo, hi = 1 - c.clip_eps, 1 + c.clip_high
    rows, all_tokens = [], []
    for i in range(lp.shape[0]):
        toks = []
        for j in range(lp.shape[1]):
            if mask[i, j] == 0:
                continue
            a = float(adv[i])
            if expert[i]:
                w = torch.exp(lp[i, j])
                if c.off_policy_shaping:
                    w = w / (w + c.shaping_gamma)
                if c.clip_off_policy:
                    wc = torch.clamp(w, lo, hi)
                    term = -torch.min(w * a, wc * a)
                else:
                    term = -w * a
            else:
                r = torch.exp(lp[i, j] - old[i, j])
                term = -torch.min(r * a, torch.clamp(r, lo, hi) * a)
            if c.kl_coef:
                d = ref[i, j] - lp[i, j]
                term = term + c.kl_coef * (torch.exp(d) - d - 1)
            if c.entropy_coef:
                term = term - c.entropy_coef * ent[i, j]
            toks.append(term)
        if toks:
            rows.append(sum(toks) / len(toks))
            all_tokens.extend(toks)
    if not all_tokens:
        return lp.sum() * 0
    if c.aggregation == "token_mean":
        return sum(all_tokens) / len(all_tokens)
    return sum(rows) / len(rows)


@pytest.mark.parametrize(
    ("agg", "shaping", "clip_off", "clip_high", "kl", "ent"),
    [
        ("seq_mean_token_mean", False, False, None, 0.0, 0.0),
        ("token_mean", False, False, None, 0.0, 0.0),
        ("seq_mean_token_mean", True, False, 0.28, 0.05, 0.01),
        ("token_mean", True, True, None, 0.05, 0.0),
        ("seq_mean_token_mean", False, True, 0.28, 0.0, 0.01),
    ],
)
def test_loss_matches_plain_loop_reference(agg, shaping, clip_off, clip_high, kl, ent):
    cfg = paper_config(
        aggregation=agg,
        off_policy_shaping=shaping,
        clip_off_policy=clip_off,
        clip_eps_high=clip_high,
        kl_coef=kl,
        entropy_coef=ent,
    )
    gen = torch.Generator().manual_seed(7)
    b, n = 7, 6
    lp = torch.log(torch.rand(b, n, generator=gen).clamp(min=1e-3))
    old = lp + 0.4 * torch.randn(b, n, generator=gen)  # ratios spread across the clip range
    ref = lp + 0.3 * torch.randn(b, n, generator=gen)
    entropy = torch.rand(b, n, generator=gen) * 3
    adv = torch.randn(b, generator=gen)
    lengths = torch.tensor([6, 1, 0, 4, 2, 6, 3])  # unequal, one empty row
    mask = (torch.arange(n)[None] < lengths[:, None]).float()
    expert = flags(0, 1, 0, 1, 0, 1, 1)

    lp1 = lp.clone().requires_grad_(True)
    loss, _ = dual_stream_loss(lp1, old, adv, mask, expert, cfg, ref_logprobs=ref, entropy=entropy)
    loss.backward()
    lp2 = lp.clone().requires_grad_(True)
    want = ref_loss(lp2, old, adv, mask, expert, cfg, ref=ref, ent=entropy)
    want.backward()
    assert loss.item() == approx(want.item(), rel=1e-5)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-5, atol=1e-7)
