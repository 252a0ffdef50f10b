"""The expert: GRN (Gaze-guided Reasoning Navigator) with CVS (Confidence Value Sampler), METHOD.md sections 3-4.

The expert is an :class:`~medeyes.agents.base.Agent`: each turn it speaks protocol text
(:func:`~medeyes_env.protocol.render_turn`) that :class:`~medeyes_env.env.MedEyesEnv` executes and scores
with the same rewards as the policy. Behind the text is a region oracle
(:mod:`medeyes.agents.oracles`) and the GRN state ``psi_t = (R_t, C_t, F_t)``: candidate regions, their
confidences and the mode, kept per episode in ``EpisodeContext.state["grn"]``.

One turn of GRN (``t`` tool turns taken, ``T = min(T_max, env max_steps)``):

1. Terminate (answer) when the last drill's confidence reached ``xi``, or ``t == T``, or nothing is left
   to look at.
2. Mode ``scan``: ask the oracle to scan, merge its candidates into ``R_t, C_t`` (a candidate matching a
   known region by IoU >= ``merge_iou`` updates it, a drilled region keeps its drilled confidence), show the
   ``max_regions`` most confident undrilled regions in one ``scan`` action, switch to ``drill``.
3. Mode ``drill``: pick region ``i`` by CVS (nucleus sampling over ``softmax(C / temperature)`` with mass
   ``p0``; greedy argmax without CVS); drill it and read ``c_{t+1}(r_i)`` from the oracle. The information
   gain ``dc = (c_{t+1} - c_t) / (c_t + eps)`` decides the next mode: ``dc >= delta`` keeps drilling, into the
   sub-region of ``r_i`` (one of five sub-boxes, ``sub_region_scale`` of its side, chosen by CVS over the
   oracle's confidences in the view already at hand) -- else back to ``scan``.

Ablations (``ExpertConfig.mode``): ``full`` (the above), ``scan_only`` (every tool turn is a scan; evidence is
the scans' confidences, averaged over repeated looks), ``drill_only`` (no scan turns: the oracle's candidates
are ranked silently and drilled one after another), ``greedy`` (without CVS: argmax choices, one
trajectory), ``random`` (the full expert's action sequence, lengths and box sizes, with every box moved to a
uniformly random place; the answer comes from what the oracle saw in those boxes).

How the expert ANSWERS (no oracle gives answers; :func:`derive_answer` reads only the evidence):

- ``best`` = the region with the highest final confidence (drilled if drilled, else scanned);
  a region is *positive* when its final confidence is >= ``presence_threshold``.
- presence / closed questions ("Is there a lesion?"): yes iff ``best`` is positive.
- count: the number of distinct positive regions (``count_threshold``).
- location / side / quadrant / organ-by-position: the option or phrase that names where ``best``'s centre
  lies (image halves and thirds; ``side_convention`` says whether "left" means the image's or the patient's).
- anything regions cannot inform (modality, ...): the oracle's ``read`` (the annotation oracle returns the
  gold with probability ``fact_accuracy``; the image oracle cannot read and the expert falls back to the
  first option / "yes" / "unknown").

The expert never reads ``case.answer``; only the annotation oracle does, through its noise model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.base import EpisodeContext, TurnOutput
from medeyes.agents.oracles import RegionOracle, ScoredRegion, make_oracle
from medeyes_env.cases import AnswerType, Box, Case
from medeyes_env.errors import ConfigError
from medeyes_env.protocol import Action, render_turn
from medeyes_env.rewards import box_iou, normalize_answer
from medeyes_env.views import clamp_box

ExpertMode = Literal["full", "scan_only", "drill_only", "greedy", "random"]
EXPERT_MODES: tuple[str, ...] = ("full", "scan_only", "drill_only", "greedy", "random")


class ExpertConfig(BaseModel):
    """GRN + CVS constants (paper values as defaults) and our own choices where the paper is silent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: ExpertMode = Field(
        default="full",
        description="full (GRN+CVS), scan_only, drill_only, greedy (without CVS), random (random boxes, same lengths).",
    )
    delta: float = Field(default=0.15, description="Information-gain threshold to keep drilling (paper 0.15).")
    eps: float = Field(default=1e-6, gt=0.0, description="Epsilon in the information gain's denominator (paper 1e-6).")
    max_regions: int = Field(default=5, ge=1, le=5, description="Most regions shown in one scan (paper 5).")
    t_max: int = Field(default=4, ge=1, le=32, description="T_max: most tool turns before answering (paper 4).")
    p0: float = Field(default=0.9, gt=0.0, le=1.0, description="CVS nucleus mass (paper 0.9).")
    temperature: float = Field(default=0.2, gt=0.0, description="CVS softmax temperature over confidences (ours).")
    xi: float = Field(default=0.85, ge=0.0, le=1.0, description="Answer once a drilled confidence reaches xi (0.85).")
    n_expert: int = Field(default=6, ge=1, le=64, description="Trajectories drawn per case (paper 6).")
    keep_only_correct: bool = Field(default=True, description="Store only trajectories whose answer is correct.")
    presence_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Final confidence at which a region counts as abnormal (ours)."
    )
    count_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Final confidence at which a region is counted (ours)."
    )
    merge_iou: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="Two boxes are one region at this IoU, or when their centres are within half a box side.",
    )
    sub_region_scale: float = Field(
        default=0.6, gt=0.1, lt=1.0, description="Side of a drilled sub-region relative to its parent region (ours)."
    )
    side_convention: Literal["image", "patient"] = Field(
        default="image", description="Whether 'left' in a question means the image's left or the patient's left."
    )
    trust_drills: bool = Field(
        default=True, description="Answer from the best drilled region when any was drilled, not a scanned one (ours)."
    )
    empty_scan_retries: int = Field(
        default=2, ge=0, le=10, description="Extra looks when a scan finds nothing, before concluding there is nothing."
    )
    random_box_range: tuple[float, float] = Field(
        default=(0.02, 0.3),
        description="Random mode: box side range as a fraction of the image's shorter side (log-uniform).",
    )
    global_questions: Literal["look", "answer"] = Field(
        default="look",
        description="Questions no region can inform (modality, ...): look (scan and drill like any other) or "
        "answer from the overview at once (what an information-gain navigator does when regions add nothing).",
    )
    seed: int = Field(default=0, description="Base seed; each episode's stream also mixes in its episode seed.")


