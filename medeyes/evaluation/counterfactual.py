"""Image counterfactuals (``--counterfactual`` of ``medeyes eval`` and ``rollout``): does the answer follow the image.

Every arm plays the same episodes as ``real`` (same cases, run seed, episode seeds, agent and temperature)
with one thing changed, the pixels:

- ``real``: the case's image, the baseline every other arm is compared with;
- ``blank``: a uniform mid-grey image (:data:`BLANK_GREY` in every channel) of the case's size: no
  information at all, not even the image's brightness;
- ``shuffle``: another evaluated case's image (a seeded derangement of the evaluated cases, so no case keeps
  its own; resized to the case's size where sizes differ);
- ``swap``: the same case with its object's class swapped in the image itself, where the source can render
  it (:class:`ClassSwapSource`: the phantom turns every lesion into a mimic and every mimic into a lesion,
  same noise); the gold answer and boxes are the swapped image's. Sources that cannot: not available;
- ``drill_swap``: the real case, but every drill view is cut from the class-swapped image (the environment's
  ``drill_image`` reset option): overview and scans show the real case, drills the other class. Its
  accuracy is scored against the real case's gold.

Per arm: accuracy, presence accuracy, and the image sensitivity, the share of answers that differ from the
same episode's ``real`` answer (answers compared as the reward reads them: yes/no polarity, the option
named, normalised open text). For ``swap`` and ``drill_swap``: among presence episodes whose answer the
swap turns over (yes->no: lesion->mimic; no->yes: mimic->lesion) and whose looks reached the object (see
:func:`reached`), the share whose answer follows the swapped object, with n for each direction.

Each arm has its own trajectory store (``OUT/counterfactual/DATASET/ARM``) whose settings
(:mod:`medeyes.trajectories.settings`) name the arm besides the data, split and environment, so a stored
episode of one arm is never read back as another's, and a rerun with other settings is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.base import Agent
from medeyes.evaluation.run import verify_record
from medeyes.rollout import RolloutConfig, producer_of, run_rollout, trajectory_id
from medeyes.rollout_summary import REACH_IOU, reaches
from medeyes.trajectories import TrajectoryRecord, TrajectoryStore
from medeyes.trajectories.settings import episode_settings
from medeyes_env.cases import AnswerType, Box, Case, Split
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError
from medeyes_env.rewards import accuracy_reward, normalize_answer
from medeyes_env.sources import CaseSource

Arm = Literal["real", "blank", "shuffle", "swap", "drill_swap"]
ARMS: tuple[Arm, ...] = get_args(Arm)
BLANK_GREY = 128
"""The grey level of every pixel of the ``blank`` arm's image."""
REACH_RULE = (
    f"a drill's shown box has IoU > {REACH_IOU} with the object's box or contains its centre (object: the real "
    "case's gold region for a lesion, its Case.lookalikes for a mimic)"
)
Listener = Callable[[str, int, int], None]
"""``listener(arm, done, total)``: progress of one arm's episodes."""


@runtime_checkable
class ClassSwapSource(Protocol):
    """A source that can render a case with its objects' classes swapped (the phantom)."""

    def swapped_case(self, split: Split, index: int) -> Case | None:
        """The case with its classes swapped in the image, or None where the swap leaves no answer."""
        ...


def parse_arms(text: str) -> tuple[Arm, ...]:
    """``all`` or a comma list of arms, in the canonical order, ``real`` always included (the baseline).

    >>> parse_arms("swap, blank")
    ('real', 'blank', 'swap')
    >>> parse_arms("all") == ARMS
    True
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return ARMS
    unknown = [name for name in names if name not in ARMS]
    if unknown or not names:
        raise ConfigError(f"--counterfactual takes 'all' or a comma list of {', '.join(ARMS)}; got {text!r}")
    return tuple(arm for arm in ARMS if arm == "real" or arm in names)


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one cycle), n >= 2.

    >>> order = derangement(5, 0)
    >>> sorted(order) == list(range(5)) and all(i != j for i, j in enumerate(order))
    True
    """
    if n < 2:
        raise ConfigError(f"the shuffle arm needs at least 2 cases to give each another's image, got {n}")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x5AFF1E])
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        order[i], order[j] = order[j], order[i]
    return order


