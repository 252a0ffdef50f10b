"""Benchmark figures from trajectory records: accuracy per answer type with bootstrap CIs, grounding, steps.

Every figure is read from the reward components the environment computed with
:func:`medeyes_env.rewards.score_episode`, the very functions the trainer is rewarded with, so training and
testing can never disagree on what a correct answer is:

- closed and multiple-choice rows: ``accuracy`` (yes/no polarity; letter or option text);
- open rows: exact match (``accuracy`` with the default ``open_match="exact"``) and recall
  (``token_recall``, the share of the gold answer's tokens the prediction contains);
- grounding, over episodes whose case has gold regions: the mean best IoU of the explored boxes, and the
  hit rate, the share of explored boxes whose IoU with some gold region reaches ``iou_threshold`` (0.5).
  A region with a shape (a mask's polygon, a phantom lesion's disc) is compared as intersection over union
  of areas (:func:`~medeyes_env.rewards.region_iou`); the figures count the shapes and the boxes, and with
  any shape also give the box-against-box figures of the same boxes, for comparison.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medeyes.trajectories import TrajectoryRecord
from medeyes_env.rewards import box_iou, grounding_reward, region_iou

PAPER_RESULTS: dict[str, dict[str, float]] = {
    "vqa_rad": {"MedEyes (Qwen2.5-VL-3B)": 70.7, "GMAI-VL": 64.6, "MedVLM-R1": 61.4},
    "slake": {"MedEyes (Qwen2.5-VL-3B)": 79.1, "GMAI-VL": 71.9, "MedVLM-R1": 65.9},
    "path_vqa": {"MedEyes (Qwen2.5-VL-3B)": 64.8, "GMAI-VL": 47.2, "MedVLM-R1": 55.2},
    "pmc_vqa": {"MedEyes (Qwen2.5-VL-3B)": 55.3, "GMAI-VL": 52.3, "MedVLM-R1": 44.8},
    "mmmu": {"MedEyes (Qwen2.5-VL-3B)": 59.7, "GMAI-VL": 51.2, "MedVLM-R1": 35.5},
}
"""Accuracy (%) the paper reports per benchmark (METHOD.md section 6), keyed by our source names."""
PAPER_MODEL = "MedEyes (Qwen2.5-VL-3B)"
"""The paper's own model, shown beside our numbers."""
ANSWER_TYPES = ("closed", "open", "choice")
"""Row order of the table: the paper's closed / open split, then multiple choice."""


class Interval(BaseModel):
    """A mean and its bootstrap 95% confidence interval."""

    model_config = ConfigDict(frozen=True)

    value: float = Field(description="The mean over cases.")
    ci95: tuple[float, float] = Field(description="Percentile bootstrap 95% interval (low, high).")


class TypeScores(BaseModel):
    """One answer type of one dataset: the paper's per-type columns."""

    answer_type: str = Field(description="closed, open or choice.")
    n: int = Field(description="Cases scored.")
    accuracy: Interval = Field(description="closed/choice: accuracy; open: exact match.")
    recall: Interval | None = Field(default=None, description="open only: token recall of the gold answer.")


class DatasetScores(BaseModel):
    """Every figure of one dataset (and one tools setting): what the table prints and ``--json`` writes."""

    dataset: str = Field(description="Source name, e.g. 'slake'.")
    tools: bool = Field(description="Whether scan and drill were allowed (False: answer-only).")
    n: int = Field(description="Cases scored (failed episodes count as wrong).")
    errors: int = Field(default=0, description="Episodes that failed (agent or server error); scored 0.")
    accuracy: float = Field(description="Mean accuracy over all cases (open: exact match).")
    ci95: tuple[float, float] = Field(description="Bootstrap 95% interval of accuracy.")
    accuracy_by_type: dict[str, float] = Field(description="Mean accuracy per answer type.")
    by_type: list[TypeScores] = Field(description="Per answer type, with intervals and open recall.")
    mean_best_iou: float | None = Field(
        default=None, description="Mean best IoU of the explored boxes; None without gold regions or tools."
    )
    mean_best_iou_ci95: tuple[float, float] | None = Field(default=None, description="Its bootstrap 95% interval.")
    hit_rate: float | None = Field(
        default=None, description="Share of explored boxes with IoU >= 0.5 against a gold box (cases with gold)."
    )
    grounded: int = Field(default=0, description="Cases with gold regions (the grounding denominator).")
    shape_regions: int = Field(default=0, description="Gold regions of those cases scored against their shape.")
    box_regions: int = Field(default=0, description="Gold regions of those cases scored as boxes (no shape).")
    mean_best_box_iou: float | None = Field(
        default=None, description="With any shape: mean best IoU of the same boxes against the gold boxes alone."
    )
    box_hit_rate: float | None = Field(
        default=None, description="With any shape: the hit rate against the gold boxes alone."
    )
    mean_tool_steps: float = Field(description="Mean executed scan and drill turns per case.")
    paper: dict[str, float] = Field(default_factory=dict, description="The paper's accuracy (%) on this dataset.")


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling cases with replacement).

    Seeded, so the same records always print the same interval.

    >>> bootstrap_ci([1.0] * 10)
    (1.0, 1.0)
    >>> low, high = bootstrap_ci([0.0, 1.0] * 50)
    >>> 0.39 < low < 0.5 < high < 0.61
    True
    >>> bootstrap_ci([])
    (0.0, 0.0)
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    # (n_resamples, n) indices -> (n_resamples,) means; chunked so 100k cases stay within memory.
    means = np.concatenate(
        [
            data[rng.integers(0, data.size, size=(chunk, data.size))].mean(axis=1)
            for chunk in _chunks(n_resamples, data.size)
        ]
    )
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (round(float(low), 6), round(float(high), 6))


