"""Run one agent over benchmark datasets, one episode per case, resumable through the trajectory store.

:func:`evaluate` drives :func:`medeyes.rollout.run_rollout` (the same episodes ``medeyes rollout`` plays)
once per dataset and tools setting. With a store, every finished episode is appended as it completes; a
rerun after an interrupt skips the cases already stored and scores stored and new episodes together, so no
case is scored twice or lost. Failed episodes (agent or server errors) are scored as wrong and not stored,
so the next run retries them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.base import Agent
from medeyes.evaluation.scores import DatasetScores, score_records
from medeyes.rollout import RolloutConfig, producer_of, run_rollout, trajectory_id
from medeyes.trajectories import TrajectoryRecord, TrajectoryStore
from medeyes_env.cases import Split
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError
from medeyes_env.sources import CaseSource

DEFAULT_PROCEDURAL_LIMIT = 200
"""Cases taken from a procedural (infinite) source when no limit is given."""


class EvalConfig(BaseModel):
    """What ``medeyes eval`` runs: the split, how many cases, tools on/off, batching, where to store."""

    model_config = ConfigDict(extra="forbid")

    split: Split = Field(default="test", description="Split of every dataset to score.")
    limit: int | None = Field(
        default=None, ge=1, description="Cases per dataset (first N); None: the whole split (200 of a procedural one)."
    )
    tools: Literal["on", "off", "both"] = Field(
        default="on", description="on: scan and drill allowed; off: answer-only (max_steps=0); both: one run each."
    )
    parallel: int = Field(default=16, ge=1, description="Episodes in flight at once (requests to a server).")
    seed: int = Field(default=0, description="Run seed; every episode's seed derives from it.")
    store_images: bool = Field(default=False, description="Store observation images with the records.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="Environment settings (tools on).")


class EvalReport(BaseModel):
    """What ``medeyes eval --json`` writes: the agent, the setting, and the figures per dataset."""

    agent: str = Field(description="Agent label, e.g. 'policy (runs/look6/final)'.")
    split: str = Field(description="Split scored.")
    datasets: list[DatasetScores] = Field(description="One entry per dataset and tools setting.")
    seconds: float = Field(description="Wall-clock seconds of this invocation (episodes resumed cost nothing).")
    episodes_run: int = Field(description="Episodes played now.")
    episodes_resumed: int = Field(description="Episodes read back from the store instead of played.")


Listener = Callable[[str, TrajectoryRecord | None, int, int], None]
"""``listener(label, record, done, total)``: a record finished (``None``: the count changed)."""


def tools_settings(tools: str) -> list[bool]:
    """``on``/``off``/``both`` as the list of tools settings to run.

    >>> tools_settings("both")
    [True, False]
    """
    return {"on": [True], "off": [False], "both": [True, False]}[tools]


def _cases(source: CaseSource, config: EvalConfig) -> int:
    size = source.size(config.split)
    if size is None:
        return config.limit or DEFAULT_PROCEDURAL_LIMIT
    if size == 0:
        raise ConfigError(f"dataset {source.name!r} has no cases in split {config.split!r}; pick another --split")
    return min(size, config.limit) if config.limit else size


def _stored(store: TrajectoryStore, wanted: set[str]) -> list[TrajectoryRecord]:
    found: dict[str, TrajectoryRecord] = {}
    for record in store.records():
        if record.trajectory_id in wanted:
            found.setdefault(record.trajectory_id, record)
    return list(found.values())


def evaluate_source(
    agent: Agent,
    source: CaseSource,
    label: str,
    config: EvalConfig,
    tools: bool,
    store: TrajectoryStore | None = None,
    listener: Listener | None = None,
) -> tuple[DatasetScores, int, int]:
    """Score ``agent`` on one dataset; returns the scores, episodes run now and episodes resumed."""
    n = _cases(source, config)
    # Open answers score exact match here whatever the training rewarded; recall is reported beside it.
    rewards = config.env.rewards.model_copy(update={"open_match": "exact"})
    env = config.env.model_copy(update={"rewards": rewards, **({} if tools else {"max_steps": 0})})
    rollout = RolloutConfig(
        split=config.split,
        n=n,
        samples_per_case=1,
        batch_size=config.parallel,
        seed=config.seed,
        store_images=config.store_images,
        env=env,
    )
    wanted = {trajectory_id(source.case(config.split, i).id, config.seed, 0) for i in range(n)}
    resumed = _stored(store, wanted) if store is not None else []
    done = len(resumed)
    if listener is not None:
        for record in resumed:
            listener(label, record, 0, n)
        listener(label, None, done, n)

    def on_record(record: TrajectoryRecord) -> None:
        nonlocal done
        done += 1
        if listener is not None:
            listener(label, record, done, n)

    if done < n:
        result = run_rollout(agent, source, rollout, store=store, on_record=on_record)
        played = result.records
    else:
        played = []
    return score_records([*resumed, *played], label, tools, env.rewards.iou_threshold), len(played), len(resumed)


def evaluate(
    agent: Agent,
    sources: Sequence[tuple[str, CaseSource]],
    config: EvalConfig,
    out: Path | None = None,
    agent_label: str = "agent",
    listener: Listener | None = None,
) -> EvalReport:
    """Score ``agent`` on every ``(label, source)``, for each tools setting; stores under ``out/tools_on|off``."""
    started = time.perf_counter()
    scores: list[DatasetScores] = []
    run = resumed = 0
    for tools in tools_settings(config.tools):
        store = None
        if out is not None:
            store = TrajectoryStore(out / ("tools_on" if tools else "tools_off"), producer=producer_of(agent))
        for label, source in sources:
            figures, played, back = evaluate_source(agent, source, label, config, tools, store, listener)
            scores.append(figures)
            run, resumed = run + played, resumed + back
    return EvalReport(
        agent=agent_label,
        split=config.split,
        datasets=scores,
        seconds=time.perf_counter() - started,
        episodes_run=run,
        episodes_resumed=resumed,
    )
