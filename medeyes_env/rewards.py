"""Verifiable reward components, each a small pure function, and their weighted sum.

Paper (MedEyes, METHOD.md section 2): ``R = 0.7 r_acc + 0.2 r_grammar + 0.1 r_div``.
Ours, weight 0 by default: ``r_ground`` (best IoU of the explored boxes, or of the drilled
boxes only, against the gold regions: their shapes where a source gives them, else their
boxes) and ``r_tool`` (DeepEyes-style: 1 only when correct and a tool was used).
:data:`REWARD_PRESETS` names the weightings to compare (``paper`` is the default).
Metrics that are only logged (``token_recall``, ``best_iou``) are reported next to the
rewards in :class:`RewardBreakdown` and never enter the total.

Answer matching (:func:`accuracy_reward`):

- CLOSED: the normalised prediction must start with ``yes`` or ``no`` and must not
  contain the other word anywhere ("yes and no" scores 0: exclusivity, so hedging never pays).
- CHOICE: by letter (``B``, ``(B)``, ``B.``, ``B) text``, ``option B``, ``answer: B``; letters
  are ``A, B, C, ...`` in ``Case.options`` order, see :func:`choice_letter`), or by the
  option's text after normalisation. A letter followed by another option's text scores 0.
- OPEN: normalised exact match (or token recall, when configured).
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.cases import AnswerType, Box, Case, Region
from medeyes_env.shapes import box_shape_iou

REWARD_COMPONENTS: tuple[str, ...] = ("accuracy", "grammar", "diversity", "grounding", "tool")
"""Components that enter the total, each with a weight in :class:`RewardConfig`."""

METRIC_COMPONENTS: tuple[str, ...] = ("token_recall", "best_iou")
"""Components that are only logged (weight 0 by construction)."""

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
_UNITS += " seventeen eighteen nineteen twenty"
_TENS = "thirty forty fifty sixty seventy eighty ninety"
_NUMBER_WORDS: dict[str, str] = {word: str(i) for i, word in enumerate(_UNITS.split())} | {
    word: str(10 * i) for i, word in enumerate(_TENS.split(), 3)
}
_TENS_WORDS = frozenset(("twenty", *_TENS.split()))
_DIGIT_WORDS = frozenset(_UNITS.split()[1:10])
_ARTICLES = frozenset({"a", "an", "the"})
_APOSTROPHES = "'`\u2018\u2019\u02bc"
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL_RE = re.compile(r"(?<=\d)\.(?=\d)")
_DECIMAL_MARK = "\ue000"  # a private-use character that survives punctuation stripping


def normalize_answer(text: str) -> str:
    """Normalise an answer for matching.

    Unicode NFKC, lower case, apostrophes dropped, thousands separators dropped,
    decimal points between digits kept, every other punctuation or symbol
    character turned into a space, articles (a, an, the) removed, number words
    zero..ninety-nine turned into digits, whitespace collapsed.

    >>> normalize_answer("  The TWO nodules, left-sided. ")
    '2 nodules left sided'
    >>> normalize_answer("Crohn's disease; 1,500 cells; 2.5 cm")
    'crohns disease 1500 cells 2.5 cm'
    >>> normalize_answer("Yes."), normalize_answer("twenty-one")
    ('yes', '21')
    """
    text = unicodedata.normalize("NFKC", text).lower()
    for mark in _APOSTROPHES:
        text = text.replace(mark, "")
    text = _THOUSANDS_RE.sub("", text)
    text = _DECIMAL_RE.sub(_DECIMAL_MARK, text)
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    words: list[str] = []
    previous = ""
    for word in text.split():
        if word in _ARTICLES:
            previous = word
            continue
        if previous in _TENS_WORDS and word in _DIGIT_WORDS:
            words[-1] = words[-1][0] + _NUMBER_WORDS[word]  # "twenty one" -> "21"
        else:
            words.append(_NUMBER_WORDS.get(word, word))
        previous = word
    return " ".join(words).replace(_DECIMAL_MARK, ".")


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``xyxy`` boxes; 0.0 when either has no area.

    >>> box_iou((0, 0, 10, 10), (5, 0, 15, 10))  # overlap 50, union 150
    0.3333333333333333
    >>> box_iou((0, 0, 10, 10), (0, 0, 10, 10)), box_iou((0, 0, 1, 1), (2, 2, 3, 3))
    (1.0, 0.0)
    """
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = area_a + area_b - inter
    if not (union > 0.0) or not math.isfinite(union):
        return 0.0
    return min(1.0, inter / union)


