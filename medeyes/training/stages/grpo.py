"""One GRPO step's batch between collection and the update: what was collected, its tokens, its scores.

The trainer's ``grpo_step`` reads collect -> :func:`tokenise` -> :func:`score` -> update; this module holds the
middle two (no model, no optimizer) and :class:`StreamStats`, the per-stream numbers the update averages over its
micro-batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from medeyes.memory_store import MemoryStore
from medeyes.models.episodes import EpisodeTensors, tokenize_record
from medeyes.training.advantages import compute_advantages
from medeyes.training.config import TrainConfig
from medeyes.training.metrics import episode_health
from medeyes.training.objective import masked_mean
from medeyes.training.shaping import loss_rows, shaped_rewards
from medeyes.trajectories import TrajectoryRecord, TrajectoryStore


@dataclass
class Collected:
    """What one GRPO step collected: both streams' records, and where their images are."""

    on_records: list[TrajectoryRecord]
    off_records: list[TrajectoryRecord]
    store: MemoryStore
    """The on-policy rollouts' images (expert images are in the expert pool's store)."""
    case_index: dict[str, int]
    """Case id -> the case's index in the training split: the GRPO group of a row."""


def tokenise(
    collected: Collected, processor: Any, expert_store: TrajectoryStore | None, metrics: dict[str, float]
) -> list[EpisodeTensors]:
    """One function for both streams; the loss mask is the generated spans. On-policy rows come first."""
    t1 = time.perf_counter()
    episodes: list[EpisodeTensors] = []
    segments: dict = {}  # the G rollouts of a case share their first segment: encode it once
    for r in collected.on_records:
        episodes.append(tokenize_record(r, collected.store, processor, is_expert=False, cache=segments))
    if collected.off_records:
        if expert_store is None:
            raise ValueError("tokenise got expert records but no expert_store to read their images from.")
        for r in collected.off_records:
            episodes.append(tokenize_record(r, expert_store, processor, is_expert=True))
    metrics["train/prep_seconds"] = time.perf_counter() - t1
    return episodes


def score(
    collected: Collected, episodes: list[EpisodeTensors], config: TrainConfig, metrics: dict[str, float]
) -> tuple[torch.Tensor, list[int]]:
    """Advantages ``[B]`` and the rows that enter the loss (all, or without flat groups: DAPO).

    Rewards are the environment's (plus the optional curiosity bonus); statistics per stream and group.
    """
    g = config.grpo
    records = collected.on_records + collected.off_records
    rewards = torch.tensor([r.reward for r in records], dtype=torch.float32)  # [B]
    groups = torch.tensor([collected.case_index.get(r.case_id, -1) for r in records], dtype=torch.long)  # [B]
    is_expert = torch.tensor([e.is_expert for e in episodes], dtype=torch.bool)  # [B]
    used_tool = torch.tensor([r.tool_steps > 0 for r in records], dtype=torch.bool)  # [B]
    rewards = shaped_rewards(rewards, used_tool, groups, is_expert, g, metrics)
    advantages, adv_stats = compute_advantages(rewards, groups, is_expert, config.objective)
    metrics.update(adv_stats)
    metrics.update(episode_health(collected.on_records, "stream/on/"))
    metrics.update(episode_health(collected.off_records, "stream/off/"))
    rows = loss_rows(rewards, groups, is_expert, g.skip_flat_groups, metrics)
    return advantages, rows


class StreamStats:
    """Per-stream entropy and the on-policy log-prob gap, averaged over a step's micro-batches."""

    def __init__(self) -> None:
        self.entropies: dict[str, list[float]] = {"on": [], "off": []}
        self.gaps: list[float] = []

    @torch.no_grad()
    def add(
        self,
        logprobs: torch.Tensor,
        old: torch.Tensor,
        entropy: torch.Tensor | None,
        mask: torch.Tensor,
        is_expert: torch.Tensor,
    ) -> None:
        """One micro-batch: ``logprobs``, ``old``, ``entropy`` and ``mask`` are ``[b, T-1]``, ``is_expert`` ``[b]``."""
        for name, rows_mask in (("on", ~is_expert), ("off", is_expert)):
            m = mask & rows_mask[:, None]
            if entropy is not None and m.any():
                self.entropies[name].append(float(masked_mean(entropy, m)))
        on_mask = mask & ~is_expert[:, None]
        if on_mask.any():
            self.gaps.append(float(masked_mean((logprobs.detach() - old).abs(), on_mask)))

    def metrics(self) -> dict[str, float]:
        """``stream/{on,off}/entropy`` and ``stream/on/logprob_gap``, each only when it had data."""
        out = {f"stream/{name}/entropy": sum(v) / len(v) for name, v in self.entropies.items() if v}
        if self.gaps:
            out["stream/on/logprob_gap"] = sum(self.gaps) / len(self.gaps)
        return out