class CounterfactualConfig(BaseModel):
    """Which episodes every arm plays: the same for each arm."""

    model_config = ConfigDict(extra="forbid")

    split: Split = Field(default="test", description="Split of the source.")
    start: int = Field(default=0, ge=0, description="Index of the first case.")
    n: int = Field(default=32, ge=1, description="Number of cases.")
    samples_per_case: int = Field(default=1, ge=1, description="Episodes per case (each paired with real's).")
    seed: int = Field(default=0, description="Run seed: episode seeds and the shuffle's derangement derive from it.")
    batch_size: int = Field(default=16, ge=1, description="Live episodes per agent call.")
    store_images: bool = Field(default=False, description="Store observation images with the records.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="Environment settings (every arm's).")


class ArmFigures(BaseModel):
    """One arm's figures; rates are None where their n is 0."""

    arm: str = Field(description="real, blank, shuffle, swap or drill_swap.")
    available: bool = Field(default=True, description="False where the source cannot render the arm (n/a).")
    note: str = Field(default="", description="What the arm shows, or why it is not available.")
    episodes: int = Field(default=0, description="Episodes scored (swap arms: cases the source could swap).")
    accuracy: float | None = Field(default=None, description="Mean accuracy against the arm's gold.")
    presence_episodes: int = Field(default=0, description="Presence-question episodes among them.")
    presence_accuracy: float | None = Field(default=None, description="Accuracy on presence questions.")
    changed: float | None = Field(default=None, description="Image sensitivity: share of answers unlike real's.")
    changed_presence: float | None = Field(default=None, description="The same on presence questions.")
    flipped_yes_to_no: int = Field(default=0, description="Presence episodes the swap turns from yes to no.")
    reached_yes_to_no: int = Field(default=0, description="Of those, episodes whose drills reached the object.")
    follows_yes_to_no: float | None = Field(default=None, description="Share of reached ones answering no.")
    flipped_no_to_yes: int = Field(default=0, description="Presence episodes the swap turns from no to yes.")
    reached_no_to_yes: int = Field(default=0, description="Of those, episodes whose drills reached the object.")
    follows_no_to_yes: float | None = Field(default=None, description="Share of reached ones answering yes.")


class CounterfactualReport(BaseModel):
    """What ``--counterfactual`` prints and writes (``OUT/counterfactual.json`` holds a list of these)."""

    agent: str = Field(description="Agent label.")
    dataset: str = Field(description="Dataset label.")
    split: str = Field(description="Split scored.")
    start: int = Field(description="First case index.")
    n: int = Field(description="Cases per arm.")
    seed: int = Field(description="Run seed.")
    reach_rule: str = Field(default=REACH_RULE, description="When a presence episode's looks reached the object.")
    arms: list[ArmFigures] = Field(description="One entry per arm, real first.")
    seconds: float = Field(description="Wall-clock seconds (stored episodes read back cost nothing).")
    episodes_run: int = Field(description="Episodes played now.")
    episodes_resumed: int = Field(description="Episodes read back from the arms' stores.")


NOTES: dict[str, str] = {
    "real": "the case's image",
    "blank": f"uniform grey {BLANK_GREY}, the case's size",
    "shuffle": "another evaluated case's image (seeded derangement)",
    "swap": "the case with its objects' classes swapped in the image; scored against the swapped gold",
    "drill_swap": "real overview and scans, drills cut from the class-swapped image; real gold",
}


class _ArmSource:
    """``source`` as one arm shows it: each case's image replaced (names and ids unchanged, so episodes pair)."""

    def __init__(self, source: CaseSource, arm: Arm, config: CounterfactualConfig) -> None:
        self.source, self.arm, self.config = source, arm, config
        self.name = source.name
        self.order = derangement(config.n, config.seed) if arm == "shuffle" else []

    def size(self, split: Split) -> int | None:
        return self.source.size(split)

    def case(self, split: Split, index: int) -> Case:
        case = self.source.case(split, index)
        if self.arm == "blank":
            return case.model_copy().with_image_factory(lambda: _blank(case))
        if self.arm == "shuffle":
            other = self.source.case(split, self.config.start + self.order[index - self.config.start])
            return case.model_copy().with_image_factory(lambda: _resized(other.load_image(), case))
        if self.arm == "swap":
            return swapped_case(self.source, split, index) or case
        return case

    def reset_options(self, index: int) -> dict[str, Any]:
        """The drill image of ``drill_swap`` (none for a case the source cannot swap)."""
        swapped = swapped_case(self.source, self.config.split, index) if self.arm == "drill_swap" else None
        return {} if swapped is None else {"drill_image": swapped.load_image()}


def _blank(case: Case) -> Image.Image:
    size = case.image_size or case.load_image().size
    return Image.new("RGB", size, (BLANK_GREY,) * 3)


def _resized(image: Image.Image, case: Case) -> Image.Image:
    size = case.image_size or case.load_image().size
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def swapped_case(source: CaseSource, split: Split, index: int) -> Case | None:
    """The class-swapped case where the source renders one (:class:`ClassSwapSource`), else None."""
    return source.swapped_case(split, index) if isinstance(source, ClassSwapSource) else None


def run_counterfactuals(
    agent: Agent,
    source: CaseSource,
    arms: Sequence[Arm],
    config: CounterfactualConfig,
    out: Path | None = None,
    agent_label: str = "agent",
    dataset: str | None = None,
    listener: Listener | None = None,
) -> CounterfactualReport:
    """Play every arm on the same episodes and score each against ``real`` (see the module docstring).

    With ``out``, each arm's episodes go to ``out/counterfactual/DATASET/ARM`` and a rerun reads them back.
    """
    started = time.perf_counter()
    dataset = dataset or source.name
    arms = tuple(arm for arm in ARMS if arm == "real" or arm in arms)
    indices = range(config.start, config.start + config.n)
    cases = {source.case(config.split, i).id: i for i in indices}
    records: dict[str, dict[str, TrajectoryRecord]] = {}
    run = resumed = 0
    for arm in arms:
        if arm in ("swap", "drill_swap") and not isinstance(source, ClassSwapSource):
            continue
        store = None if out is None else _store(out, dataset, source, arm, agent, config)
        played, back = _play(agent, source, arm, config, store, cases, listener)
        records[arm] = {r.trajectory_id: r for r in [*back, *played]}
        run, resumed = run + len(played), resumed + len(back)
    figures = [_figures(arm, records, source, config, cases) for arm in arms]
    return CounterfactualReport(
        agent=agent_label, dataset=dataset, split=config.split, start=config.start, n=config.n, seed=config.seed,
        arms=figures, seconds=time.perf_counter() - started, episodes_run=run, episodes_resumed=resumed,
    )  # fmt: skip


def _store(
    out: Path, dataset: str, source: CaseSource, arm: Arm, agent: Agent, config: CounterfactualConfig
) -> TrajectoryStore:
    """The arm's own store; its settings name the arm too, so no stored episode is read back as another arm's."""
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("._") or "data"
    settings = episode_settings(dataset, source, config.split, config.env, counterfactual=arm)
    return TrajectoryStore(out / "counterfactual" / folder / arm, producer=producer_of(agent), settings=settings)


def _play(
    agent: Agent,
    source: CaseSource,
    arm: Arm,
    config: CounterfactualConfig,
    store: TrajectoryStore | None,
    cases: dict[str, int],
    listener: Listener | None,
) -> tuple[list[TrajectoryRecord], list[TrajectoryRecord]]:
    """One arm's episodes: those played now and those read back from its store (each checked as eval does)."""
    wanted = {trajectory_id(case_id, config.seed, k) for case_id in cases for k in range(config.samples_per_case)}
    shown = _ArmSource(source, arm, config)
    found: dict[str, TrajectoryRecord] = {}
    for where, record in store.located_records() if store is not None else ():
        if record.trajectory_id in wanted and record.trajectory_id not in found:
            verify_record(record, shown.case(config.split, cases[record.case_id]), config.env, where)
            found[record.trajectory_id] = record
    back = list(found.values())
    total = len(wanted)
    if listener is not None:
        listener(arm, len(back), total)
    if len(back) == total:
        return [], back
    rollout = RolloutConfig(
        split=config.split, n=config.n, start=config.start, samples_per_case=config.samples_per_case,
        batch_size=config.batch_size, seed=config.seed, store_images=config.store_images, env=config.env,
    )  # fmt: skip
    progress = None if listener is None else (lambda done, _: listener(arm, len(back) + done, total))
    result = run_rollout(agent, shown, rollout, store=store, progress=progress, reset_options=shown.reset_options)
    return result.records, back


def answer_key(answer: str | None, case: Case) -> str | None:
    """An answer as the reward reads it: ``yes``/``no``, the option named, or normalised open text.

    Two answers that score alike against every possible gold get one key; one that names nothing the reward
    recognises keeps its normalised text behind a ``?``.

    >>> case = Case(id="d/1", question="Is there a nodule?", answer="no", answer_type="closed", source="doc")
    >>> answer_key("Yes.", case), answer_key("yes", case), answer_key("perhaps", case), answer_key(None, case)
    ('yes', 'yes', '?perhaps', None)
    """
    if answer is None:
        return None
    if case.answer_type is AnswerType.OPEN:
        return normalize_answer(answer)
    golds = ("yes", "no") if case.answer_type is AnswerType.CLOSED else case.options
    for gold in golds:
        if accuracy_reward(answer, case.model_copy(update={"answer": gold})) == 1.0:
            return gold
    return "?" + normalize_answer(answer)


def reached(record: TrajectoryRecord, objects: Sequence[Box]) -> bool:
    """Whether any drill of the episode reached one of ``objects``."""
    drills = [s for s in record.steps if s.action is not None and s.action.name == "drill"]
    return any(reaches(shown, box) for step in drills for shown in step.shown_boxes for box in objects)


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _figures(
    arm: Arm,
    records: dict[str, dict[str, TrajectoryRecord]],
    source: CaseSource,
    config: CounterfactualConfig,
    cases: dict[str, int],
) -> ArmFigures:
    """One arm's figures against ``real`` (see the module docstring)."""
    if arm not in records:
        return ArmFigures(arm=arm, available=False, note=f"n/a: {source.name} cannot render a class swap")
    real_cases = {case_id: source.case(config.split, i) for case_id, i in cases.items()}
    swapped = {case_id: swapped_case(source, config.split, i) for case_id, i in cases.items()}
    accuracy, presence, changed, changed_presence = [], [], [], []
    follows: dict[str, list[bool]] = {"yes->no": [], "no->yes": []}
    flipped = {"yes->no": 0, "no->yes": 0}
    for tid, record in records[arm].items():
        case = real_cases[record.case_id]
        other = swapped[record.case_id]
        if arm in ("swap", "drill_swap") and other is None:
            continue  # played with the real image: the source cannot swap this question
        correct = record.reward_components.get("accuracy", 0.0) == 1.0
        accuracy.append(correct)
        is_presence = record.family == "presence"
        if is_presence:
            presence.append(correct)
        real = records["real"].get(tid)
        if real is not None and arm != "real":
            differs = answer_key(record.final_answer, case) != answer_key(real.final_answer, case)
            changed.append(differs)
            if is_presence:
                changed_presence.append(differs)
        if arm in ("swap", "drill_swap") and is_presence and other is not None and other.answer != case.answer:
            direction = f"{case.answer}->{other.answer}"
            flipped[direction] += 1
            objects = [r.box for r in (case.regions if case.answer == "yes" else case.lookalikes)]
            if reached(record, objects):
                follows[direction].append(answer_key(record.final_answer, case) == other.answer)
    return ArmFigures(
        arm=arm, note=NOTES[arm], episodes=len(accuracy), accuracy=_rate(accuracy),
        presence_episodes=len(presence), presence_accuracy=_rate(presence),
        changed=_rate(changed), changed_presence=_rate(changed_presence),
        flipped_yes_to_no=flipped["yes->no"], reached_yes_to_no=len(follows["yes->no"]),
        follows_yes_to_no=_rate(follows["yes->no"]),
        flipped_no_to_yes=flipped["no->yes"], reached_no_to_yes=len(follows["no->yes"]),
        follows_no_to_yes=_rate(follows["no->yes"]),
    )  # fmt: skip
