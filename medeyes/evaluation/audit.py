"""Check a dataset before scoring on it: counts, unreadable images, answer balance, the blind floor.

The blind majority-answer accuracy is the floor every result should be read against: the accuracy of a
policy that never looks at the image and says, for each question text, the answer most common among the
training cases (:func:`medeyes.evaluation.blind.blind_accuracy`, the same figure training logs).
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, Field

from medeyes.evaluation.blind import blind_accuracy
from medeyes_env.cases import SPLITS, Case
from medeyes_env.errors import MedEyesError
from medeyes_env.sources import CaseSource

MAX_PROBLEMS_KEPT = 20


class SplitAudit(BaseModel):
    """What one split holds."""

    split: str = Field(description="train, validation or test.")
    n: int = Field(description="Cases in the split.")
    by_type: dict[str, int] = Field(description="Cases per answer type.")
    with_regions: int = Field(description="Cases with gold regions.")
    shape_regions: int = Field(default=0, description="Gold regions with a shape (polygon), over every case.")
    box_regions: int = Field(default=0, description="Gold regions that are boxes only, over every case.")
    images_checked: int = Field(description="Images decoded.")
    bad_images: int = Field(description="Images missing or unreadable.")
    problems: list[str] = Field(default_factory=list, description="The first bad images, each naming its file.")
    yes_share: float | None = Field(default=None, description="Share of 'yes' among yes/no answers.")
    top_answers: list[tuple[str, int]] = Field(description="The most common answers and their counts.")
    blind_accuracy: float | None = Field(
        description="Accuracy of the majority answer per question text, learnt on the train split (on the split "
        "itself when there is none); None for the train split itself, where it would score its own answers."
    )


def _audit_split(split: str, cases: list[Case], train: list[Case], check_images: bool) -> SplitAudit:
    problems: list[str] = []
    bad = 0
    for case in cases if check_images else []:
        try:
            case.load_image()
        except (MedEyesError, OSError) as exc:
            bad += 1
            if len(problems) < MAX_PROBLEMS_KEPT:
                problems.append(f"{case.id}: {exc}")
    closed = [c.answer.strip().lower() for c in cases if c.answer_type.value == "closed"]
    return SplitAudit(
        split=split,
        n=len(cases),
        by_type=dict(Counter(c.answer_type.value for c in cases)),
        with_regions=sum(1 for c in cases if c.regions),
        shape_regions=sum(1 for c in cases for r in c.regions if r.shape is not None),
        box_regions=sum(1 for c in cases for r in c.regions if r.shape is None),
        images_checked=len(cases) if check_images else 0,
        bad_images=bad,
        problems=problems,
        yes_share=closed.count("yes") / len(closed) if closed else None,
        top_answers=Counter(c.answer.strip().lower() for c in cases).most_common(5),
        blind_accuracy=None if split == "train" else blind_accuracy(train or cases, cases),
    )


def audit_source(source: CaseSource, limit: int | None = None, check_images: bool = True) -> list[SplitAudit]:
    """Audit every non-empty split of a finite source (the first ``limit`` cases of each, when given)."""
    cases: dict[str, list[Case]] = {}
    for split in SPLITS:
        size = source.size(split)
        if size is None:
            size = limit or 200
        count = min(size, limit) if limit else size
        cases[split] = [source.case(split, i) for i in range(count)]
    train = cases["train"]
    return [_audit_split(split, items, train, check_images) for split, items in cases.items() if items]