def choice_letter(index: int) -> str:
    """The letter of option ``index`` (0-based) in a CHOICE question: ``A``, ``B``, ... ``Z``.

    >>> choice_letter(0), choice_letter(3)
    ('A', 'D')
    """
    if not 0 <= index < 26:
        raise ValueError(f"a choice index must be in 0..25, got {index}")
    return chr(ord("A") + index)


# "B", "(B)", "B.", "B)", "B:", "B. text", "(B) text", "option B", "answer: B", "the answer is (B)".
_LETTER_RE = re.compile(
    r"\A\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
    r"(?:\(([A-Za-z])\)|([A-Za-z])(?=[.):]|\s*\Z))[.):]?(.*)\Z",
    re.IGNORECASE | re.DOTALL,
)


def _choice_index(prediction: str, options: Sequence[str]) -> int | None:
    """Which option a CHOICE prediction names (by letter or by text), or None."""
    normalised_options = [normalize_answer(option) for option in options]
    match = _LETTER_RE.match(prediction)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
        index = ord(letter) - ord("A")
        if index < len(options):
            rest = normalize_answer(match.group(3))
            if rest and rest != normalised_options[index] and rest in normalised_options:
                return None  # "B. <text of option C>": contradictory
            return index
    normalised = normalize_answer(prediction)
    if normalised and normalised_options.count(normalised) == 1:
        return normalised_options.index(normalised)
    return None


def _closed_polarity(prediction: str) -> str | None:
    words = normalize_answer(prediction).split()
    if not words or words[0] not in ("yes", "no"):
        return None
    other = "no" if words[0] == "yes" else "yes"
    return None if other in words else words[0]


def token_recall(prediction: str | None, gold: str) -> float:
    """Share of the gold answer's normalised tokens (as a multiset) that the prediction contains.

    A metric, not a reward by default. An empty gold scores 1.0 only against an empty prediction.

    >>> token_recall("left lower lobe", "the left lobe")
    1.0
    >>> token_recall("right lobe", "left lower lobe")
    0.3333333333333333
    >>> token_recall(None, "lobe")
    0.0
    """
    if prediction is None:
        return 0.0
    gold_tokens = Counter(normalize_answer(gold).split())
    predicted = Counter(normalize_answer(prediction).split())
    if not gold_tokens:
        return 1.0 if not predicted else 0.0
    return sum((gold_tokens & predicted).values()) / sum(gold_tokens.values())


def accuracy_reward(
    prediction: str | None, case: Case, open_match: Literal["exact", "token_recall"] = "exact"
) -> float:
    """1.0 when the prediction answers the case correctly, else 0.0 (see the module docstring for the rules).

    With ``open_match="token_recall"``, OPEN questions score the token recall in [0, 1] instead.

    >>> from medeyes_env.cases import Case
    >>> case = Case(id="d/1", question="Which lobe?", answer="left lower lobe", answer_type="choice",
    ...             options=("right upper lobe", "left lower lobe"), source="doc")
    >>> accuracy_reward("(B)", case), accuracy_reward("Left lower lobe.", case), accuracy_reward("A", case)
    (1.0, 1.0, 0.0)
    """
    if prediction is None:
        return 0.0
    if case.answer_type is AnswerType.CLOSED:
        polarity = _closed_polarity(prediction)
        return 1.0 if polarity is not None and polarity == normalize_answer(case.answer) else 0.0
    if case.answer_type is AnswerType.CHOICE:
        index = _choice_index(prediction, case.options)
        return 1.0 if index is not None and case.options[index] == case.answer else 0.0
    if open_match == "token_recall":
        return token_recall(prediction, case.answer)
    normalised = normalize_answer(prediction)
    return 1.0 if normalised and normalised == normalize_answer(case.answer) else 0.0