# ----------------------------------------------------------------------------------------------------------------------
# GRN state
# ----------------------------------------------------------------------------------------------------------------------


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


@dataclass
class GRNState:
    """``psi_t = (R_t, C_t, F_t)`` and the bookkeeping one episode needs."""

    rng: np.random.Generator
    """Draws the oracle's noise and CVS choices."""
    words: np.random.Generator
    """Draws the phrasing of the notes (its own stream, so wording never changes what the expert does)."""
    regions: list[RegionBelief] = field(default_factory=list)
    mode: Literal["scan", "drill"] = "scan"
    tool_steps: int = 0
    focus: int | None = None
    """Index of the region being drilled (refined)."""
    refine: bool = False
    """The last drill gained >= delta: the next drill goes into a sub-region of ``focus``."""
    stop: bool = False
    last_event: dict[str, Any] | None = None
    """What the previous tool turn revealed, narrated in this turn's reasoning."""
    plan: list[tuple[str, int]] | None = None
    """Random mode: the full expert's action names and box counts, replayed with random boxes."""
    events: list[dict[str, Any]] = field(default_factory=list)
    answered: str | None = None


def nucleus_choice(confidences: Sequence[float], rng: np.random.Generator | None, temperature: float, p0: float) -> int:
    """CVS: sample an index by nucleus sampling over ``softmax(confidences / temperature)``; argmax without ``rng``.

    Keeps the smallest set of top indices whose probability reaches ``p0``, renormalises, draws one.

    >>> nucleus_choice([0.2, 0.9, 0.3], None, 0.2, 0.9)
    1
    >>> nucleus_choice([0.9, 0.1], np.random.default_rng(0), 0.05, 0.9)  # 0.1 falls outside the nucleus
    0
    """
    if not confidences:
        raise ValueError("nucleus_choice needs at least one confidence")
    values = np.asarray(confidences, dtype=np.float64)
    if rng is None:
        return int(np.argmax(values))
    logits = values / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, p0 - 1e-12)) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[int(rng.choice(len(keep), p=kept))])


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


