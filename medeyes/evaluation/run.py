"""Run one agent over benchmark datasets, one episode per case, resumable through the trajectory store.

:func:`evaluate` drives :func:`medeyes.rollout.run_rollout` (the same episodes ``medeyes rollout`` plays)
once per dataset and tools setting. With a store, every finished episode is appended as it completes; a
rerun after an interrupt skips the cases already stored and scores stored and new episodes together, so no
case is scored twice or lost. Failed episodes (agent or server errors) are scored as wrong and not stored,
so the next run retries them.

Each dataset and tools setting has its own store, ``OUT/tools_on|tools_off/<data spec>``, whose ``run.json``
records the agent and the :class:`~medeyes.trajectories.settings.EpisodeSettings` (data spec, dataset digest,
environment, scoring): a rerun with other settings is refused, naming the field. A stored episode is read
back only after :func:`verify_record` found its case and its reward components to be what this run computes.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.base import Agent
from medeyes.evaluation.scores import DatasetScores, score_records
from medeyes.rollout import RolloutConfig, producer_of, run_rollout, trajectory_id
from medeyes.trajectories import RECORDS_FILE, TrajectoryRecord, TrajectoryStore
from medeyes.trajectories.settings import EpisodeSettings, episode_settings
from medeyes_env.cases import Case, Split
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError, RecordError, StoreMismatchError
from medeyes_env.rewards import score_episode
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


class Dataset(NamedTuple):
    """One dataset to score: its label in the table, its spec (what its store is named and checked by), its cases."""

    label: str
    spec: str
    source: CaseSource


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


def store_dir(out: Path, spec: str, tools: bool) -> Path:
    """``out/tools_on|tools_off/<spec>``: the store of one dataset and tools setting.

    The spec becomes a folder name (letters, digits, ``.``, ``_``, ``-``), with a hash of the spec whenever
    it had to be changed, so two specs never share a folder.

    >>> str(store_dir(Path("out"), "phantom", True)), str(store_dir(Path("out"), "slake_hf:/data/SLAKE", False))
    ('out/tools_on/phantom', 'out/tools_off/slake_hf-data-SLAKE-91c3f775')
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.")[:80]
    if name != spec:
        name = f"{name}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    return out / ("tools_on" if tools else "tools_off") / name


def run_settings(dataset: Dataset, config: EvalConfig, env: EnvConfig, tools: bool) -> EpisodeSettings:
    """What defines this run's episodes of ``dataset``: a store of other settings is refused.

    ``env`` is the environment as played (tools off: ``max_steps=0``; open answers scored by exact match).
    An option that changes results joins as one more keyword here.
    """
    return episode_settings(dataset.spec, dataset.source, config.split, env, tools=tools)


def verify_record(record: TrajectoryRecord, case: Case, env: EnvConfig, where: str) -> None:
    """Refuse (:class:`RecordError` at ``where``) a stored episode that is not what this run would score.

    Its case's facts must be the case's, its tool turns within ``env.max_steps``, and every reward component
    what :func:`~medeyes_env.rewards.score_episode` gives for its stored answer and boxes.
    """
    facts = {
        "question": (record.question, case.question),
        "answer_type": (record.answer_type, case.answer_type.value),
        "options": (record.options, list(case.options)),
        "gold_answer": (record.gold_answer, case.answer),
        "gold_boxes": ([list(box) for box in record.gold_boxes], [list(region.box) for region in case.regions]),
    }
    fix = "the record was edited or the dataset changed; pass a new output directory"
    for name, (stored, now) in facts.items():
        if stored != now:
            raise RecordError(f"{where}: {name} is {stored!r} in the store, but case {case.id!r} has {now!r}; {fix}")
    if record.tool_steps > env.max_steps:
        raise RecordError(f"{where}: steps: {record.tool_steps} tool turns, more than max_steps={env.max_steps}; {fix}")
    drills = [b for s in record.steps if s.action is not None and s.shown_boxes and s.action.name == "drill"
              for b in s.action.boxes]  # fmt: skip
    formed = [step.well_formed for step in record.steps]
    score = score_episode(case, record.final_answer, formed, record.explored_boxes, env.rewards, drill_boxes=drills)
    for name, value in score.components.items():
        stored = record.reward_components.get(name)
        if stored is None or not math.isclose(stored, value, rel_tol=1e-9, abs_tol=1e-9):
            raise RecordError(
                f"{where}: reward_components.{name} is {stored} in the store, but the stored answer and boxes score "
                f"{value} on case {case.id!r}; {fix}"
            )


