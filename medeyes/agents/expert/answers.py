"""How the expert answers: evidence from the regions it looked at, then one rule per question family.

No oracle gives answers; :func:`derive_answer` reads only the evidence (:func:`summarise`):

- ``best`` = the region with the highest final confidence (drilled if drilled, else scanned);
  a region is *positive* when its final confidence is >= ``presence_threshold``.
- presence / closed questions ("Is there a lesion?"): yes iff ``best`` is positive.
- count: the number of distinct positive regions (``count_threshold``).
- location / side / quadrant / organ-by-position: the option or phrase that names where ``best``'s centre
  lies (image halves and thirds; ``side_convention`` says whether "left" means the image's or the patient's).
- anything regions cannot inform (modality, ...): the oracle's ``read`` (the annotation oracle returns the
  gold with probability ``fact_accuracy``; the image oracle cannot read and the expert falls back to the
  first option / "yes" / "unknown").

The rules are a table (:data:`FAMILY_RULES`, then :data:`FALLBACK_RULES`), each a short function of one
:class:`Reading`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medeyes.agents.expert.config import ExpertConfig
from medeyes.agents.expert.oracles.base import RegionOracle
from medeyes_env.cases import AnswerType, Box, Case
from medeyes_env.rewards import box_iou, normalize_answer


@dataclass
class RegionBelief:
    """One candidate region in ``R_t`` with its confidence history."""

    box: Box
    scanned: float
    """Scan confidence (mean over the scans that saw it)."""
    looks: int = 1
    drilled: float | None = None
    """Latest drilled confidence, None while undrilled."""
    label: str | None = None
    parent_box: Box | None = None
    """For a drilled sub-region: the box of the region it was cut from."""
    size_estimate: float | None = None
    """The oracle's estimate of the finding's diameter in pixels, when it gives one."""

    @property
    def region_box(self) -> Box:
        """The whole region (a sub-region's parent box), for questions about extent and shape."""
        return self.parent_box if self.parent_box is not None else self.box

    @property
    def extent(self) -> float:
        """Diameter of the finding in pixels: the oracle's estimate, else the region box's shorter side."""
        if self.size_estimate is not None:
            return self.size_estimate
        x1, y1, x2, y2 = self.region_box
        return min(x2 - x1, y2 - y1)

    @property
    def confidence(self) -> float:
        """``C_t(r)``: the drilled confidence when there is one, else the scan's."""
        return self.drilled if self.drilled is not None else self.scanned


def same_region(a: Box, b: Box, iou: float = 0.3) -> bool:
    """Whether two boxes show the same region: IoU >= ``iou``, or centres closer than half their mean side.

    The centre rule keeps two noisy looks at one small finding together when their IoU is low.

    >>> same_region((0, 0, 20, 20), (5, 5, 25, 25)), same_region((0, 0, 20, 20), (40, 0, 60, 20))
    (True, False)
    """
    if box_iou(a, b) >= iou:
        return True
    side = (a[2] - a[0] + a[3] - a[1] + b[2] - b[0] + b[3] - b[1]) / 4
    distance = math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
    return distance < 0.5 * side


_SIDE_WORDS = {"left", "right"}
_VERTICAL_WORDS = {"upper", "lower", "top", "bottom", "superior", "inferior", "middle", "central", "centre", "center"}
_COUNT_RE = re.compile(r"\bhow many\b|\bnumber of\b|\bcount\b", re.IGNORECASE)
_LOCATION_RE = re.compile(r"\bwhere\b|\bwhich (side|half|quadrant|part|lobe|region|lung)\b|\blocated\b", re.IGNORECASE)
_PRESENCE_RE = re.compile(r"\b(is|are) there\b|\bany\b|\babnormal|\bpresent\b|\bvisible\b", re.IGNORECASE)


def position_words(box: Box, image_size: tuple[int, int], side_convention: str = "image") -> dict[str, str]:
    """Where a box's centre lies: ``side`` (left/right), ``vertical`` (upper/middle/lower), ``half`` (upper/lower).

    >>> position_words((0, 0, 10, 10), (100, 100))
    {'side': 'left', 'vertical': 'upper', 'half': 'upper'}
    >>> position_words((0, 0, 10, 10), (100, 100), "patient")["side"]
    'right'
    """
    cx = (box[0] + box[2]) / 2 / image_size[0]
    cy = (box[1] + box[3]) / 2 / image_size[1]
    side = "left" if cx < 0.5 else "right"
    if side_convention == "patient":
        side = "right" if side == "left" else "left"
    vertical = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "middle")
    return {"side": side, "vertical": vertical, "half": "upper" if cy < 0.5 else "lower"}