def information_gain(before: float, after: float, eps: float = 1e-6) -> float:
    """``dc = (c_{t+1} - c_t) / (c_t + eps)``.

    >>> round(information_gain(0.5, 0.8), 6)
    0.599999
    """
    return (after - before) / (before + eps)


def sub_regions(box: Box, scale: float, image_size: tuple[int, int]) -> list[Box]:
    """Five sub-boxes of ``box`` with sides ``scale`` times its own: four corners and the centre.

    >>> sub_regions((0, 0, 10, 10), 0.5, (100, 100))[4]
    (2.5, 2.5, 7.5, 7.5)
    """
    x1, y1, x2, y2 = box
    w, h = (x2 - x1) * scale, (y2 - y1) * scale
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    corners = [(x1, y1), (x2 - w, y1), (x1, y2 - h), (x2 - w, y2 - h), (cx - w / 2, cy - h / 2)]
    return [clamp_box((a, b, a + w, b + h), image_size) for a, b in corners]


# ----------------------------------------------------------------------------------------------------------------------
# Reading answers from the evidence
# ----------------------------------------------------------------------------------------------------------------------

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


def derive_answer(
    case: Case,
    evidence: Evidence,
    oracle: RegionOracle,
    image: Image.Image,
    config: ExpertConfig,
    rng: np.random.Generator,
) -> tuple[str, str]:
    """The expert's answer and a short justification, read from the evidence (see the module docstring).

    ``case`` supplies the question, its answer type, options (all in the prompt), the recorded modality and the
    question family; ``case.answer`` is never read here.
    """
    family = question_family(case).lower()
    best = evidence.best
    present = evidence.present
    options = list(case.options)
    size = image.size

    if family == "count":
        count = len(evidence.positives)
        return _pick_number(count, case), f"{count} region(s) held a confidence of {config.count_threshold:.2f} or more"

    if family == "location" and best is not None:
        where = position_words(best.box, size, config.side_convention)
        if options:
            scores = [_location_score(option, where) for option in options]
            if max(scores) > 0:
                return options[int(np.argmax(scores))], f"the strongest region lies {where['vertical']} {where['side']}"
        else:
            return where["side"], f"the strongest region lies on the image's {where['side']}"

    if family == "organ" and best is not None:
        organ = atlas_organ(best.box, size, case.modality, options)
        if organ is not None:
            chosen = next((o for o in options if _same_organ(organ, o)), None) if options else organ
            if chosen:
                return chosen, f"the strongest region sits where the {organ} lies"

    if family == "finding" and best is not None:
        x1, y1, x2, y2 = best.region_box
        extended = min(x2 - x1, y2 - y1) >= 0.08 * max(size)
        if extended:
            half = "upper" if (y1 + y2) / 2 < 0.45 * size[1] else "lower"
            kind = _EXTENDED_FINDINGS[half]
            why = f"the abnormal area is broad and in the {half} chest"
        else:
            kind, why = "nodule", "the abnormality is small and round"
        chosen = _match_option(kind, options) if options else kind
        if chosen:
            return chosen, why

    if family == "size" and best is not None:
        diameter = best.extent
        label = size_class(diameter, case.question, size)
        chosen = _match_option(label, options) if options else label
        if chosen:
            return chosen, f"the finding measures about {diameter:.0f} px across"

    if family == "modality" or (family == "other" and "modality" in case.question.lower()):
        stated = _recorded_modality(case, options) if "modality" in case.question.lower() else None
        if stated:
            return stated, f"the study is labelled {case.modality}"

    if case.answer_type is AnswerType.CLOSED and family in ("presence", "other", "finding"):
        confidence = best.confidence if best is not None else 0.0
        return ("yes" if present else "no"), f"the best region's confidence is {confidence:.2f}"

    if family not in REGION_FAMILIES:
        focus = best.box if best is not None else None
        read = oracle.read(image, case.question, options, focus=focus, case=case, rng=rng)
        if read:
            return read, "read from the image"
    if case.answer_type is AnswerType.CLOSED:
        return ("yes" if present else "no"), "no direct reading; answered from the presence of a finding"
    if options:
        return options[0], "no reading available; first option by default"
    return "unknown", "no reading available"


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


