"""The annotation oracle: the case's gold regions seen through calibrated noise, plus plausible distractors."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.expert.oracles.base import ScoredRegion, clip01, rng_or_default
from medeyes_env.cases import AnswerType, Box, Case
from medeyes_env.errors import ConfigError
from medeyes_env.rewards import box_iou, normalize_answer
from medeyes_env.views import clamp_box, expand_to_min_side, mirrored_boxes


class AnnotationOracleConfig(BaseModel):
    """Noise model of the annotation oracle. Defaults give informative, imperfect confidences (ours)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box_noise: float = Field(
        default=0.15, ge=0.0, le=2.0, description="SD of a gold box's centre shift and log-size change, in box sides."
    )
    miss_rate: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Chance that a scan misses a region (gold or distractor)."
    )
    distractors: float = Field(
        default=1.5, ge=0.0, le=10.0, description="Mean false-positive sites per image (Poisson; fixed per case)."
    )
    lookalikes: Literal["ignore", "like_gold"] = Field(
        default="ignore",
        description="The case's lookalikes (normal structures that resemble a finding, e.g. phantom mimics): "
        "ignore them, or propose each in every scan with a gold region's confidence, as a detector that "
        "cannot tell them apart at scan resolution would (the drill then tells them apart).",
    )
    bilateral: bool = Field(
        default=False,
        description="Also propose the left-right mirror of every gold region and lookalike, with a gold region's "
        "scan confidence: a detector that finds the round object but confuses the sides, as a reader who "
        "compares both sides looks at both. A drill there shows what is really there (drill_false when empty).",
    )
    scan_true: float = Field(default=0.62, ge=0.0, le=1.0, description="Mean scan confidence of a gold region.")
    scan_false: float = Field(default=0.42, ge=0.0, le=1.0, description="Mean scan confidence of a distractor.")
    scan_noise: float = Field(default=0.12, ge=0.0, le=1.0, description="SD of scan confidences.")
    drill_true: float = Field(default=0.95, ge=0.0, le=1.0, description="Mean drill confidence on a tight gold box.")
    drill_false: float = Field(default=0.12, ge=0.0, le=1.0, description="Mean drill confidence away from gold.")
    drill_noise: float = Field(default=0.08, ge=0.0, le=1.0, description="SD of drill confidences.")
    loose_penalty: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="How much a box much larger than the finding lowers drill confidence (0: containment is enough).",
    )
    fact_accuracy: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Chance that read() returns the gold answer of a question regions cannot inform; else a wrong one.",
    )
    min_side: float = Field(default=24.0, gt=0.0, description="Smallest box side the oracle proposes, in pixels.")

    @classmethod
    def perfect(cls) -> AnnotationOracleConfig:
        """No noise, no misses, no distractors, confidences 1 on gold and 0 elsewhere: the gold validator."""
        return cls(
            box_noise=0.0,
            miss_rate=0.0,
            distractors=0.0,
            scan_true=1.0,
            scan_false=0.0,
            scan_noise=0.0,
            drill_true=1.0,
            drill_false=0.0,
            drill_noise=0.0,
            loose_penalty=0.0,
            fact_accuracy=1.0,
        )


def match_quality(box: Box, gold: Box, loose_penalty: float) -> float:
    """How well ``box`` frames the finding ``gold``, in [0, 1]: containment, lowered when the box is much larger.

    ``coverage * (1 - loose_penalty * (1 - precision))`` with coverage = share of the gold box inside
    ``box`` and precision = share of ``box`` that is gold. A zoom that contains the whole finding
    shows it; a tight zoom shows it best.

    >>> match_quality((0, 0, 10, 10), (0, 0, 10, 10), 0.25)
    1.0
    >>> match_quality((0, 0, 20, 20), (0, 0, 10, 10), 0.0), match_quality((20, 20, 30, 30), (0, 0, 10, 10), 0.25)
    (1.0, 0.0)
    """
    ix = max(0.0, min(box[2], gold[2]) - max(box[0], gold[0]))
    iy = max(0.0, min(box[3], gold[3]) - max(box[1], gold[1]))
    inter = ix * iy
    gold_area = (gold[2] - gold[0]) * (gold[3] - gold[1])
    box_area = (box[2] - box[0]) * (box[3] - box[1])
    if inter <= 0 or gold_area <= 0 or box_area <= 0:
        return 0.0
    coverage = inter / gold_area
    precision = inter / box_area
    return float(coverage * (1.0 - loose_penalty * (1.0 - precision)))