def _location_score(option: str, where: dict[str, str]) -> float:
    words = set(normalize_answer(option).split())
    score = 0.0
    if words & _SIDE_WORDS:
        score += 1.0 if where["side"] in words else -1.0
    vertical = words & _VERTICAL_WORDS
    if vertical:
        synonyms = {
            "upper": {"upper", "top", "superior"},
            "lower": {"lower", "bottom", "inferior"},
            "middle": {"middle", "central", "centre", "center"},
        }
        hit = vertical & synonyms[where["vertical"]] or vertical & synonyms[where["half"]]
        score += 1.0 if hit else -1.0
    return score


@dataclass(frozen=True)
class Evidence:
    """What the expert saw, summarised for answering."""

    best: RegionBelief | None
    """Where the finding most likely is: the most confident positive drilled region, else the most
    confident region of all."""
    present: bool
    """A finding was seen (see :func:`summarise`)."""
    positives: list[RegionBelief]
    """Distinct regions whose confidence reaches ``count_threshold``."""
    regions: list[RegionBelief]


def summarise(regions: list[RegionBelief], config: ExpertConfig) -> Evidence:
    """Best region, presence and the distinct positive regions of ``R_t``.

    Presence: with ``trust_drills`` and at least one drilled region, a drilled confidence must reach
    ``presence_threshold`` (a close look outranks the overview); otherwise any region's confidence.
    """
    ordered = sorted(regions, key=lambda r: -r.confidence)
    drilled = [r for r in ordered if r.drilled is not None]
    if drilled and config.trust_drills:
        present = drilled[0].confidence >= config.presence_threshold
    else:
        present = bool(ordered) and ordered[0].confidence >= config.presence_threshold
    if drilled and drilled[0].confidence >= config.presence_threshold:
        best: RegionBelief | None = drilled[0]
    else:
        best = ordered[0] if ordered else None
    positives: list[RegionBelief] = []
    for region in ordered:
        if region.confidence < config.count_threshold:
            continue
        if any(same_region(region.box, other.box, config.merge_iou) for other in positives):
            continue
        positives.append(region)
    return Evidence(best, present, positives, ordered)


def question_family(case: Case) -> str:
    """The question's family: ``meta['family']`` when the source gives one, else guessed from its wording."""
    family = case.meta.get("family")
    if isinstance(family, str) and family:
        return family
    if _COUNT_RE.search(case.question):
        return "count"
    if _LOCATION_RE.search(case.question):
        return "location"
    if case.answer_type is AnswerType.CLOSED and _PRESENCE_RE.search(case.question):
        return "presence"
    return "other"


ORGAN_ATLAS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "ct": {
        # Axial abdomen at the level of the kidneys, radiological convention (patient's right on the image's
        # left): (centre u, centre v, half-width, half-height) in image fractions.
        "liver": (0.33, 0.42, 0.2, 0.22),
        "spleen": (0.8, 0.53, 0.07, 0.12),
        "kidney": (0.5, 0.61, 0.2, 0.07),
    }
}
"""Where each organ lies in a typical image of a modality: the anatomy a reader brings to an organ question."""

REGION_FAMILIES = frozenset({"presence", "location", "organ", "finding", "count", "size"})
"""Families answered from regions only: the oracle's ``read`` is never asked about them."""

_ORGAN_SYNONYMS = {"kidney": ("kidney", "kidneys", "renal"), "liver": ("liver", "hepatic"), "spleen": ("spleen",)}
_EXTENDED_FINDINGS = {"upper": "pneumothorax", "lower": "pleural effusion"}
_MODALITY_WORDS = {
    "xray": ("x-ray", "xray", "x ray", "radiograph", "cr", "dx"),
    "ct": ("ct", "computed tomography"),
    "mri": ("mri", "mr", "magnetic resonance"),
}
_SIZE_RE = re.compile(r"small:\s*under\s*(\d+(?:\.\d+)?)\s*px.*?large:\s*over\s*(\d+(?:\.\d+)?)\s*px", re.I | re.S)


