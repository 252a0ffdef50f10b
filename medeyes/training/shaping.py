"""Training-time reward shaping and row filtering: options that keep tools alive (all off in the paper).

:func:`shaped_rewards` adds Pixel Reasoner's curiosity bonus (:func:`curiosity_bonus`) to on-policy rewards;
:func:`loss_rows` leaves out groups whose on-policy rewards are all equal (DAPO, :func:`flat_groups`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from medeyes.training.advantages import check_advantage_inputs, segment_stats
from medeyes.training.stage_config import GRPOConfig


def curiosity_bonus(
    used_tool: Tensor,
    group_ids: Tensor,
    coef: float,
    threshold: float,
    scope: Literal["group", "batch"] = "group",
) -> Tensor:
    """Pixel Reasoner's curiosity bonus: ``coef * max(threshold - rate, 0)`` for each row that used a tool.

    ``rate`` is the share of rows that used a tool in the row's own group (``scope="group"``: Pixel Reasoner's
    rate of pixel-space reasoning of the prompt) or in the whole batch (``"batch"``). Rows without a tool call
    get 0, and so does every row once the rate reaches ``threshold``. Meant for on-policy rows only: pass
    their slice of the batch.

    >>> used = torch.tensor([True, False, False, False, True, True])
    >>> groups = torch.tensor([0, 0, 0, 0, 1, 1])
    >>> [round(x, 4) for x in curiosity_bonus(used, groups, coef=0.5, threshold=0.3).tolist()]  # rates 1/4, 1
    [0.025, 0.0, 0.0, 0.0, 0.0, 0.0]
    >>> [round(x, 4) for x in curiosity_bonus(used, groups, 1.0, 0.6, scope="batch").tolist()]  # rate 1/2
    [0.1, 0.0, 0.0, 0.0, 0.1, 0.1]

    Args:
        used_tool: ``[N]`` bool, the row's episode executed a scan or drill.
        group_ids: ``[N]`` long, the prompt each row answers.
        coef: ``alpha`` (>= 0), the bonus when no other row of the set used a tool and ``threshold = 1``.
        threshold: ``H`` in [0, 1], the tool rate below which tool use is paid.
        scope: Which rows the rate is taken over.

    Returns:
        ``[N]`` float32 bonus.

    """
    if used_tool.dim() != 1 or group_ids.shape != used_tool.shape:
        raise ValueError(
            f"used_tool and group_ids must both be [N], got {tuple(used_tool.shape)} and {tuple(group_ids.shape)}."
        )
    if used_tool.dtype != torch.bool or group_ids.dtype != torch.long:
        raise TypeError(f"used_tool must be bool and group_ids long, got {used_tool.dtype} and {group_ids.dtype}.")
    if not (coef >= 0.0 and 0.0 <= threshold <= 1.0):
        raise ValueError(f"curiosity_bonus needs coef >= 0 and 0 <= threshold <= 1, got coef={coef}, {threshold=}.")
    if scope not in ("group", "batch"):
        raise ValueError(f"scope must be 'group' or 'batch', got {scope!r}.")
    used = used_tool.detach().cpu().double()  # [N]
    if used.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=used_tool.device)
    if scope == "batch":
        rate = used.mean().expand_as(used)  # [N]
    else:
        _, g = torch.unique(group_ids.detach().cpu(), return_inverse=True)  # [N] dense group index
        _, mean, _, _ = segment_stats(used, g, int(g.max().item()) + 1, unbiased=False)  # [G] each
        rate = mean[g]  # [N]
    bonus = coef * (threshold - rate).clamp(min=0.0) * used  # [N]
    return bonus.to(device=used_tool.device, dtype=torch.float32)


def flat_groups(rewards: Tensor, group_ids: Tensor, is_expert: Tensor) -> Tensor:
    """``[B]`` bool: rows (of both streams) whose group's on-policy rewards are all equal.

    DAPO's dynamic-sampling test: such a group's on-policy advantages are all exactly 0
    (:func:`compute_advantages`), so its on-policy rows only dilute the loss. A group with a single
    on-policy row counts as flat; a group with no on-policy row is never flat.

    >>> rewards = torch.tensor([1.0, 1.0, 0.9, 0.0, 1.0, 0.5])
    >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
    >>> expert = torch.tensor([False, False, True, False, False, True])
    >>> flat_groups(rewards, groups, expert).tolist()
    [True, True, True, False, False, False]
    """
    check_advantage_inputs(rewards, group_ids, is_expert)
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    _, g = torch.unique(group_ids.detach().cpu(), return_inverse=True)  # [B] dense group index in [0, G)
    on = ~is_expert.detach().cpu()  # [B]
    r = rewards.detach().to(device="cpu", dtype=torch.float64)  # [B]
    count, _, _, flat = segment_stats(r[on], g[on], int(g.max().item()) + 1, unbiased=True)  # [G] each
    return (flat & (count > 0))[g].to(rewards.device)


def shaped_rewards(
    rewards: torch.Tensor,
    used_tool: torch.Tensor,
    groups: torch.Tensor,
    is_expert: torch.Tensor,
    grpo: GRPOConfig,
    metrics: dict[str, float],
) -> torch.Tensor:
    """The rewards advantages see: the environment's, plus the curiosity bonus on on-policy rows (all ``[B]``)."""
    if grpo.curiosity_coef == 0.0:
        return rewards
    on = ~is_expert  # [B]
    bonus = curiosity_bonus(
        used_tool[on], groups[on], grpo.curiosity_coef, grpo.curiosity_threshold, grpo.curiosity_scope
    )  # [B_on]
    metrics["stream/on/curiosity_bonus"] = float(bonus.mean()) if bonus.numel() else 0.0
    shaped = rewards.clone()
    shaped[on] += bonus
    return shaped


def loss_rows(
    rewards: torch.Tensor, groups: torch.Tensor, is_expert: torch.Tensor, skip: str, metrics: dict[str, float]
) -> list[int]:
    """Rows that enter the loss: all, or without the groups whose on-policy rewards are all equal (DAPO)."""
    drop = torch.zeros_like(is_expert)  # [B]
    if skip != "off":
        flat = flat_groups(rewards, groups, is_expert)  # [B]
        drop = flat & ~is_expert if skip == "on_rows" else flat
        metrics["stream/on/skipped_groups"] = float(torch.unique(groups[flat]).numel())
    rows = [i for i in range(len(rewards)) if not drop[i]]
    metrics["train/loss_rows"] = float(len(rows))
    return rows
