"""The rollout summary: what the finished episodes of a run achieved.

:func:`summarize` turns trajectory records (what :func:`~medeyes.rollout.run_rollout` returns, or a store holds)
into the :class:`RolloutSummary` that ``medeyes rollout`` prints and ``--summary-json`` writes: accuracy by answer
type and family, best IoU against gold, steps, rewards by component, the looking breakdown (where the first drill
landed, :func:`reaches`) and throughput. It reads records only; it runs nothing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import BaseModel, Field

from medeyes.trajectories import TrajectoryRecord
from medeyes_env.cases import Box
from medeyes_env.rewards import box_iou, grounding_reward

REACH_IOU = 0.1
"""A drill reached an object when its shown box has IoU above this with the object's box (or holds its centre)."""


def reaches(shown: Box, target: Box) -> bool:
    """Whether a drill that showed ``shown`` reached the object in ``target`` (IoU > :data:`REACH_IOU` or its centre).

    >>> reaches((0, 0, 100, 100), (60, 60, 120, 120)), reaches((0, 0, 100, 100), (90, 90, 150, 150))
    (True, False)
    """
    centre_x, centre_y = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
    inside = shown[0] <= centre_x <= shown[2] and shown[1] <= centre_y <= shown[3]
    return inside or box_iou(shown, target) > REACH_IOU


class RolloutSummary(BaseModel):
    """What a run achieved; ``medeyes rollout --summary-json`` writes this."""

    episodes: int = Field(description="Episodes summarised.")
    errors: int = Field(default=0, description="Episodes that failed (agent or server error).")
    kept: int = Field(default=0, description="Episodes kept by the filter (stored).")
    accuracy: float = Field(description="Mean accuracy reward.")
    accuracy_by_type: dict[str, float] = Field(default_factory=dict, description="Mean accuracy per answer type.")
    episodes_by_type: dict[str, int] = Field(default_factory=dict, description="Episodes per answer type.")
    accuracy_by_family: dict[str, float] = Field(default_factory=dict, description="Mean accuracy per family.")
    mean_best_iou: float = Field(description="Mean best IoU against gold, over episodes whose case has gold boxes.")
    iou_episodes: int = Field(default=0, description="Episodes with gold boxes (the IoU mean's denominator).")
    shape_regions: int = Field(
        default=0, description="Gold regions of those episodes with a shape (IoU against the shape's area)."
    )
    box_regions: int = Field(default=0, description="Gold regions of those episodes that are boxes only.")
    mean_best_box_iou: float | None = Field(
        default=None,
        description="With any gold shape: the mean best IoU of the same explored boxes against the gold boxes alone.",
    )
    mean_best_iou_by_family: dict[str, float] = Field(
        default_factory=dict,
        description="Mean best IoU per question family, over its episodes with gold boxes. A case's gold region "
        "is evidence for its region questions (presence), not for a global one (modality) that needs no look.",
    )
    iou_episodes_by_family: dict[str, int] = Field(
        default_factory=dict, description="Episodes with gold boxes per family (each family's IoU denominator)."
    )
    mean_steps: float = Field(description="Mean executed tool turns (scan and drill) per episode.")
    mean_turns: float = Field(default=0.0, description="Mean turns per episode, the answer included.")
    mean_reward: float = Field(description="Mean total reward.")
    mean_components: dict[str, float] = Field(default_factory=dict, description="Mean of every reward component.")
    parse_rate: float = Field(default=1.0, description="Share of turns that parsed (could be executed).")
    scan_share: float = Field(default=0.0, description="Share of episodes with at least one scan.")
    drill_share: float = Field(default=0.0, description="Share of episodes with at least one drill.")
    path_diversity: float | None = Field(
        default=None, description="Mean share of distinct action sequences among a case's trajectories (N >= 2)."
    )
    first_drill_hit_share: float | None = Field(
        default=None,
        description="Share of drilled episodes with gold boxes whose first drill reached a gold region "
        "(:func:`reaches`: IoU above REACH_IOU, or the shown box holds the region's centre).",
    )
    looking_episodes: int = Field(default=0, description="Drilled episodes with gold boxes (the denominator above).")
    tool_steps_first_hit: float | None = Field(
        default=None, description="Mean tool steps of those episodes when the first drill hit."
    )
    tool_steps_first_miss: float | None = Field(
        default=None, description="Mean tool steps of those episodes when the first drill missed."
    )
    redrill_after_miss: float | None = Field(
        default=None, description="Share of first-drill misses that drilled again (progressive looking)."
    )
    seconds: float | None = Field(default=None, description="Wall-clock seconds of the run.")
    trajectories_per_second: float | None = Field(default=None, description="Episodes per wall-clock second.")


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _looking(records: list[TrajectoryRecord]) -> dict[str, Any]:
    """Where the first drill landed and what followed: tool steps after a hit or a miss, re-drills after a miss."""
    hit_steps: list[float] = []
    miss_steps: list[float] = []
    redrills: list[float] = []
    for record in records:
        drills = [s for s in record.steps if s.action is not None and s.action.name == "drill" and s.shown_boxes]
        if not record.gold_boxes or not drills:
            continue
        hit = any(reaches(drills[0].shown_boxes[0], gold) for gold in record.gold_boxes)
        (hit_steps if hit else miss_steps).append(float(record.tool_steps))
        if not hit:
            redrills.append(float(len(drills) > 1))
    n = len(hit_steps) + len(miss_steps)
    return {
        "first_drill_hit_share": len(hit_steps) / n if n else None,
        "looking_episodes": n,
        "tool_steps_first_hit": _mean(hit_steps) if hit_steps else None,
        "tool_steps_first_miss": _mean(miss_steps) if miss_steps else None,
        "redrill_after_miss": _mean(redrills) if redrills else None,
    }