def atlas_organ(box: Box, image_size: tuple[int, int], modality: str, candidates: Sequence[str] = ()) -> str | None:
    """The organ of :data:`ORGAN_ATLAS` whose ellipse is nearest (in its own radii) to the box's centre.

    >>> atlas_organ((810, 520, 830, 560), (1024, 1024), "ct")
    'spleen'
    """
    atlas = ORGAN_ATLAS.get(modality.lower())
    if not atlas:
        return None
    u = (box[0] + box[2]) / 2 / image_size[0]
    v = (box[1] + box[3]) / 2 / image_size[1]
    names = [n for n in atlas if not candidates or any(_same_organ(n, c) for c in candidates)] or list(atlas)
    return min(names, key=lambda n: math.hypot((u - atlas[n][0]) / atlas[n][2], (v - atlas[n][1]) / atlas[n][3]))


def _same_organ(atlas_name: str, text: str) -> bool:
    words = set(normalize_answer(text).split())
    return bool(words & set(_ORGAN_SYNONYMS.get(atlas_name, (atlas_name,))))


def size_class(diameter: float, question: str, image_size: tuple[int, int]) -> str:
    """Small / medium / large for a finding ``diameter`` px across, with thresholds read from the question.

    Falls back to 24 and 48 px of a 1024 px image when the question states none.

    >>> size_class(30, "small: under 24 px (about 8 mm); medium: 24 to 48 px; large: over 48 px", (1024, 1024))
    'medium'
    """
    match = _SIZE_RE.search(question)
    if match:
        small, large = float(match.group(1)), float(match.group(2))
    else:
        scale = max(image_size) / 1024
        small, large = 24 * scale, 48 * scale
    return "small" if diameter < small else ("large" if diameter > large else "medium")


def _match_option(value: str, options: Sequence[str]) -> str | None:
    target = normalize_answer(value)
    for option in options:
        if normalize_answer(option) == target:
            return option
    for option in options:
        if target and (target in normalize_answer(option) or normalize_answer(option) in target):
            return option
    return None


def _recorded_modality(case: Case, options: Sequence[str]) -> str | None:
    """The modality recorded with the case (privileged, like the annotations), phrased as an option or a word.

    The environment's prompt does not state it: a policy must read the modality from the pixels.
    """
    words = _MODALITY_WORDS.get(case.modality.lower())
    if not words:
        return None
    if options:
        for option in options:
            if normalize_answer(option) in {normalize_answer(w) for w in words}:
                return option
        return None
    return normalize_answer(words[0]) if case.modality.lower() != "xray" else "x-ray"


@dataclass(frozen=True)
class Reading:
    """Everything an answer rule may read: never ``case.answer``."""

    case: Case
    family: str
    """:func:`question_family`, lower-cased."""
    evidence: Evidence
    options: list[str]
    size: tuple[int, int]
    """The image's (width, height)."""
    config: ExpertConfig
    oracle: RegionOracle
    image: Image.Image
    rng: np.random.Generator


Answer = tuple[str, str]
"""The answer and a short justification, narrated as "<why>, so the answer is <answer>"."""

AnswerRule = Callable[[Reading], tuple[str, str] | None]
"""A rule answers, or returns None to let the next rule try."""


def _count_rule(r: Reading) -> Answer:
    count = len(r.evidence.positives)
    return _pick_number(count, r.case), f"{count} region(s) held a confidence of {r.config.count_threshold:.2f} or more"


def _location_rule(r: Reading) -> Answer | None:
    best = r.evidence.best
    if best is None:
        return None
    where = position_words(best.box, r.size, r.config.side_convention)
    if not r.options:
        return where["side"], f"the strongest region lies on the image's {where['side']}"
    scores = [_location_score(option, where) for option in r.options]
    if max(scores) > 0:
        return r.options[int(np.argmax(scores))], f"the strongest region lies {where['vertical']} {where['side']}"
    return None


def _organ_rule(r: Reading) -> Answer | None:
    if r.evidence.best is None:
        return None
    organ = atlas_organ(r.evidence.best.box, r.size, r.case.modality, r.options)
    if organ is None:
        return None
    chosen = next((o for o in r.options if _same_organ(organ, o)), None) if r.options else organ
    return (chosen, f"the strongest region sits where the {organ} lies") if chosen else None