def grammar_reward(turns_well_formed: Sequence[bool], answered: bool) -> float:
    """1.0 iff every turn was well formed and the episode ended with an answer; 0.0 otherwise (and for no turns).

    >>> grammar_reward([True, True, True], answered=True), grammar_reward([True, False], answered=True)
    (1.0, 0.0)
    >>> grammar_reward([True], answered=False), grammar_reward([], answered=True)
    (0.0, 0.0)
    """
    return 1.0 if answered and len(turns_well_formed) > 0 and all(turns_well_formed) else 0.0


def distinct_regions(boxes: Sequence[Box], iou_threshold: float = 0.5) -> int:
    """Number of distinct regions: connected groups of boxes linked by ``IoU >= iou_threshold``.

    Order-independent; a chain of overlapping boxes counts once.

    >>> distinct_regions([(0, 0, 10, 10), (1, 0, 11, 10), (50, 50, 60, 60)])
    2
    """
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if box_iou(boxes[i], boxes[j]) >= iou_threshold:
                parent[find(i)] = find(j)
    return len({find(i) for i in range(len(boxes))})


def diversity_reward(boxes: Sequence[Box], iou_threshold: float = 0.5, max_regions: int = 4) -> float:
    """Diversity of the explored regions, in [0, 1]: ``0.5 * pair_share + 0.5 * region_share``.

    - ``pair_share``: share of the ``n (n - 1) / 2`` unordered box pairs with ``IoU < iou_threshold``;
      0.0 when fewer than 2 boxes (no pair shows diversity).
    - ``region_share``: ``min(distinct_regions, max_regions) / max_regions``, with
      :func:`distinct_regions` at the same threshold.

    So 0 boxes -> 0.0, 1 box -> 0.125, 2 disjoint boxes -> 0.75, 4 disjoint -> 1.0, and a
    repeated box lowers the score (fewer dissimilar pairs, no new region).

    >>> diversity_reward([])
    0.0
    >>> diversity_reward([(0, 0, 10, 10)])
    0.125
    >>> diversity_reward([(0, 0, 10, 10), (20, 20, 30, 30)])
    0.75
    >>> diversity_reward([(0, 0, 10, 10), (0, 0, 10, 10), (20, 20, 30, 30)])  # 2 of 3 pairs, 2 regions
    0.5833333333333333
    """
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    n = len(boxes)
    if n == 0:
        return 0.0
    dissimilar = sum(1 for i in range(n) for j in range(i + 1, n) if box_iou(boxes[i], boxes[j]) < iou_threshold)
    return diversity_of_counts(n, dissimilar, distinct_regions(boxes, iou_threshold), max_regions)


def diversity_of_counts(boxes: int, dissimilar_pairs: int, regions: int, max_regions: int) -> float:
    """:func:`diversity_reward` from its counts: boxes, pairs with IoU under the threshold, distinct regions.

    >>> diversity_of_counts(3, 2, 2, 4)  # as diversity_reward's third example
    0.5833333333333333
    """
    if boxes == 0:
        return 0.0
    pairs = boxes * (boxes - 1) // 2
    pair_share = dissimilar_pairs / pairs if pairs else 0.0
    region_share = min(regions, max_regions) / max_regions
    return 0.5 * pair_share + 0.5 * region_share


def region_iou(box: Box, region: Region) -> float:
    """IoU of a box against a gold region: against its shape's area when it has one, else against its box.

    >>> from medeyes_env.shapes import disc_shape
    >>> round(region_iou((40, 40, 60, 60), Region(shape=disc_shape(50.0, 50.0, 10.0))), 3)
    0.784
    >>> region_iou((40, 40, 60, 60), Region(box=(40, 40, 60, 60)))
    1.0
    """
    return box_iou(box, region.box) if region.shape is None else box_shape_iou(box, region.shape)


def grounding_reward(boxes: Sequence[Box], gold: Sequence[Box | Region]) -> float:
    """Best IoU of any explored box against any gold region; 0.0 if either list is empty.

    A gold :class:`~medeyes_env.cases.Region` with a shape is scored by :func:`region_iou`
    (intersection over union of areas); a gold box, or a region with none, box against box.

    >>> grounding_reward([(0, 0, 10, 10), (40, 40, 60, 60)], [(40, 40, 60, 60)])
    1.0
    >>> grounding_reward([(0, 0, 10, 10)], [])
    0.0
    """
    return max((region_iou(b, g) if isinstance(g, Region) else box_iou(b, g) for b in boxes for g in gold), default=0.0)