class AnnotationOracle:
    """Gold regions through calibrated noise, with distractors; the oracle that needs labels (``case``)."""

    name = "annotation"

    def __init__(self, config: AnnotationOracleConfig | None = None) -> None:
        self.config = config or AnnotationOracleConfig()
        self._sites: dict[tuple[str, str, tuple[Box, ...], str], list[Box]] = {}

    def describe(self) -> dict[str, Any]:
        """Name and noise model."""
        return {"name": self.name, **self.config.model_dump()}

    @staticmethod
    def _need_case(case: Case | None) -> Case:
        if case is None:
            raise ConfigError("the annotation oracle reads the case's gold regions; pass case=... (or use 'image')")
        return case

    def scan(
        self,
        image: Image.Image,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[ScoredRegion]:
        """Noisy gold boxes (some missed) and plausible distractors, with informative confidences."""
        case, rng, cfg = self._need_case(case), rng_or_default(rng), self.config
        size = image.size
        found: list[ScoredRegion] = []
        for region in case.regions:
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(region.box, size, rng)
            confidence = clip01(rng.normal(cfg.scan_true, cfg.scan_noise))
            found.append(ScoredRegion(box, confidence, region.label, extent))
        for lookalike in case.lookalikes if cfg.lookalikes == "like_gold" else ():
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(lookalike.box, size, rng)
            found.append(ScoredRegion(box, clip01(rng.normal(cfg.scan_true, cfg.scan_noise)), None, extent))
        objects = [r.box for r in (*case.regions, *case.lookalikes)]
        for box in mirrored_boxes(objects, size[0]) if cfg.bilateral else ():
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(box, size, rng)
            found.append(ScoredRegion(box, clip01(rng.normal(cfg.scan_true, cfg.scan_noise)), None, extent))
        for site in self._distractor_sites(image, case):
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(site, size, rng)
            confidence = clip01(rng.normal(cfg.scan_false, cfg.scan_noise))
            found.append(ScoredRegion(box, confidence, None, extent))
        found.sort(key=lambda r: -r.confidence)
        return found

    def _distractor_sites(self, image: Image.Image, case: Case) -> list[Box]:
        """The image's false-positive sites, ``Poisson(distractors)`` of them away from the gold regions.

        Fixed per case: a normal structure that looks suspicious is there every time one looks. They depend
        on the gold regions and the pixels too, so the cache key holds both: an image counterfactual of the
        case (same id, other pixels or regions) gets its own sites, the same as in a fresh process.
        """
        key = (case.source, case.id, tuple(r.box for r in case.regions), hashlib.sha1(image.tobytes()).hexdigest())
        if key in self._sites:
            return self._sites[key]
        digest = hashlib.sha256(f"{case.source}/{case.id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        sides = [(r.box[2] - r.box[0], r.box[3] - r.box[1]) for r in case.regions]
        sites: list[Box] = []
        for _ in range(int(rng.poisson(self.config.distractors))):
            box = self._distractor(image, sides, rng)
            if box is not None and not any(box_iou(box, r.box) > 0.1 for r in case.regions):
                sites.append(box)
        if len(self._sites) > 4096:
            self._sites.clear()
        self._sites[key] = sites
        return sites

    def drill(
        self,
        image: Image.Image,
        box: Box,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """``drill_false + (drill_true - drill_false) * quality`` plus noise; quality from :func:`match_quality`."""
        case, rng, cfg = self._need_case(case), rng_or_default(rng), self.config
        quality = max((match_quality(box, r.box, cfg.loose_penalty) for r in case.regions), default=0.0)
        mean = cfg.drill_false + (cfg.drill_true - cfg.drill_false) * quality
        return clip01(rng.normal(mean, cfg.drill_noise)) if cfg.drill_noise > 0 else clip01(mean)

    def read(
        self,
        image: Image.Image,
        question: str,
        options: Sequence[str],
        *,
        focus: Box | None = None,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> str | None:
        """The gold answer with probability ``fact_accuracy``, else a wrong option (or None for open questions)."""
        case, rng = self._need_case(case), rng_or_default(rng)
        if rng.random() < self.config.fact_accuracy:
            return case.answer
        wrong = [o for o in options if normalize_answer(o) != normalize_answer(case.answer)]
        if case.answer_type is AnswerType.CLOSED:
            wrong = ["no" if normalize_answer(case.answer) == "yes" else "yes"]
        return str(wrong[int(rng.integers(len(wrong)))]) if wrong else None

    def _jitter(self, box: Box, size: tuple[int, int], rng: np.random.Generator) -> tuple[Box, float]:
        """A noisy copy of ``box`` (at least ``min_side``) and the noisy size of the finding (its shorter side)."""
        cfg = self.config
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if cfg.box_noise > 0:
            cx += rng.normal(0, cfg.box_noise) * w
            cy += rng.normal(0, cfg.box_noise) * h
            w *= math.exp(rng.normal(0, cfg.box_noise))
            h *= math.exp(rng.normal(0, cfg.box_noise))
        jittered = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        if cfg.box_noise == 0:
            return clamp_box(jittered, size), min(w, h)
        return expand_to_min_side(jittered, min(cfg.min_side, *size), size), min(w, h)

    def _distractor(self, image: Image.Image, sides: list[tuple[float, float]], rng: np.random.Generator) -> Box | None:
        """A box the size of a finding, centred on a pixel inside the anatomy (brighter than the darkest fifth)."""
        width, height = image.size
        if sides:
            w, h = sides[int(rng.integers(len(sides)))]
            scale = math.exp(rng.normal(0, 0.25))
            w, h = w * scale, h * scale
        else:
            w = h = float(rng.uniform(0.05, 0.15) * min(width, height))
        w, h = max(w, self.config.min_side), max(h, self.config.min_side)
        thumb = np.asarray(image.convert("L").reduce(max(1, max(width, height) // 64)), dtype=np.float32)
        inside = np.argwhere(thumb > np.percentile(thumb, 20))
        if len(inside) == 0:
            return None
        ty, tx = inside[int(rng.integers(len(inside)))]
        cx = (tx + rng.random()) * width / thumb.shape[1]
        cy = (ty + rng.random()) * height / thumb.shape[0]
        return expand_to_min_side((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 1.0, (width, height))