def _finding_rule(r: Reading) -> Answer | None:
    if r.evidence.best is None:
        return None
    x1, y1, x2, y2 = r.evidence.best.region_box
    if min(x2 - x1, y2 - y1) >= 0.08 * max(r.size):  # extended: effusion or pneumothorax by its height
        half = "upper" if (y1 + y2) / 2 < 0.45 * r.size[1] else "lower"
        kind, why = _EXTENDED_FINDINGS[half], f"the abnormal area is broad and in the {half} chest"
    else:
        kind, why = "nodule", "the abnormality is small and round"
    chosen = _match_option(kind, r.options) if r.options else kind
    return (chosen, why) if chosen else None


def _size_rule(r: Reading) -> Answer | None:
    if r.evidence.best is None:
        return None
    diameter = r.evidence.best.extent
    label = size_class(diameter, r.case.question, r.size)
    chosen = _match_option(label, r.options) if r.options else label
    return (chosen, f"the finding measures about {diameter:.0f} px across") if chosen else None


def _modality_rule(r: Reading) -> Answer | None:
    stated = _recorded_modality(r.case, r.options) if "modality" in r.case.question.lower() else None
    return (stated, f"the study is labelled {r.case.modality}") if stated else None


FAMILY_RULES: dict[str, AnswerRule] = {
    "count": _count_rule,
    "location": _location_rule,
    "organ": _organ_rule,
    "finding": _finding_rule,
    "size": _size_rule,
    "modality": _modality_rule,
}
"""The rule of each question family that has one; when it returns None the :data:`FALLBACK_RULES` answer."""


def _modality_asked(r: Reading) -> Answer | None:
    return _modality_rule(r) if r.family == "other" and "modality" in r.case.question.lower() else None


def _presence(r: Reading) -> Answer | None:
    if r.case.answer_type is not AnswerType.CLOSED or r.family not in ("presence", "other", "finding"):
        return None
    confidence = r.evidence.best.confidence if r.evidence.best is not None else 0.0
    return ("yes" if r.evidence.present else "no"), f"the best region's confidence is {confidence:.2f}"


def _read_from_image(r: Reading) -> Answer | None:
    if r.family in REGION_FAMILIES:
        return None
    focus = r.evidence.best.box if r.evidence.best is not None else None
    read = r.oracle.read(r.image, r.case.question, r.options, focus=focus, case=r.case, rng=r.rng)
    return (read, "read from the image") if read else None


def _default(r: Reading) -> Answer:
    if r.case.answer_type is AnswerType.CLOSED:
        return ("yes" if r.evidence.present else "no"), "no direct reading; answered from the presence of a finding"
    if r.options:
        return r.options[0], "no reading available; first option by default"
    return "unknown", "no reading available"


FALLBACK_RULES: tuple[AnswerRule, ...] = (_modality_asked, _presence, _read_from_image, _default)
"""Tried in order after the family's rule: the last always answers."""


def derive_answer(
    case: Case,
    evidence: Evidence,
    oracle: RegionOracle,
    image: Image.Image,
    config: ExpertConfig,
    rng: np.random.Generator,
) -> Answer:
    """The expert's answer and a short justification, read from the evidence (see the module docstring).

    ``case`` supplies the question, its answer type, options (all in the prompt), the recorded modality and the
    question family; ``case.answer`` is never read here.
    """
    family = question_family(case).lower()
    reading = Reading(case, family, evidence, list(case.options), image.size, config, oracle, image, rng)
    family_rule = FAMILY_RULES.get(family)
    for rule in (*([family_rule] if family_rule else []), *FALLBACK_RULES):
        answer = rule(reading)
        if answer is not None:
            return answer
    raise AssertionError("the last fallback rule always answers")


def _pick_number(count: int, case: Case) -> str:
    if case.answer_type is AnswerType.CHOICE:
        for option in case.options:
            if normalize_answer(option) == str(count):
                return option
        numeric = [(abs(int(n) - count), o) for o in case.options if (n := normalize_answer(o)).isdigit()]
        if numeric:
            return min(numeric)[1]
    if case.answer_type is AnswerType.CLOSED:
        return "yes" if count > 0 else "no"
    return str(count)
