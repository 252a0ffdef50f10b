"""The ``grpo`` stage: on-policy or dual-stream GRPO, one step read top to bottom.

One optimizer step::

    collect     G_on on-policy episodes per case through MedEyesEnv (the one rollout driver), plus G_off
                expert trajectories per case from the trajectory store (dual mode)
    tokenise    each episode with the model's chat template; loss mask = the generated token spans
    score       rewards from the environment (plus the optional curiosity bonus); advantages per stream
                and group; the rows that enter the loss (all, or without flat groups)
    old logp    recorded at generation, or recomputed before the update (``grpo.old_logprobs``)
    update      dual_stream_loss over ``grpo.grad_accum`` micro-batches, backward, clipped AdamW step
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from medeyes.models.episodes import EpisodeTensors, tokenize_record
from medeyes.rollout import RolloutConfig, preloaded_cases, run_rollout
from medeyes.training.advantages import compute_advantages
from medeyes.training.expert_data import ExpertPool
from medeyes.training.logprobs import recompute_old_logprobs
from medeyes.training.metrics import episode_health, tool_collapse_alarm, weighted_mean_metrics
from medeyes.training.mismatch import behaviour_logprobs
from medeyes.training.objective import dual_stream_loss, masked_mean
from medeyes.training.objective_config import ObjectiveConfig
from medeyes.training.rollout_engine import RolloutEngine
from medeyes.training.schedule import GRPO_EXPERT_SALT, GRPO_ROLLOUT_SALT, GRPO_SAMPLING_SALT, step_seed
from medeyes.training.shaping import loss_rows, shaped_rewards
from medeyes.training.stage_config import GRPOConfig
from medeyes.training.stages._step import Learner, seed_sampling, step_metrics
from medeyes.trajectories import MemoryStore, TrajectoryRecord, TrajectoryStore
from medeyes_env.cases import Case
from medeyes_env.env import EnvConfig
from medeyes_env.render_ahead import RenderAhead
from medeyes_env.sources import CaseSource


@dataclass
class RolloutSetting:
    """Where a step's on-policy episodes come from: the split, the environment, how many play together."""

    source: CaseSource
    split: str
    env: EnvConfig
    batch_size: int
    pool_cases: int
    """Training cases the steps cycle over, ``grpo.prompts_per_step`` at a time."""