def _chunks(total: int, width: int, budget: int = 4_000_000) -> list[int]:
    size = max(1, min(total, budget // max(1, width)))
    return [min(size, total - start) for start in range(0, total, size)]


def _interval(values: list[float]) -> Interval:
    return Interval(value=float(np.mean(values)) if values else 0.0, ci95=bootstrap_ci(values))


def hits(record: TrajectoryRecord, iou_threshold: float = 0.5, shapes: bool = True) -> tuple[int, int]:
    """``(explored boxes that hit a gold region, explored boxes)`` of one episode.

    A gold region with a shape is hit by area IoU against the shape (``shapes=False``: against its box).
    """
    boxes = record.explored_boxes
    if shapes and any(shape is not None for shape in record.gold_shapes):
        regions = record.gold_regions
        hit = sum(1 for box in boxes if any(region_iou(box, region) >= iou_threshold for region in regions))
    else:
        hit = sum(1 for box in boxes if any(box_iou(box, gold) >= iou_threshold for gold in record.gold_boxes))
    return hit, len(boxes)


def score_records(
    records: Sequence[TrajectoryRecord], dataset: str, tools: bool = True, iou_threshold: float = 0.5
) -> DatasetScores:
    """The benchmark figures of one dataset's records (one record per case)."""
    accuracy: dict[str, list[float]] = defaultdict(list)
    recall: dict[str, list[float]] = defaultdict(list)
    ious: list[float] = []
    box_ious: list[float] = []
    hit = box_hit = looked = shape_regions = box_regions = 0
    for record in records:
        components = record.reward_components
        accuracy[record.answer_type].append(components.get("accuracy", 0.0))
        recall[record.answer_type].append(components.get("token_recall", 0.0))
        if record.gold_boxes:
            ious.append(components.get("best_iou", 0.0))
            got, boxes = hits(record, iou_threshold)
            hit, looked = hit + got, looked + boxes
            box_ious.append(grounding_reward(record.explored_boxes, record.gold_boxes))
            box_hit += hits(record, iou_threshold, shapes=False)[0]
            shaped = sum(1 for shape in record.gold_shapes if shape is not None)
            shape_regions, box_regions = shape_regions + shaped, box_regions + len(record.gold_boxes) - shaped
    every = [a for kind in accuracy for a in accuracy[kind]]
    order = [k for k in ANSWER_TYPES if k in accuracy] + sorted(set(accuracy) - set(ANSWER_TYPES))
    by_type = [
        TypeScores(
            answer_type=kind,
            n=len(accuracy[kind]),
            accuracy=_interval(accuracy[kind]),
            recall=_interval(recall[kind]) if kind == "open" else None,
        )
        for kind in order
    ]
    grounding = tools and bool(ious)
    iou = _interval(ious) if grounding else None
    return DatasetScores(
        dataset=dataset,
        tools=tools,
        n=len(records),
        errors=sum(1 for r in records if r.error),
        accuracy=float(np.mean(every)) if every else 0.0,
        ci95=bootstrap_ci(every),
        accuracy_by_type={t.answer_type: t.accuracy.value for t in by_type},
        by_type=by_type,
        mean_best_iou=iou.value if iou else None,
        mean_best_iou_ci95=iou.ci95 if iou else None,
        hit_rate=(hit / looked if looked else 0.0) if grounding else None,
        grounded=len(ious),
        shape_regions=shape_regions,
        box_regions=box_regions,
        mean_best_box_iou=float(np.mean(box_ious)) if grounding and shape_regions else None,
        box_hit_rate=(box_hit / looked if looked else 0.0) if grounding and shape_regions else None,
        mean_tool_steps=float(np.mean([r.tool_steps for r in records])) if records else 0.0,
        paper=PAPER_RESULTS.get(dataset, {}),
    )
