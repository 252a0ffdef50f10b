"""The one rollout driver: run episodes of any :class:`~medeyes.agents.base.Agent` through ``MedEyesEnv``.

:func:`run_rollout` keeps up to ``batch_size`` live episodes, each in its own
:class:`~medeyes_env.env.MedEyesEnv`. Each round it hands the agent one
:class:`~medeyes.agents.base.EpisodeContext` per live episode (chat messages, case, image, explored boxes,
and a per-episode ``state`` pre-filled with ``seed`` and ``sample_index``), steps every environment with
the returned text, and turns each finished episode into a :class:`~medeyes.trajectories.TrajectoryRecord`
(token ids and log-probabilities of :class:`~medeyes.agents.base.TurnOutput` included when present).

The same driver serves the expert (``samples_per_case = n_expert``), the random baseline, the policy and
the trainer's on-policy stream. :func:`medeyes.rollout_summary.summarize` turns its records into the numbers the
CLI prints.

Determinism: episode ``(case_index, sample_index)`` of a run with seed ``s`` resets its environment with
a seed derived from ``(s, case_index, sample_index)``, whatever the batch size. Trajectory ids are
``{case_id}#s{seed}#{sample_index}``, so a resumed run skips exactly the episodes it already stored.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.base import Agent, EpisodeContext, TurnOutput
from medeyes.trajectories import Producer, RecordSink, StepRecord, Timings, TrajectoryRecord
from medeyes_env.cases import Case, Split
from medeyes_env.env import EnvConfig, MedEyesEnv
from medeyes_env.errors import ConfigError, MedEyesError
from medeyes_env.sources import CaseSource, open_source


class RolloutConfig(BaseModel):
    """Which episodes to run and how."""

    model_config = ConfigDict(extra="forbid")

    split: Split = Field(default="test", description="Split of the source to draw cases from.")
    n: int = Field(default=16, ge=1, description="Number of cases (each run samples_per_case times).")
    start: int = Field(default=0, ge=0, description="Index of the first case.")
    samples_per_case: int | None = Field(
        default=None, ge=1, description="Trajectories per case; None asks the agent (expert: n_expert), else 1."
    )
    batch_size: int = Field(default=16, ge=1, description="Live episodes per agent call.")
    seed: int = Field(default=0, description="Run seed; every episode's seed derives from it.")
    keep_only_correct: bool = Field(
        default=False, description="Store only episodes whose accuracy reward is 1 (all are still summarised)."
    )
    store_images: bool = Field(default=True, description="Store observation images when a store is given.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="Environment configuration.")


class RolloutResult(BaseModel):
    """Every episode run (kept or not), what was skipped on resume, and the wall time."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    records: list[TrajectoryRecord] = Field(description="Episodes run now, in completion order.")
    skipped: int = Field(default=0, description="Episodes already in the store (resume), not run again.")
    stored: int = Field(default=0, description="Records appended to the store.")
    seconds: float = Field(default=0.0, description="Wall-clock seconds of the run.")


def episode_seed(seed: int, case_index: int, sample_index: int) -> int:
    """The environment seed of one episode (independent of batching).

    >>> episode_seed(0, 3, 1) == episode_seed(0, 3, 1) != episode_seed(0, 3, 2)
    True
    """
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, case_index, sample_index]).generate_state(1)[0])


def trajectory_id(case_id: str, seed: int, sample_index: int) -> str:
    """The id of one episode of a run.

    >>> trajectory_id("phantom/test/00001", 0, 2)
    'phantom/test/00001#s0#2'
    """
    return f"{case_id}#s{seed}#{sample_index}"