class GRPOStage:
    """One GRPO step: collect, tokenise, score, advantages, update (module docstring)."""

    def __init__(
        self,
        config: GRPOConfig,
        objective: ObjectiveConfig,
        seed: int,
        first_step: int,
        rollouts: RolloutSetting,
        engine: RolloutEngine,
        experts: ExpertPool | None,
        learner: Learner,
    ) -> None:
        """``seed``: the run's; ``first_step``: the global step this stage starts at; ``engine``: who generates."""
        self.config = config
        self.objective = objective
        self.seed = seed
        self.first_step = first_step
        self.rollouts = rollouts
        self.engine = engine
        self.experts = experts
        self.learner = learner
        self.tool_alarm_shown = False
        self.next_cases: RenderAhead[dict[int, Case]] = RenderAhead()

    def step(self, step: int) -> dict[str, float]:
        """One GRPO step (module docstring); returns its metrics."""
        learner = self.learner
        metrics: dict[str, float] = {}
        # collect: both streams' episodes of this step's cases
        collected = self.collect(step, metrics)
        # tokenise: the chat template; the loss mask is the generated spans
        episodes = tokenise(collected, learner.processor, self.experts.store if self.experts else None, metrics)
        # score: rewards, advantages per stream and group, the rows that enter the loss
        advantages, rows = score(collected, episodes, self.config, self.objective, metrics)
        self.tool_alarm_shown = tool_collapse_alarm(step, metrics, self.config.tool_floor, self.tool_alarm_shown)
        # old log-probs: recorded at generation, or recomputed before the update
        if self.config.old_logprobs == "recompute":
            learner.model.eval()
            with learner.autocast():
                recompute_old_logprobs(learner.model, episodes, learner.pad_id, self.config.grad_accum, learner.device)
        # update: the dual-stream loss over micro-batches, one optimizer step
        self.update(step, episodes, advantages, rows, metrics)
        return metrics

    def collect(self, step: int, metrics: dict[str, float]) -> Collected:
        """On-policy episodes (G_on per case) and, in dual mode, expert trajectories (G_off per case)."""
        g, setting, learner = self.config, self.rollouts, self.learner
        rng = np.random.default_rng(step_seed(self.seed, step, GRPO_EXPERT_SALT))
        blocks = max(1, setting.pool_cases // g.prompts_per_step)
        start = ((step - self.first_step) % blocks) * g.prompts_per_step
        loaded = self.next_cases.take(start) or {}  # this step's cases, loaded while the last step's update ran
        metrics.update(self.engine.prepare(learner.model, step))  # vLLM: the weights of the last optimizer step
        t0 = time.perf_counter()
        store = MemoryStore()
        learner.model.eval()
        policy = self.engine.policy
        seed_sampling(policy, step_seed(self.seed, step, GRPO_SAMPLING_SALT))
        rollout = RolloutConfig(
            split=setting.split,
            n=g.prompts_per_step,
            start=start,
            samples_per_case=g.group_on,
            batch_size=setting.batch_size,
            seed=step_seed(self.seed, step, GRPO_ROLLOUT_SALT),
            env=setting.env,
        )
        with learner.autocast():
            result = run_rollout(
                policy,
                setting.source,
                rollout,
                store=store,
                reset_options=lambda i: {"case": loaded[i]} if i in loaded else {},
            )
        self.engine.release()
        # the next step's cases load in the background while this step is scored and its update runs
        upcoming = ((step + 1 - self.first_step) % blocks) * g.prompts_per_step
        cases_ahead = range(upcoming, upcoming + g.prompts_per_step)
        self.next_cases.submit(upcoming, partial(preloaded_cases, setting.source, setting.split, cases_ahead))
        on_records = sorted(result.records, key=lambda r: (r.case_id, r.sample_index))
        cases = range(start, start + g.prompts_per_step)
        case_index = {setting.source.case(setting.split, i).id: i for i in cases}  # type: ignore[arg-type]
        off_records: list[TrajectoryRecord] = []
        if g.mode == "dual" and self.experts is not None:
            for i in cases:
                off_records += self.experts.for_case(i, g.group_off, rng)
        metrics["train/rollout_seconds"] = time.perf_counter() - t0
        return Collected(on_records, off_records, store, case_index)

    def update(
        self,
        step: int,
        episodes: list[EpisodeTensors],
        advantages: torch.Tensor,
        rows: list[int],
        metrics: dict[str, float],
    ) -> None:
        """The dual-stream loss over micro-batches of ``rows`` (gradient accumulation), then one optimizer step."""
        learner, objective = self.learner, self.objective
        learner.model.train()
        lr = learner.optim.set_lr("grpo", step)
        t0 = time.perf_counter()
        loss_metrics: list[tuple[int, dict[str, float]]] = []
        streams = StreamStats()

        def dual_stream(chunk: list[int], batch: Any, logprobs: torch.Tensor, entropy: Any) -> torch.Tensor:
            adv = advantages[chunk].to(learner.device)  # [b]
            mask = batch.loss_mask[:, 1:]  # [b, T-1]
            old = batch.old_logprobs[:, 1:]  # [b, T-1]
            # TIS (objective.tis_cap): the engine's log-probs vs the trainer's recomputation
            behaviour = behaviour_logprobs([episodes[i] for i in chunk], old) if objective.tis_cap is not None else None
            loss, lm = dual_stream_loss(
                logprobs, old, adv, mask, batch.is_expert, objective, behaviour_logprobs=behaviour
            )
            loss_metrics.append((len(chunk), lm))
            streams.add(logprobs, old, entropy, mask, batch.is_expert)
            return loss * len(chunk) / len(rows)

        _, tokens = learner.accumulate(episodes, rows, self.config.grad_accum, dual_stream, with_entropy=True)
        grad_norm = learner.optim.step("grpo")
        seconds = time.perf_counter() - t0
        metrics.update(weighted_mean_metrics(loss_metrics))
        metrics.update(streams.metrics())
        metrics.update(step_metrics(metrics.get("loss/total", 0.0), lr, grad_norm, tokens, seconds))
        metrics["train/update_seconds"] = seconds
        metrics["train/retokenized_on_turns"] = float(sum(e.retokenized_turns for e in episodes if not e.is_expert))


# ================================================================================================ the batch


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
    collected: Collected,
    episodes: list[EpisodeTensors],
    grpo: GRPOConfig,
    objective: ObjectiveConfig,
    metrics: dict[str, float],
) -> tuple[torch.Tensor, list[int]]:
    """Advantages ``[B]`` and the rows that enter the loss (all, or without flat groups: DAPO).

    Rewards are the environment's (plus the optional curiosity bonus); statistics per stream and group.
    """
    records = collected.on_records + collected.off_records
    rewards = torch.tensor([r.reward for r in records], dtype=torch.float32)  # [B]
    groups = torch.tensor([collected.case_index.get(r.case_id, -1) for r in records], dtype=torch.long)  # [B]
    is_expert = torch.tensor([e.is_expert for e in episodes], dtype=torch.bool)  # [B]
    used_tool = torch.tensor([r.tool_steps > 0 for r in records], dtype=torch.bool)  # [B]
    rewards = shaped_rewards(rewards, used_tool, groups, is_expert, grpo, metrics)
    advantages, adv_stats = compute_advantages(rewards, groups, is_expert, objective)
    metrics.update(adv_stats)
    metrics.update(episode_health(collected.on_records, "stream/on/"))
    metrics.update(episode_health(collected.off_records, "stream/off/"))
    rows = loss_rows(rewards, groups, is_expert, grpo.skip_flat_groups, metrics)
    return advantages, rows


class StreamStats:
    """Per-stream entropy and the on-policy log-prob gap, averaged over a step's micro-batches."""

    def __init__(self) -> None:
        """Nothing seen yet."""
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