def _stored(store: TrajectoryStore, wanted: dict[str, Case], env: EnvConfig) -> list[TrajectoryRecord]:
    found: dict[str, TrajectoryRecord] = {}
    for where, record in store.located_records():
        case = wanted.get(record.trajectory_id)
        if case is not None and record.trajectory_id not in found:
            verify_record(record, case, env, where)
            found[record.trajectory_id] = record
    return list(found.values())


def played_env(config: EvalConfig, tools: bool) -> EnvConfig:
    """The environment an eval plays: tools off is ``max_steps=0``; open answers score exact match.

    Exact match whatever the training rewarded; recall is reported beside it.
    """
    rewards = config.env.rewards.model_copy(update={"open_match": "exact"})
    return config.env.model_copy(update={"rewards": rewards, **({} if tools else {"max_steps": 0})})


def open_store(out: Path, agent: Agent, dataset: Dataset, config: EvalConfig, tools: bool) -> TrajectoryStore:
    """The store of ``dataset`` under ``out`` (:func:`store_dir`); refused when it holds other settings or agent."""
    old = out / ("tools_on" if tools else "tools_off") / RECORDS_FILE
    if old.exists():
        raise StoreMismatchError(
            f"{old} was written by a MedEyes that kept every dataset in one store and recorded no settings, so its "
            "episodes cannot be matched to a dataset; pass a new output directory"
        )
    settings = run_settings(dataset, config, played_env(config, tools), tools)
    return TrajectoryStore(store_dir(out, dataset.spec, tools), producer=producer_of(agent), settings=settings)


def evaluate_source(
    agent: Agent,
    dataset: Dataset,
    config: EvalConfig,
    tools: bool,
    store: TrajectoryStore | None = None,
    listener: Listener | None = None,
) -> tuple[DatasetScores, int, int]:
    """Score ``agent`` on one dataset, resuming from ``store`` (:func:`open_store`); scores, episodes run, resumed."""
    label, source = dataset.label, dataset.source
    n = _cases(source, config)
    env = played_env(config, tools)
    rollout = RolloutConfig(
        split=config.split,
        n=n,
        samples_per_case=1,
        batch_size=config.parallel,
        seed=config.seed,
        store_images=config.store_images,
        env=env,
    )
    cases = [source.case(config.split, i) for i in range(n)]
    wanted = {trajectory_id(case.id, config.seed, 0): case for case in cases}
    resumed = _stored(store, wanted, env) if store is not None else []
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
    datasets: Sequence[Dataset],
    config: EvalConfig,
    out: Path | None = None,
    agent_label: str = "agent",
    listener: Listener | None = None,
) -> EvalReport:
    """Score ``agent`` on every dataset, for each tools setting; stores under ``out`` (see :func:`store_dir`).

    Every store is opened (and a store of other settings refused) before the first episode is played.
    """
    started = time.perf_counter()
    scores: list[DatasetScores] = []
    run = resumed = 0
    runs = [(tools, dataset) for tools in tools_settings(config.tools) for dataset in datasets]
    stores = [None if out is None else open_store(out, agent, dataset, config, tools) for tools, dataset in runs]
    for (tools, dataset), store in zip(runs, stores, strict=True):
        figures, played, back = evaluate_source(agent, dataset, config, tools, store, listener)
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
