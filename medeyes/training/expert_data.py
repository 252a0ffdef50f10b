"""The expert stream's data: GRN + CVS demonstrations made once per configuration, indexed by training case.

:func:`ensure_expert_trajectories` fills a trajectory store the first time a configuration needs it (keyed by
everything that shapes the demonstrations); :class:`ExpertPool` serves its records to the ``sft`` stage and to
the off-policy stream of ``grpo``; :func:`brief_record` rewrites a demonstration's reasoning to the short
form the ``ground`` stage teaches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.rollout_summary import summarize
from medeyes.training.config import TrainConfig
from medeyes.training.data_config import OLD_EXPERT_KEYS, ExpertAgentConfig
from medeyes.training.stages.ground_examples import BRIEF_REASONING
from medeyes.trajectories import TrajectoryRecord, TrajectoryStore
from medeyes_env.errors import ConfigError
from medeyes_env.protocol import BoxFormat, render_turn
from medeyes_env.sources import CaseSource

EXPERT_CACHE_VERSION = 2
"""Bumped when the same configuration would record other demonstrations or other values in them.

2: gold regions carry shapes, so the recorded rewards and best IoU score a drill against a lesion's disc; a
cache made before kept box-scored values, which the trainer logs (``stream/off/*``)."""


def expert_store_dir(config: TrainConfig) -> Path:
    """Where the expert demos of ``config`` live: ``expert.dir`` or a cache keyed by everything that shapes them."""
    if config.expert.dir is not None:
        return config.expert.dir
    from medeyes.models.factory import cache_dir

    key = {
        "data": config.data,
        "data_options": config.data_options.model_dump(mode="json"),
        "split": config.train_split,
        "env": config.env.model_dump(mode="json"),
        "expert": _expert_key(config),
        "version": EXPERT_CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() else "-" for ch in config.data)
    return cache_dir() / "expert" / f"{safe}-{config.expert.agent.mode}-{digest}"


def _expert_key(config: TrainConfig) -> dict[str, Any]:
    """The expert settings that shape the demos, spelled as before ``expert.agent`` so existing caches still match.

    Agent fields the flat config did not have enter the key only when they differ from their default.
    """
    expert, agent = config.expert, config.expert.agent
    options = expert.oracle_options.model_dump(mode="json")
    key: dict[str, Any] = {"cases": expert.cases, "oracle": expert.oracle, "oracle_options": options}
    key.update({old: getattr(agent, new) for old, new in OLD_EXPERT_KEYS.items()})
    dumped = agent.model_dump(mode="json")
    defaults = ExpertAgentConfig().model_dump(mode="json")
    others = {k: v for k, v in dumped.items() if k not in OLD_EXPERT_KEYS.values() and v != defaults[k]}
    if others:
        key["agent"] = others
    return key


def ensure_expert_trajectories(config: TrainConfig, source: CaseSource) -> TrajectoryStore:
    """Open the expert store; when empty and allowed, run the expert agent (GRN + CVS) to fill it."""
    from filelock import FileLock

    from medeyes.agents.expert.agent import ExpertAgent
    from medeyes.agents.expert.config import ExpertConfig
    from medeyes.agents.expert.oracles.factory import make_oracle

    root = expert_store_dir(config)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        store = TrajectoryStore(root)
        done = root / "complete.json"
        if done.exists():
            return store
        if not config.expert.generate_if_absent:
            raise ConfigError(
                f"no expert trajectories in {root}; run `medeyes expert` or set expert.generate_if_absent=true"
            )
        agent_config = ExpertConfig(**config.expert.agent.model_dump(), t_max=max(1, config.env.max_steps))
        oracle = make_oracle(config.expert.oracle, **config.expert.oracle_options.model_dump())
        agent = ExpertAgent(oracle, agent_config)
        rollout = RolloutConfig(
            split=config.train_split,
            n=config.expert.cases,
            samples_per_case=agent.samples_per_case,
            batch_size=64,
            seed=agent_config.seed,
            keep_only_correct=agent_config.keep_only_correct,
            env=config.env,
        )
        result = run_rollout(agent, source, rollout, store=store)
        summary = summarize(result.records, result.seconds)
        done.write_text(json.dumps(summary.model_dump(), indent=2))
    return store


def brief_record(record: TrajectoryRecord, box_format: BoxFormat | None = None) -> TrajectoryRecord:
    """The same trajectory with every turn re-rendered with :data:`BRIEF_REASONING` (actions and boxes unchanged).

    Only well-formed turns are rewritten (the expert's always are); the rewards stay those of the original run,
    which the rewrite does not change (grammar needs a non-empty reasoning; diversity and accuracy read actions).
    """
    steps = []
    for step in record.steps:
        if step.action is not None and step.well_formed:
            text = render_turn(step.action, BRIEF_REASONING[step.action.name], box_format, record.image_size)
            step = step.model_copy(update={"text": text, "reasoning": BRIEF_REASONING[step.action.name]})
        steps.append(step)
    return record.model_copy(update={"steps": steps})


class ExpertPool:
    """Expert trajectories of the training cases, indexed by case index, with their store for images."""

    def __init__(
        self,
        store: TrajectoryStore,
        source: CaseSource,
        split: str,
        n_cases: int,
        reasoning: str = "full",
        box_format: BoxFormat | None = None,
    ):
        """Index ``store``'s kept records by the position of their case among the first ``n_cases`` cases."""
        self.store = store
        index_of = {source.case(split, i).id: i for i in range(n_cases)}  # type: ignore[arg-type]
        self.by_case: dict[int, list[TrajectoryRecord]] = {}
        for record in store.records():
            if record.kept and record.case_id in index_of and record.steps:
                if reasoning == "brief":
                    record = brief_record(record, box_format)
                self.by_case.setdefault(index_of[record.case_id], []).append(record)
        self.records = [r for i in sorted(self.by_case) for r in self.by_case[i]]
        if not self.records:
            raise ConfigError(f"the expert store {store.root} holds no usable trajectory for the training cases")

    def sample(self, n: int, rng: np.random.Generator) -> list[TrajectoryRecord]:
        """``n`` records drawn uniformly (with replacement) from the whole pool."""
        return [self.records[i] for i in rng.integers(0, len(self.records), size=n)]

    def for_case(self, case_index: int, n: int, rng: np.random.Generator) -> list[TrajectoryRecord]:
        """Up to ``n`` distinct records of one case (fewer when fewer were kept)."""
        records = self.by_case.get(case_index, [])
        if len(records) <= n:
            return list(records)
        return [records[i] for i in rng.choice(len(records), size=n, replace=False)]