# ----------------------------------------------------------------------------------------------------------------------
# Narration: reasoning text from what the oracle saw
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(box: Box) -> str:
    return "[" + ", ".join(str(round(v)) for v in box) + "]"


def _where(box: Box, size: tuple[int, int]) -> str:
    w = position_words(box, size)
    return f"{w['vertical']} {w['side']}" if w["vertical"] != "middle" else f"central {w['side']}"


class Narrator:
    """Clinician-style notes from oracle events; phrasing varies with the episode's random stream."""

    OPENINGS = (
        "Survey of the {modality} image for: {question}",
        "Working question: {question} First a look over the whole {modality} image.",
        "Reading the {modality} study with this question in mind: {question}",
    )
    SCAN = (
        "{n} candidate region(s) stand out; the most suspicious is {where} at {box} (confidence {c:.2f}). "
        "Comparing them side by side.",
        "I count {n} area(s) worth a closer look, led by the {where} one at {box} ({c:.2f}). Scanning them together.",
        "Candidates: {listing}. Putting them next to each other before choosing one.",
    )
    RESCAN = (
        "Back to surveying: {n} region(s) not yet examined, best {where} at {box} ({c:.2f}).",
        "Widening the search again; {n} remaining candidate(s), the strongest {where} at {box} ({c:.2f}).",
    )
    DRILL = (
        "Region {box} ({where}) has the highest confidence so far, {c:.2f}; zooming in at full resolution.",
        "Drilling into the {where} region {box}, confidence {c:.2f}, to see its detail.",
        "The {where} candidate {box} deserves a close look (confidence {c:.2f}).",
    )
    DRILL_SAMPLED = (
        "Of the leading candidates, the {where} region {box} ({c:.2f}) gets the first close look.",
        "Not the top score, but worth checking: zooming into the {where} region {box} ({c:.2f}).",
    )
    REFINE = (
        "Narrowing to the {part} part of it, {box}, where the finding seems to sit ({c:.2f}).",
        "Zooming further into {box}, the {part} portion of the region ({c:.2f}).",
    )
    GAIN = (
        "The zoomed view of {box} raised the confidence from {a:.2f} to {b:.2f} ({dc:+.0%}).",
        "Up close, {box} looks more convincing: {a:.2f} -> {b:.2f} ({dc:+.0%}).",
    )
    DROP = (
        "At full resolution {box} is less convincing: {a:.2f} -> {b:.2f} ({dc:+.0%}); probably a normal structure.",
        "The detail of {box} does not hold up ({a:.2f} -> {b:.2f}, {dc:+.0%}).",
    )
    SCANNED = (
        "The side-by-side views put {box} first at {c:.2f}.",
        "Across the scanned regions, {box} remains the strongest ({c:.2f}).",
    )
    ANSWER = (
        "Summary: {summary}. Conclusion: {why}.",
        "Putting it together ({summary}): {why}.",
        "Findings: {summary}. Hence: {why}.",
    )

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def pick(self, templates: Sequence[str], **values: Any) -> str:
        """One template, chosen at random, filled in."""
        return templates[int(self.rng.integers(len(templates)))].format(**values)


def _part_name(parent: Box, child: Box) -> str:
    pcx, pcy = (parent[0] + parent[2]) / 2, (parent[1] + parent[3]) / 2
    ccx, ccy = (child[0] + child[2]) / 2, (child[1] + child[3]) / 2
    w, h = parent[2] - parent[0], parent[3] - parent[1]
    if abs(ccx - pcx) < 0.05 * w and abs(ccy - pcy) < 0.05 * h:
        return "central"
    return ("upper" if ccy < pcy else "lower") + "-" + ("left" if ccx < pcx else "right")


# ----------------------------------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------------------------------