def tool_reward(correct: bool, used_tool: bool) -> float:
    """DeepEyes-style tool bonus: 1.0 only when the answer is correct and a tool (scan or drill) was used.

    >>> tool_reward(True, True), tool_reward(True, False), tool_reward(False, True)
    (1.0, 0.0, 0.0)
    """
    return 1.0 if correct and used_tool else 0.0


class RewardConfig(BaseModel):
    """Weights of the reward components and their parameters (paper: 0.7 / 0.2 / 0.1)."""

    model_config = ConfigDict(frozen=True)

    accuracy: float = Field(default=0.7, ge=0.0, description="Weight of r_acc, answer correctness.")
    grammar: float = Field(default=0.2, ge=0.0, description="Weight of r_grammar, every turn follows the protocol.")
    diversity: float = Field(default=0.1, ge=0.0, description="Weight of r_div, diversity of the explored regions.")
    grounding: float = Field(
        default=0.0, ge=0.0, description="Weight of r_ground, best IoU against gold regions (ours)."
    )
    tool: float = Field(default=0.0, ge=0.0, description="Weight of r_tool, correct answer after a tool call (ours).")
    iou_threshold: float = Field(
        default=0.5, gt=0.0, le=1.0, description="IoU at or above which two boxes count as the same region (r_div)."
    )
    diversity_max_regions: int = Field(
        default=4, ge=1, description="Number of distinct regions that earns the full region share of r_div."
    )
    open_match: Literal["exact", "token_recall"] = Field(
        default="exact", description="How OPEN answers earn r_acc: normalised exact match, or token recall in [0, 1]."
    )
    grounding_boxes: Literal["explored", "drill"] = Field(
        default="explored",
        description="Boxes r_ground scores against gold: every explored box (scan and drill), or drilled boxes only "
        "(a scan that lists the right region earns nothing until the agent drills into it).",
    )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RewardConfig:
        """A named weighting from :data:`REWARD_PRESETS`, with any field overridden.

        >>> RewardConfig.preset("deepeyes").weights()
        {'accuracy': 0.8, 'grammar': 0.2, 'diversity': 0.0, 'grounding': 0.0, 'tool': 1.2}
        >>> RewardConfig.preset("paper") == RewardConfig()
        True
        """
        if name not in REWARD_PRESETS:
            close = difflib.get_close_matches(name, REWARD_PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown reward preset {name!r}; choose one of {', '.join(REWARD_PRESETS)}{hint}")
        return cls(**{**REWARD_PRESETS[name], **overrides})

    @model_validator(mode="after")
    def _some_weight(self) -> RewardConfig:
        weights = {name: getattr(self, name) for name in REWARD_COMPONENTS}
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"every reward weight is 0 ({weights}); give at least one component a positive weight")
        if not all(math.isfinite(w) for w in weights.values()):
            raise ValueError(f"reward weights must be finite, got {weights}")
        return self

    def weights(self) -> dict[str, float]:
        """The weight of each reward component, by name."""
        return {name: float(getattr(self, name)) for name in REWARD_COMPONENTS}


REWARD_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "deepeyes": {"accuracy": 0.8, "grammar": 0.2, "diversity": 0.0, "tool": 1.2},
    "paper_tool": {"tool": 1.2},
    "paper_drill_grounding": {"grounding": 0.5, "grounding_boxes": "drill"},
}
"""Named reward weightings (fields of :class:`RewardConfig` over its defaults), all measured against ``paper``.

- ``paper``: MedEyes, ``0.7 r_acc + 0.2 r_grammar + 0.1 r_div`` (the defaults).
- ``deepeyes``: DeepEyes' own reward, ``0.8 acc + 0.2 format + 1.2 * 1[tool and correct]``. Its format term
  is -1 on a format error and 0 otherwise, ours 1 and 0: a constant shift per episode, so the same
  group-relative advantages.
- ``paper_tool``: the paper's reward plus DeepEyes' bonus ``1.2 * 1[tool and correct]``.
- ``paper_drill_grounding``: the paper's reward plus ``0.5 *`` the best IoU of the drilled boxes against gold
  (ours; the weight is not tuned).
"""


