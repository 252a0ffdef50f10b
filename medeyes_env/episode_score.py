"""``EpisodeScore``: :func:`~medeyes_env.rewards.score_episode` kept up to date one turn at a time.

The env reports every reward component at every step, on the episode so far. Scoring the whole episode again
each step compares every box with every earlier box and every gold region: the cost grows with the episode. Here
a turn adds only what it changes (its boxes against the gold and against the earlier boxes), and the breakdown is
the same floats :func:`~medeyes_env.rewards.score_episode` gives for the same turns (``tests/test_rewards.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from medeyes_env.cases import Box, Case, Region
from medeyes_env.rewards import (
    RewardBreakdown,
    RewardConfig,
    box_iou,
    diversity_of_counts,
    grammar_reward,
    region_iou,
    scoring_gold,
    weigh_components,
)


class EpisodeScore:
    """The reward components of an episode so far; :meth:`add_turn` per turn, :meth:`breakdown` at any time.

    >>> from medeyes_env.cases import Case, Region
    >>> case = Case(id="d/2", question="Abnormal?", answer="yes", answer_type="closed", source="doc",
    ...             regions=(Region(box=(10, 10, 30, 30)),))
    >>> score = EpisodeScore(case, RewardConfig())
    >>> score.add_turn(True, [(10, 10, 30, 30)], drill=True)
    >>> score.add_turn(True, [], drill=False)  # the answer turn
    >>> round(score.breakdown("Yes").total, 6)  # as score_episode's own example
    0.9125
    """

    def __init__(self, case: Case, config: RewardConfig) -> None:
        self.case, self.config = case, config
        self._gold = scoring_gold(case)
        self._weights = config.weights()
        self._well_formed: list[bool] = []
        self._boxes: list[Box] = []
        self._parent: list[int] = []  # union-find over the boxes: IoU >= threshold links two (distinct_regions)
        self._regions = 0
        self._dissimilar = 0
        self._best_iou: float | None = None  # None until a value: max() keeps its first item, a NaN included
        self._best_drill: float | None = None

    def add_turn(self, well_formed: bool, boxes: Sequence[Box], drill: bool) -> None:
        """Add one turn: whether it was well formed, the boxes it explored (none if it showed nothing), if a drill."""
        self._well_formed.append(well_formed)
        threshold = self.config.iou_threshold
        for box in boxes:
            for value in (region_iou(box, g) if isinstance(g, Region) else box_iou(box, g) for g in self._gold):
                if self._best_iou is None or value > self._best_iou:
                    self._best_iou = value
                if drill and (self._best_drill is None or value > self._best_drill):
                    self._best_drill = value
            new = len(self._boxes)
            self._parent.append(new)
            self._regions += 1
            for i, earlier in enumerate(self._boxes):
                iou = box_iou(earlier, box)  # (earlier, later): the order diversity_reward compares in
                if iou < threshold:
                    self._dissimilar += 1
                if iou >= threshold:
                    root_i, root_new = self._find(i), self._find(new)
                    if root_i != root_new:
                        self._parent[root_i] = root_new
                        self._regions -= 1
            self._boxes.append(box)

    def breakdown(self, answer: str | None) -> RewardBreakdown:
        """The breakdown :func:`~medeyes_env.rewards.score_episode` gives for the turns so far."""
        components, total = self.components(answer)
        return RewardBreakdown(components=components, total=total, gold_regions=len(self._gold))

    def components(self, answer: str | None) -> tuple[dict[str, float], float]:
        """The breakdown's components (a new dict) and total, without building the record."""
        best_iou = 0.0 if self._best_iou is None else self._best_iou
        grounding = best_iou
        if self.config.grounding_boxes == "drill":
            grounding = 0.0 if self._best_drill is None else self._best_drill
        return weigh_components(
            self.case,
            answer,
            self.config,
            grammar=grammar_reward(self._well_formed, answered=answer is not None),
            diversity=diversity_of_counts(
                len(self._boxes), self._dissimilar, self._regions, self.config.diversity_max_regions
            ),
            grounding=grounding,
            best_iou=best_iou,
            used_tool=len(self._boxes) > 0,
            weights=self._weights,
        )

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