class ExpertAgent:
    """GRN + CVS over a region oracle, speaking the environment's text protocol (module docstring)."""

    def __init__(self, oracle: RegionOracle | str = "annotation", config: ExpertConfig | None = None) -> None:
        self.oracle = make_oracle(oracle) if isinstance(oracle, str) else oracle
        self.config = config or ExpertConfig()
        self.name = "expert" if self.config.mode != "random" else "expert-random"

    @property
    def samples_per_case(self) -> int:
        """Trajectories the expert wants per case (``n_expert``; 1 without CVS, whose choices are all argmax)."""
        return 1 if self.config.mode == "greedy" else self.config.n_expert

    def describe(self) -> dict[str, Any]:
        """Producer description stored on every trajectory."""
        return {
            "kind": "expert" if self.config.mode != "random" else "random",
            "name": self.name,
            "oracle": self.oracle.name,
            "config": {"expert": self.config.model_dump(), "oracle": self.oracle.describe()},
        }

    def act(self, batch: list[EpisodeContext]) -> list[TurnOutput]:
        """The next turn of every episode."""
        return [TurnOutput(text=self._turn(context), finish_reason="stop") for context in batch]

    # -- one turn ------------------------------------------------------------------------------------

    def _state(self, context: EpisodeContext) -> GRNState:
        state = context.state.get("grn")
        if state is None:
            episode_seed = int(context.state.get("seed", context.episode_id))
            rng = np.random.default_rng([self.config.seed, episode_seed & 0xFFFFFFFF, 0x6E5])
            words = np.random.default_rng([self.config.seed, episode_seed & 0xFFFFFFFF, 0x7E7])
            state = GRNState(rng=rng, words=words)
            context.state["grn"] = state
            if self.config.mode == "random":
                state.plan = self._shadow_plan(context, episode_seed)
        return state

    def _turn(self, context: EpisodeContext) -> str:
        state = self._state(context)
        narrator = Narrator(state.words)
        case, image = context.case, context.image
        budget = min(self.config.t_max, context.max_steps)
        prefix = ""
        if state.tool_steps == 0 and state.last_event is None:
            prefix = narrator.pick(
                Narrator.OPENINGS,
                modality=_MODALITY_NAMES.get(
                    case.modality.lower(), case.modality if case.modality != "unknown" else ""
                ),
                question=_clip(case.question, 140),
            ).replace("  ", " ")
        else:
            prefix = self._narrate_event(narrator, state, image.size)
        state.last_event = None
        if self.config.global_questions == "answer" and question_family(case).lower() not in REGION_FAMILIES:
            state.stop = True
        if state.stop or state.tool_steps >= budget:
            return self._answer(context, state, narrator, prefix)
        if self.config.mode == "random":
            action, plan_text = self._random_step(context, state)
        elif self.config.mode == "scan_only" or (state.mode == "scan" and self.config.mode != "drill_only"):
            action, plan_text = self._scan_step(context, state, narrator)
        else:
            action, plan_text = self._drill_step(context, state, narrator)
        if action is None:
            return self._answer(context, state, narrator, prefix)
        state.tool_steps += 1
        state.events.append({"action": action.name, "boxes": [list(b) for b in action.boxes]})
        return render_turn(action, _join(prefix, plan_text), context.box_format, context.image.size)

    def _oracle_scan(self, context: EpisodeContext, state: GRNState) -> list[ScoredRegion]:
        return self.oracle.scan(context.image, context.case.question, case=context.case, rng=state.rng)

    def _merge(self, state: GRNState, found: list[ScoredRegion]) -> None:
        for region in found:
            match = None
            for belief in state.regions:
                if same_region(belief.box, region.box, self.config.merge_iou):
                    match = belief
                    break
            if match is None:
                state.regions.append(
                    RegionBelief(region.box, region.confidence, label=region.label, size_estimate=region.extent)
                )
            else:
                match.scanned = (match.scanned * match.looks + region.confidence) / (match.looks + 1)
                match.looks += 1

    def _scan_step(self, context: EpisodeContext, state: GRNState, narrator: Narrator) -> tuple[Action | None, str]:
        cfg = self.config
        for _ in range(1 + cfg.empty_scan_retries):
            found = self._oracle_scan(context, state)
            if found:
                break
        self._merge(state, found)
        undrilled = sorted((r for r in state.regions if r.drilled is None), key=lambda r: -r.scanned)
        shown = undrilled[: cfg.max_regions]
        if not shown:
            state.stop = True
            return None, ""
        size = context.image.size
        top = shown[0]
        listing = ", ".join(f"{_fmt(r.box)} ({r.scanned:.2f})" for r in shown)
        templates = Narrator.RESCAN if state.tool_steps > 0 else Narrator.SCAN
        text = narrator.pick(
            templates, n=len(shown), where=_where(top.box, size), box=_fmt(top.box), c=top.scanned, listing=listing
        )
        if cfg.mode == "scan_only":
            best = max(state.regions, key=lambda r: r.scanned)
            state.last_event = {"kind": "scanned", "box": best.box, "c": best.scanned}
            if best.scanned >= cfg.xi:
                state.stop = True
        else:
            state.mode = "drill"
        return Action.scan(*(_round_box(r.box) for r in shown)), text

    def _drill_step(self, context: EpisodeContext, state: GRNState, narrator: Narrator) -> tuple[Action | None, str]:
        cfg = self.config
        image, case = context.image, context.case
        rng = None if cfg.mode == "greedy" else state.rng
        size = image.size
        if state.refine and state.focus is not None:
            parent = state.regions[state.focus]
            boxes = sub_regions(parent.box, cfg.sub_region_scale, size)
            scores = [self.oracle.drill(image, b, case.question, case=case, rng=state.rng) for b in boxes]
            pick = nucleus_choice(scores, rng, cfg.temperature, cfg.p0)
            box, after = boxes[pick], scores[pick]
            before = parent.confidence
            text = narrator.pick(Narrator.REFINE, part=_part_name(parent.box, box), box=_fmt(box), c=before)
            child = RegionBelief(
                box,
                before,
                drilled=after,
                label=parent.label,
                parent_box=parent.region_box,
                size_estimate=parent.size_estimate,
            )
            state.regions.append(child)
            index = len(state.regions) - 1
        else:
            if not state.regions or all(r.drilled is not None for r in state.regions):
                self._merge(state, self._oracle_scan(context, state))
            undrilled = [i for i, r in enumerate(state.regions) if r.drilled is None]
            if not undrilled:
                state.stop = True
                return None, ""
            choice = nucleus_choice([state.regions[i].scanned for i in undrilled], rng, cfg.temperature, cfg.p0)
            index = undrilled[choice]
            region = state.regions[index]
            box, before = region.box, region.scanned
            after = self.oracle.drill(image, box, case.question, case=case, rng=state.rng)
            region.drilled = after
            top = max(state.regions[i].scanned for i in undrilled)
            templates = Narrator.DRILL if before >= top else Narrator.DRILL_SAMPLED
            text = narrator.pick(templates, box=_fmt(box), where=_where(box, size), c=before)
        gain = information_gain(before, after, cfg.eps)
        state.last_event = {"kind": "drill", "box": box, "a": before, "b": after, "dc": gain}
        state.focus = index
        if after >= cfg.xi:
            state.stop = True
        elif gain >= cfg.delta:
            state.refine, state.mode = True, "drill"
        else:
            state.refine = False
            state.mode = "drill" if cfg.mode == "drill_only" else "scan"
        return Action.drill(_round_box(box)), text

    def _narrate_event(self, narrator: Narrator, state: GRNState, size: tuple[int, int]) -> str:
        event = state.last_event
        if event is None:
            return ""
        if event["kind"] == "scanned":
            return narrator.pick(Narrator.SCANNED, box=_fmt(event["box"]), c=event["c"])
        values = {"box": _fmt(event["box"]), "a": event["a"], "b": event["b"], "dc": max(-9.99, min(9.99, event["dc"]))}
        return narrator.pick(Narrator.GAIN if event["dc"] >= self.config.delta else Narrator.DROP, **values)

    def _answer(self, context: EpisodeContext, state: GRNState, narrator: Narrator, prefix: str) -> str:
        evidence = summarise(state.regions, self.config)
        answer, why = derive_answer(context.case, evidence, self.oracle, context.image, self.config, state.rng)
        state.answered = answer
        if evidence.best is None:
            summary = "no candidate region stood out"
        else:
            best = evidence.best
            kind = "drilled" if best.drilled is not None else "scanned"
            summary = (
                f"{len(evidence.regions)} region(s) examined, {len(evidence.positives)} convincing; best "
                f"{_where(best.box, context.image.size)} at {_fmt(best.box)} ({kind} confidence {best.confidence:.2f})"
            )
        text = narrator.pick(Narrator.ANSWER, summary=summary, why=f"{why}, so the answer is {answer}")
        context.state["record_info"] = {"answer": answer, "why": why, "summary": summary}
        return render_turn(Action.final_answer(answer), _join(prefix, text))

    # -- random trajectories -------------------------------------------------------------------------

    def _shadow_plan(self, context: EpisodeContext, episode_seed: int) -> list[tuple[str, int]]:
        """Run the full GRN+CVS expert silently to learn this episode's action names and boxes per action."""
        shadow = ExpertAgent(self.oracle, self.config.model_copy(update={"mode": "full"}))
        ghost = EpisodeContext(
            episode_id=context.episode_id,
            case=context.case,
            image=context.image,
            messages=[],
            step=0,
            max_steps=context.max_steps,
            state={"seed": episode_seed},
            box_format=context.box_format,
        )
        plan: list[tuple[str, int]] = []
        for _ in range(context.max_steps + 1):
            shadow._turn(ghost)
            grn: GRNState = ghost.state["grn"]
            if grn.answered is not None:
                break
            last = grn.events[-1]
            plan.append((last["action"], len(last["boxes"])))
        return plan

    def _random_step(self, context: EpisodeContext, state: GRNState) -> tuple[Action | None, str]:
        """Replay the shadow plan's next action with boxes of random place and size (log-uniform side)."""
        if state.plan is None or state.tool_steps >= len(state.plan):
            state.stop = True
            return None, ""
        name, count = state.plan[state.tool_steps]
        width, height = context.image.size
        low, high = self.config.random_box_range
        boxes: list[Box] = []
        for _ in range(count):
            side = min(width, height) * math.exp(state.rng.uniform(math.log(low), math.log(high)))
            x = float(state.rng.uniform(0, width - side))
            y = float(state.rng.uniform(0, height - side))
            boxes.append(_round_box((x, y, x + side, y + side)))
        case = context.case
        for box in boxes:
            confidence = self.oracle.drill(context.image, box, case.question, case=case, rng=state.rng)
            state.regions.append(RegionBelief(box, confidence, drilled=confidence, size_estimate=None))
        if state.tool_steps + 1 >= len(state.plan):
            state.stop = True
        listing = ", ".join(_fmt(b) for b in boxes)
        action = Action.drill(boxes[0]) if name == "drill" else Action.scan(*boxes)
        verb = "Zooming into" if name == "drill" else "Scanning"
        return action, f"{verb} {listing}, chosen at random."


def _round_box(box: Box) -> Box:
    """Whole-pixel box, at least one pixel wide and high."""
    x1, y1 = math.floor(box[0]), math.floor(box[1])
    return (float(x1), float(y1), float(max(x1 + 1, math.ceil(box[2]))), float(max(y1 + 1, math.ceil(box[3]))))


_MODALITY_NAMES = {"xray": "X-ray", "ct": "CT", "mri": "MRI"}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _join(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p and p.strip())


def make_expert(oracle: str = "annotation", mode: str = "full", **config: Any) -> ExpertAgent:
    """Build an expert by oracle name and mode; ``config`` overrides other :class:`ExpertConfig` fields."""
    if mode not in EXPERT_MODES:
        import difflib

        close = difflib.get_close_matches(mode, EXPERT_MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown expert mode {mode!r}.{hint} Choose one of {', '.join(EXPERT_MODES)}")
    try:
        expert_config = ExpertConfig(mode=mode, **config)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"invalid expert configuration: {exc}") from None
    return ExpertAgent(make_oracle(oracle), expert_config)