def producer_of(agent: Agent) -> Producer:
    """A :class:`Producer` from ``agent.describe()`` (kind/name/oracle/checkpoint read when present)."""
    info = dict(agent.describe())
    kind = info.pop("kind", None)
    if kind not in ("expert", "policy", "random", "other"):
        kind = "policy" if "model" in info or "backend" in info else "other"
    name = str(info.pop("name", getattr(agent, "name", type(agent).__name__)))
    oracle = info.pop("oracle", None)
    checkpoint = info.pop("checkpoint", None)
    config = info.pop("config", None)
    if config is None:
        config = info
    elif info:
        config = {**config, **info}
    return Producer(
        kind=kind,
        name=name,
        oracle=str(oracle) if oracle is not None else None,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        config=_jsonable(config),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class _Live:
    env: MedEyesEnv
    context: EpisodeContext
    record: TrajectoryRecord
    started: float
    agent_seconds: float = 0.0
    env_seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    reward: float = 0.0
    """Sum of the rewards ``env.step`` returned: the one total (malformed-turn penalties included)."""


def preloaded_cases(source: CaseSource, split: Split, indices: Iterable[int]) -> dict[int, Case]:
    """Cases of ``split`` by index, their images loaded now; ``run_rollout``'s resets take them as ``{"case": ...}``.

    A trainer calls it in a background thread for its next step's cases while this step's update runs, so that
    rollout's resets do not render (the same image: each reset gets a copy of the one loaded here). A case
    whose image does not load is left out; its own reset loads it and raises there, with its own message.
    """
    loaded: dict[int, Case] = {}
    for index in indices:
        case = source.case(split, index)
        try:
            image = case.load_image()
        except (MedEyesError, OSError):
            continue
        loaded[index] = case.model_copy().with_image_factory(image.copy)
    return loaded


def run_rollout(
    agent: Agent,
    source: str | CaseSource = "phantom",
    config: RolloutConfig | None = None,
    store: RecordSink | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_record: Callable[[TrajectoryRecord], None] | None = None,
    reset_options: Callable[[int], dict[str, Any]] | None = None,
) -> RolloutResult:
    """Run ``config.n`` cases x ``samples_per_case`` episodes of ``agent``; append finished ones to ``store``.

    ``on_record`` sees each finished episode (stored or not) as it completes, e.g. for a running accuracy.
    ``reset_options(case_index)`` adds options to each episode's ``env.reset`` (e.g. ``drill_image``).
    """
    config = config or RolloutConfig()
    source = open_source(source) if isinstance(source, str) else source
    samples = config.samples_per_case or int(getattr(agent, "samples_per_case", 1) or 1)
    queue, skipped = _pending(source, config, samples, store)
    started = time.perf_counter()
    runner = _Runner(agent, source, config, store, len(queue), progress, on_record, reset_options)
    runner.run(queue)
    seconds = time.perf_counter() - started
    return RolloutResult(records=runner.finished, skipped=skipped, stored=runner.stored, seconds=seconds)


def _pending(
    source: CaseSource, config: RolloutConfig, samples: int, store: RecordSink | None
) -> tuple[deque[tuple[int, int, str]], int]:
    """The episodes to play, ``(case index, sample index, trajectory id)``, and how many the store already has."""
    size = source.size(config.split)
    stop = config.start + config.n if size is None else min(config.start + config.n, size)
    if stop <= config.start:
        raise ConfigError(
            f"source {source.name!r} has {size} case(s) in split {config.split!r}; start={config.start} leaves none"
        )
    queue: deque[tuple[int, int, str]] = deque()
    skipped = 0
    for case_index in range(config.start, stop):
        case_id = source.case(config.split, case_index).id
        for sample_index in range(samples):
            tid = trajectory_id(case_id, config.seed, sample_index)
            if store is not None and tid in store:
                skipped += 1
                continue
            queue.append((case_index, sample_index, tid))
    return queue, skipped


class _Runner:
    """Plays a queue of episodes ``batch_size`` at a time, one agent call per round for all live episodes."""

    def __init__(
        self,
        agent: Agent,
        source: CaseSource,
        config: RolloutConfig,
        store: RecordSink | None,
        total: int,
        progress: Callable[[int, int], None] | None,
        on_record: Callable[[TrajectoryRecord], None] | None,
        reset_options: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        self.agent, self.config, self.store, self.total = agent, config, store, total
        self.progress, self.on_record, self.reset_options = progress, on_record, reset_options
        self.producer = producer_of(agent)
        self.envs = [
            MedEyesEnv(source, split=config.split, config=config.env) for _ in range(min(config.batch_size, total))
        ]
        self.finished: list[TrajectoryRecord] = []
        self.stored = 0
        self.next_episode = 0

    def run(self, queue: deque[tuple[int, int, str]]) -> None:
        """Play every queued episode; a failed agent call finishes the live episodes with its error."""
        free = list(range(len(self.envs)))
        live: list[tuple[int, _Live]] = []
        while queue or live:
            while free and queue:
                slot = free.pop()
                live.append((slot, self.start(slot, *queue.popleft())))
            try:
                outputs, share = self.act([item for _, item in live])
            except (MedEyesError, OSError, TimeoutError) as exc:
                # A failed call is data (recorded with its type), not a crash; programming errors still raise.
                for slot, item in live:
                    self.finish(item, exc)
                    free.append(slot)
                live = []
                if len(self.finished) == self.total and all(r.error for r in self.finished):
                    raise
                continue
            still: list[tuple[int, _Live]] = []
            for (slot, item), output in zip(live, outputs, strict=True):
                item.agent_seconds += share
                if _step(item, output, share, self.store if self.config.store_images else None):
                    self.finish(item)
                    free.append(slot)
                else:
                    still.append((slot, item))
            live = still

    def act(self, live: list[_Live]) -> tuple[list[TurnOutput], float]:
        """The agent's next turn for every live episode, and the call's seconds per episode."""
        contexts = []
        for item in live:
            item.context.messages = item.env.chat_messages()
            item.context.step = len(item.env.turns)
            item.context.explored = list(item.env.explored_boxes)
            contexts.append(item.context)
        t0 = time.perf_counter()
        outputs = self.agent.act(contexts)
        if len(outputs) != len(contexts):
            raise ConfigError(f"agent {self.agent.name!r} returned {len(outputs)} turns for {len(contexts)} episodes")
        return outputs, (time.perf_counter() - t0) / max(1, len(contexts))

    def start(self, slot: int, case_index: int, sample_index: int, tid: str) -> _Live:
        """Reset ``envs[slot]`` on the case and open the episode's record (images stored when a store is given)."""
        config, store = self.config, self.store
        env = self.envs[slot]
        seed = episode_seed(config.seed, case_index, sample_index)
        t0 = time.perf_counter()
        extra = self.reset_options(case_index) if self.reset_options is not None else {}
        obs, _ = env.reset(seed=seed, options={"case_index": case_index, **extra})
        reset_seconds = time.perf_counter() - t0
        case, image = env.case, env.image
        assert case is not None and image is not None  # set by reset
        context = EpisodeContext(
            episode_id=self.next_episode,
            case=case,
            image=image,
            messages=[],
            step=0,
            max_steps=config.env.max_steps,
            state={"seed": seed, "sample_index": sample_index},
            box_format=config.env.box_format,
        )
        self.next_episode += 1
        record = TrajectoryRecord(
            trajectory_id=tid,
            case_id=case.id,
            source=case.source,
            split=config.split,
            sample_index=sample_index,
            seed=seed,
            question=case.question,
            answer_type=case.answer_type.value,
            options=list(case.options),
            gold_answer=case.answer,
            gold_boxes=[r.box for r in case.regions],
            gold_shapes=[r.shape for r in case.regions] if any(r.shape is not None for r in case.regions) else [],
            family=str(case.meta["family"]) if "family" in case.meta else None,
            image_size=image.size,
            system_prompt=env.system_prompt(),
            prompt=_first_user_text(env),
            producer=self.producer,
        )
        if store is not None and config.store_images:
            record.original_image = store.put_image(image)
            record.image = store.put_image(obs["image"])
        return _Live(env, context, record, time.perf_counter() - reset_seconds, env_seconds=reset_seconds)

    def finish(self, item: _Live, error: BaseException | None = None) -> None:
        """Close the episode's record (reward, timings, error), store it if kept, and report it."""
        record = item.record
        record.steps = item.steps
        if error is not None:
            record.error = str(error)[:2000] or type(error).__name__
            record.error_type = type(error).__name__
        if item.steps:
            record.reward_components = dict(item.steps[-1].reward_components)
        record.reward = item.reward  # the environment's total; an episode cut short has earned what it was paid
        record.timings = Timings(
            agent=item.agent_seconds, env=item.env_seconds, total=time.perf_counter() - item.started
        )
        record.agent_info = _jsonable(item.context.state.get("record_info", {}))
        record.kept = error is None and (not self.config.keep_only_correct or record.correct)
        if self.store is not None and record.kept and self.store.append(record):
            self.stored += 1
        self.finished.append(record)
        if self.on_record is not None:
            self.on_record(record)
        if self.progress is not None:
            self.progress(len(self.finished), self.total)


def _first_user_text(env: MedEyesEnv) -> str:
    user = next(m for m in env.chat_messages() if m["role"] == "user")
    for part in user["content"]:
        if part.get("type") == "text":
            return str(part["text"])
    return ""


def _step(item: _Live, output: TurnOutput, agent_seconds: float, store: RecordSink | None) -> bool:
    env = item.env
    t0 = time.perf_counter()
    obs, reward, terminated, truncated, info = env.step(output.text)
    item.reward += float(reward)
    env_seconds = time.perf_counter() - t0
    item.env_seconds += env_seconds
    turn = env.turns[-1]
    done = terminated or truncated
    image_ref = None
    if store is not None and not terminated:
        image_ref = store.put_image(obs["image"])
    note = item.context.state.get("note")
    item.steps.append(
        StepRecord(
            index=len(item.steps),
            text=output.text,
            action=turn.parsed.action,
            reasoning=turn.parsed.reasoning,
            well_formed=turn.parsed.well_formed,
            error=turn.parsed.error,
            error_kind=turn.parsed.error_kind,
            shown_boxes=list(turn.shown_boxes),
            feedback=turn.feedback,
            observation_image=image_ref,
            reward_components=dict(info.get("reward_components", {})),
            token_ids=output.token_ids,
            logprobs=output.logprobs,
            finish_reason=output.finish_reason,
            agent_seconds=agent_seconds,
            env_seconds=env_seconds,
            note=str(note) if note is not None else None,
        )
    )
    item.record.terminated = terminated
    item.record.final_answer = info.get("answer")
    item.record.truncated = truncated
    return done