class RewardBreakdown(BaseModel):
    """Every reward component and metric of one episode, and the weighted total."""

    model_config = ConfigDict(frozen=True)

    components: dict[str, float] = Field(
        description="accuracy, grammar, diversity, grounding, tool (rewards) and token_recall, best_iou (metrics)."
    )
    total: float = Field(description="Sum of weight * component over the reward components (metrics excluded).")
    gold_regions: int = Field(
        default=0, description="Number of gold regions of the case; grounding and best_iou are 0 when it is 0."
    )


def score_episode(
    case: Case,
    answer: str | None,
    turns_well_formed: Sequence[bool],
    explored_boxes: Sequence[Box],
    config: RewardConfig | None = None,
    drill_boxes: Sequence[Box] | None = None,
) -> RewardBreakdown:
    """Score one finished (or truncated, ``answer=None``) episode.

    ``turns_well_formed`` has one entry per model turn (the answer turn included);
    ``explored_boxes`` are every box executed by scan and drill, in order; ``drill_boxes`` those of the
    drills alone (needed when ``config.grounding_boxes == "drill"``). ``best_iou`` always scores every
    explored box.

    >>> from medeyes_env.cases import Case, Region
    >>> case = Case(id="d/2", question="Abnormal?", answer="yes", answer_type="closed", source="doc",
    ...             regions=(Region(box=(10, 10, 30, 30)),))
    >>> result = score_episode(case, "Yes", [True, True], [(10, 10, 30, 30)])
    >>> round(result.total, 6), result.components["diversity"], result.components["best_iou"]
    (0.9125, 0.125, 1.0)
    >>> drill_only = RewardConfig.preset("paper_drill_grounding")  # scanned the gold region, drilled elsewhere
    >>> result = score_episode(case, "Yes", [True] * 3, [(10, 10, 30, 30), (50, 50, 70, 70)], drill_only,
    ...                        drill_boxes=[(50, 50, 70, 70)])
    >>> result.components["grounding"], result.components["best_iou"]
    (0.0, 1.0)
    """
    config = config if config is not None else RewardConfig()
    gold = scoring_gold(case)
    best_iou = grounding_reward(explored_boxes, gold)
    grounding = best_iou
    if config.grounding_boxes == "drill":
        if drill_boxes is None:
            raise ValueError("RewardConfig.grounding_boxes='drill' scores the drilled boxes; pass drill_boxes=[...]")
        grounding = grounding_reward(drill_boxes, gold)
    components, total = weigh_components(
        case,
        answer,
        config,
        grammar=grammar_reward(turns_well_formed, answered=answer is not None),
        diversity=diversity_reward(explored_boxes, config.iou_threshold, config.diversity_max_regions),
        grounding=grounding,
        best_iou=best_iou,
        used_tool=len(explored_boxes) > 0,
    )
    return RewardBreakdown(components=components, total=total, gold_regions=len(gold))


def scoring_gold(case: Case) -> list[Region] | list[Box]:
    """What the case's boxes are scored against: its regions where any has a shape, else their boxes.

    Box-only gold stays on the plain box path (:func:`box_iou`); regions with a shape go through :func:`region_iou`.
    """
    return list(case.regions) if any(r.shape is not None for r in case.regions) else [r.box for r in case.regions]


def weigh_components(
    case: Case,
    answer: str | None,
    config: RewardConfig,
    *,
    grammar: float,
    diversity: float,
    grounding: float,
    best_iou: float,
    used_tool: bool,
    weights: dict[str, float] | None = None,
) -> tuple[dict[str, float], float]:
    """Every component (adding accuracy, tool and token recall to the box-based ones) and the weighted total.

    ``weights`` is ``config.weights()``, passed by a caller that asks many times.
    """
    accuracy = accuracy_reward(answer, case, open_match=config.open_match)
    recall_prediction = answer
    if answer is not None and case.answer_type is AnswerType.CHOICE:
        index = _choice_index(answer, case.options)
        recall_prediction = case.options[index] if index is not None else answer
    components = {
        "accuracy": accuracy,
        "grammar": grammar,
        "diversity": diversity,
        "grounding": grounding,
        "tool": tool_reward(correct=accuracy >= 1.0, used_tool=used_tool),
        "token_recall": token_recall(recall_prediction, case.answer),
        "best_iou": best_iou,
    }
    weights = weights if weights is not None else config.weights()
    total = sum(weights[name] * components[name] for name in REWARD_COMPONENTS)
    return components, total