def summarize(records: list[TrajectoryRecord], seconds: float | None = None) -> RolloutSummary:
    """Accuracy (overall, by answer type and family), best IoU, steps, rewards by component, throughput."""
    by_type: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    iou_by_family: dict[str, list[float]] = defaultdict(list)
    components: dict[str, list[float]] = defaultdict(list)
    ious, box_ious, steps, turns, rewards = [], [], [], [], []
    parsed = total_turns = scans = drills = shape_regions = box_regions = 0
    paths: dict[str, list[tuple]] = defaultdict(list)
    for record in records:
        accuracy = record.reward_components.get("accuracy", 0.0)
        by_type[record.answer_type].append(accuracy)
        by_family[record.family or "-"].append(accuracy)
        for name, value in record.reward_components.items():
            components[name].append(value)
        if record.gold_boxes:
            ious.append(record.reward_components.get("best_iou", 0.0))
            iou_by_family[record.family or "-"].append(ious[-1])
            box_ious.append(grounding_reward(record.explored_boxes, record.gold_boxes))
            shaped = sum(1 for shape in record.gold_shapes if shape is not None)
            shape_regions, box_regions = shape_regions + shaped, box_regions + len(record.gold_boxes) - shaped
        steps.append(record.tool_steps)
        turns.append(len(record.steps))
        rewards.append(record.reward)
        total_turns += len(record.steps)
        parsed += sum(1 for s in record.steps if s.action is not None)
        names = {s.action.name for s in record.steps if s.action is not None and s.shown_boxes}
        scans += "scan" in names
        drills += "drill" in names
        paths[record.case_id].append(
            tuple((s.action.name, s.action.boxes) if s.action is not None else ("?",) for s in record.steps)
        )
    multi = [len(set(p)) / len(p) for p in paths.values() if len(p) >= 2]
    n = len(records)
    return RolloutSummary(
        episodes=n,
        errors=sum(1 for r in records if r.error),
        kept=sum(1 for r in records if r.kept),
        accuracy=_mean([a for values in by_type.values() for a in values]),
        accuracy_by_type={k: _mean(v) for k, v in sorted(by_type.items())},
        episodes_by_type={k: len(v) for k, v in sorted(by_type.items())},
        accuracy_by_family={k: _mean(v) for k, v in sorted(by_family.items())},
        mean_best_iou=_mean(ious),
        iou_episodes=len(ious),
        shape_regions=shape_regions,
        box_regions=box_regions,
        mean_best_box_iou=_mean(box_ious) if shape_regions else None,
        mean_best_iou_by_family={k: _mean(v) for k, v in sorted(iou_by_family.items())},
        iou_episodes_by_family={k: len(v) for k, v in sorted(iou_by_family.items())},
        mean_steps=_mean([float(s) for s in steps]),
        mean_turns=_mean([float(t) for t in turns]),
        mean_reward=_mean(rewards),
        mean_components={k: _mean(v) for k, v in components.items()},
        parse_rate=parsed / total_turns if total_turns else 1.0,
        scan_share=scans / n if n else 0.0,
        drill_share=drills / n if n else 0.0,
        path_diversity=_mean(multi) if multi else None,
        **_looking(records),
        seconds=seconds,
        trajectories_per_second=(n / seconds) if seconds else None,
    )
