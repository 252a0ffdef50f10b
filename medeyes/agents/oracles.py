"""Region oracles: what the expert asks before it moves its gaze (METHOD.md section 3).

One small protocol, :class:`RegionOracle`, with the two calls of the paper's GRN:

- ``scan(image, question) -> [ScoredRegion(box, confidence), ...]``: "Please locate all abnormal regions";
- ``drill(image, box, question) -> confidence``: "Is any abnormality in this region?"

and an optional third, ``read(image, question, options, focus) -> str | None``, for facts that
regions cannot tell (the imaging modality, say); an oracle that cannot read returns ``None``.

Three implementations:

- :class:`AnnotationOracle`: the case's gold regions seen through calibrated noise, plus plausible
  distractor regions inside the anatomy. Needs labels; the only oracle that sees ``case``.
- :class:`ImageOracle`: no labels. A classical blob detector (scale-normalised determinant of the
  Hessian over a few scales, FFT Gaussian filtering, robust z-scores against the image's own
  background) with confidence from the score; the drill re-measures the region at full resolution
  and checks that the blob is solid (a filled nodule, not a ring such as a vessel seen end-on).
- :class:`VLMOracle`: any OpenAI-compatible chat endpoint (``vllm serve``): boxes as JSON for a scan,
  the probability of "yes" from the first token's log-probabilities for a drill.

Every call takes ``case`` and ``rng`` keywords: the annotation oracle reads ``case`` and draws its
noise from ``rng`` (so one seed gives one trajectory); the others ignore what they do not need.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.cases import AnswerType, Box, Case
from medeyes_env.errors import ConfigError, MedEyesError
from medeyes_env.rewards import box_iou, normalize_answer
from medeyes_env.views import clamp_box, expand_to_min_side


class OracleError(MedEyesError, RuntimeError):
    """An oracle could not answer (e.g. its server is unreachable or replied with nonsense)."""


@dataclass(frozen=True)
class ScoredRegion:
    """A candidate region and the oracle's confidence that it holds an abnormality."""

    box: Box
    confidence: float
    label: str | None = None
    """What the oracle thinks the region shows, when it says (annotation oracle: the gold label)."""
    extent: float | None = None
    """The oracle's estimate of the finding's diameter in pixels, when it has one (the box may add margin)."""


@runtime_checkable
class RegionOracle(Protocol):
    """What the GRN expert asks: where to look, and how sure it is after looking closely."""

    name: str

    def scan(
        self,
        image: Image.Image,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[ScoredRegion]:
        """Candidate abnormal regions of the whole image, most confident first."""
        ...

    def drill(
        self,
        image: Image.Image,
        box: Box,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """Confidence in [0, 1] that ``box`` (original pixels) holds an abnormality, after a close look."""
        ...

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
        """Answer a question regions cannot inform (modality, ...) or return None when the oracle cannot."""
        ...

    def describe(self) -> dict[str, Any]:
        """The oracle's name and configuration, stored on every trajectory it helped make."""
        ...


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(0)


def _clip01(value: float) -> float:
    return float(min(1.0, max(0.0, value)))


# ----------------------------------------------------------------------------------------------------------------------
# Annotation oracle
# ----------------------------------------------------------------------------------------------------------------------


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
        self._sites: dict[tuple[str, tuple[int, int]], list[Box]] = {}

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
        case, rng, cfg = self._need_case(case), _rng(rng), self.config
        size = image.size
        found: list[ScoredRegion] = []
        for region in case.regions:
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(region.box, size, rng)
            confidence = _clip01(rng.normal(cfg.scan_true, cfg.scan_noise))
            found.append(ScoredRegion(box, confidence, region.label, extent))
        for lookalike in case.lookalikes if cfg.lookalikes == "like_gold" else ():
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(lookalike.box, size, rng)
            found.append(ScoredRegion(box, _clip01(rng.normal(cfg.scan_true, cfg.scan_noise)), None, extent))
        for site in self._distractor_sites(image, case):
            if rng.random() < cfg.miss_rate:
                continue
            box, extent = self._jitter(site, size, rng)
            confidence = _clip01(rng.normal(cfg.scan_false, cfg.scan_noise))
            found.append(ScoredRegion(box, confidence, None, extent))
        found.sort(key=lambda r: -r.confidence)
        return found

    def _distractor_sites(self, image: Image.Image, case: Case) -> list[Box]:
        """The image's false-positive sites, ``Poisson(distractors)`` of them away from the gold regions.

        Fixed per case: a normal structure that looks suspicious is there every time one looks.
        """
        key = (case.id, image.size)
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
        case, rng, cfg = self._need_case(case), _rng(rng), self.config
        quality = max((match_quality(box, r.box, cfg.loose_penalty) for r in case.regions), default=0.0)
        mean = cfg.drill_false + (cfg.drill_true - cfg.drill_false) * quality
        return _clip01(rng.normal(mean, cfg.drill_noise)) if cfg.drill_noise > 0 else _clip01(mean)

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
        case, rng = self._need_case(case), _rng(rng)
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


# ----------------------------------------------------------------------------------------------------------------------
# Image oracle: a classical blob detector
# ----------------------------------------------------------------------------------------------------------------------


class ImageOracleConfig(BaseModel):
    """Parameters of the label-free detector (ours; no paper value applies)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work_side: int = Field(default=512, ge=64, le=2048, description="Longest side of the image the scan analyses.")
    radii: tuple[float, ...] = Field(
        default=(4.0, 6.0, 9.0, 13.0, 19.0, 28.0, 38.0),
        description="Finding radii looked for, in pixels of a 1024 px image (scaled to the actual image).",
    )
    gap: float = Field(default=1.3, gt=1.0, description="Surround starts at gap x radius (a margin for soft edges).")
    surround: float = Field(default=4.5, gt=1.5, description="Surround ends at surround x radius.")
    max_regions: int = Field(default=5, ge=1, le=20, description="Most candidate regions a scan returns.")
    cnr_centre: float = Field(
        default=3.5,
        description="Scan CNR that maps to confidence 0.5 (~90th percentile of non-lesion spots on phantom train).",
    )
    cnr_width: float = Field(default=0.4, gt=0.0, description="CNR change that moves confidence by one logit.")
    drill_cnr_centre: float = Field(
        default=1.6, description="CNR that maps to drill confidence 0.5 (a drill measures one spot, not the maximum)."
    )
    min_side: float = Field(default=12.0, gt=0.0, description="Smallest box side proposed, original pixels.")
    solidity_weight: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="How much a hollow centre (a ring, e.g. a vessel end-on) lowers drill confidence; 0 ignores it.",
    )
    cache_size: int = Field(default=512, ge=0, description="Scans kept in memory, keyed by image content.")


def _integral(values: np.ndarray) -> np.ndarray:
    out = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    out[1:, 1:] = values.cumsum(0).cumsum(1)
    return out


def _square_sums(padded: np.ndarray, pad: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum over the ``(2 half + 1)`` square around every pixel (clipped at the borders) and its pixel count.

    ``padded`` is an integral image edge-padded by ``pad >= half`` on every side (edge values are
    indices clipped to the image).
    """
    rows, cols = padded.shape[0] - 2 * pad - 1, padded.shape[1] - 2 * pad - 1
    lo, hi = pad - half, pad + half + 1
    total = (
        padded[hi : hi + rows, hi : hi + cols]
        - padded[lo : lo + rows, hi : hi + cols]
        - padded[hi : hi + rows, lo : lo + cols]
        + padded[lo : lo + rows, lo : lo + cols]
    )
    y, x = np.arange(rows), np.arange(cols)
    count_y = np.minimum(y + half + 1, rows) - np.maximum(y - half, 0)
    count_x = np.minimum(x + half + 1, cols) - np.maximum(x - half, 0)
    return total, count_y[:, None] * count_x[None, :]


def contrast_maps(gray: np.ndarray, radii: Sequence[float], gap: float, surround: float) -> np.ndarray:
    """Local contrast-to-noise ratio of a centre square against its surround, one map per radius.

    ``|mean(centre) - mean(surround)| / sqrt(var(centre) + var(surround))`` with the centre a square of
    half-side ``r`` and the surround the square ring from ``gap r`` to ``surround r``. A faint but
    homogeneous finding in homogeneous tissue scores high; a bright structure in busy anatomy (bone,
    bowel, vessels), whose surround varies, scores low. Shape ``(len(radii), H, W)``.
    """
    values = gray.astype(np.float64)
    halves = []
    for radius in radii:
        inner = max(1, round(radius))
        start = max(inner + 1, round(gap * radius))
        halves.append((inner, start, max(start + 1, round(surround * radius))))
    pad = max(h[2] for h in halves)
    first = np.pad(_integral(values), pad, mode="edge")
    second = np.pad(_integral(values * values), pad, mode="edge")
    maps = []
    for inner, start, outer in halves:
        s_in, n_in = _square_sums(first, pad, inner)
        q_in, _ = _square_sums(second, pad, inner)
        s_gap, n_gap = _square_sums(first, pad, start)
        q_gap, _ = _square_sums(second, pad, start)
        s_out, n_out = _square_sums(first, pad, outer)
        q_out, _ = _square_sums(second, pad, outer)
        n_ring = np.maximum(n_out - n_gap, 1)
        mean_in = s_in / n_in
        mean_ring = (s_out - s_gap) / n_ring
        var_in = np.maximum(q_in / n_in - mean_in**2, 0.0)
        var_ring = np.maximum((q_out - q_gap) / n_ring - mean_ring**2, 0.0)
        maps.append(np.abs(mean_in - mean_ring) / np.sqrt(var_in + var_ring + 1e-6))
    return np.stack(maps)


def _window_max(values: np.ndarray, radius: int) -> np.ndarray:
    """Maximum over ``[i - radius, i + radius]`` along axis 0 (sparse-table doubling, O(n log window))."""
    length, window = values.shape[0], 2 * radius + 1
    table = np.concatenate(
        [np.full((radius, *values.shape[1:]), -np.inf), values, np.full_like(values[:radius], -np.inf)]
    )
    width = 1
    while width * 2 <= window:
        table = np.maximum(table[:-width], table[width:])
        width *= 2
    return np.maximum(table[:length], table[window - width : window - width + length])


def _local_maxima(values: np.ndarray, radius: int) -> np.ndarray:
    """Boolean map of pixels that are the maximum of their ``(2 radius + 1)`` square neighbourhood."""
    best = _window_max(_window_max(values, radius).T, radius).T
    return values >= best


def _to_gray(image: Image.Image, side: int) -> tuple[np.ndarray, float]:
    """Grey values in [0, 1], box-downsampled so the longest side is at most ``side``; and original px per px."""
    factor = max(1.0, max(image.size) / side)
    gray = image.convert("L")
    if factor > 1.0:
        new = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
        gray = gray.resize(new, Image.Resampling.BOX)
        factor = image.width / new[0]
    return np.asarray(gray, dtype=np.float32) / 255.0, factor


class ImageOracle:
    """A label-free detector of anomalous regions: spots that differ from homogeneous surroundings.

    scan: local contrast-to-noise maps (:func:`contrast_maps`) over several radii on the image
    downsampled to ``work_side``; the strongest local maxima, de-duplicated, become boxes with
    confidence ``sigmoid((cnr - cnr_centre) / cnr_width)``.
    drill: the same measure inside the box (with its surround) at the scan's resolution, times a
    solidity factor measured at full resolution: a ring with a hollow centre (a vessel or bronchus
    seen end-on) loses confidence, a filled nodule keeps it.
    """

    name = "image"

    def __init__(self, config: ImageOracleConfig | None = None) -> None:
        self.config = config or ImageOracleConfig()
        self._cache: OrderedDict[str, list[ScoredRegion]] = OrderedDict()

    def describe(self) -> dict[str, Any]:
        """Name and detector parameters."""
        return {"name": self.name, **self.config.model_dump()}

    def _confidence(self, cnr: float, centre: float | None = None) -> float:
        centre = self.config.cnr_centre if centre is None else centre
        return 1.0 / (1.0 + math.exp(-(cnr - centre) / self.config.cnr_width))

    def _radii(self, image_size: tuple[int, int], factor: float) -> list[float]:
        scale = max(image_size) / 1024
        return [r * scale / factor for r in self.config.radii]

    def scan(
        self,
        image: Image.Image,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[ScoredRegion]:
        """The strongest local-contrast spots across radii, non-maximum suppressed, as boxes with confidences."""
        cfg = self.config
        gray, factor = _to_gray(image, cfg.work_side)
        key = hashlib.sha1(gray.tobytes()).hexdigest() + f"{image.size}"
        if key in self._cache:
            self._cache.move_to_end(key)
            return list(self._cache[key])
        radii = self._radii(image.size, factor)
        maps = contrast_maps(gray, radii, cfg.gap, cfg.surround)
        candidates: list[tuple[float, Box, float]] = []
        for index, radius in enumerate(radii):
            rim = int(cfg.surround * radius) + 1
            if 2 * rim >= min(gray.shape):
                continue
            score = maps[index]
            peaks = _local_maxima(score, max(1, round(radius)))
            peaks[:rim] = peaks[-rim:] = False
            peaks[:, :rim] = peaks[:, -rim:] = False
            ys, xs = np.nonzero(peaks)
            strongest = np.argsort(-score[ys, xs])[: 8 * cfg.max_regions]
            for y, x in zip(ys[strongest], xs[strongest], strict=True):
                half = (radius + 0.75) * factor
                cx, cy = (x + 0.5) * factor, (y + 0.5) * factor
                box = expand_to_min_side((cx - half, cy - half, cx + half, cy + half), cfg.min_side, image.size)
                # Scale selection: the finding's size is the radius whose contrast peaks at this spot.
                best_radius = radii[int(np.argmax(maps[:, y, x]))]
                candidates.append((float(score[y, x]), box, 2 * best_radius * factor))
        candidates.sort(key=lambda c: -c[0])
        chosen: list[ScoredRegion] = []
        for score, box, extent in candidates:
            if any(box_iou(box, other.box) > 0.05 or _contains(other.box, box) for other in chosen):
                continue
            chosen.append(ScoredRegion(box, self._confidence(score), extent=extent))
            if len(chosen) >= cfg.max_regions:
                break
        if cfg.cache_size:
            self._cache[key] = chosen
            while len(self._cache) > cfg.cache_size:
                self._cache.popitem(last=False)
        return list(chosen)

    def drill(
        self,
        image: Image.Image,
        box: Box,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """The strongest spot inside ``box`` (measured with its surround), discounted when its centre is hollow."""
        cfg = self.config
        x1, y1, x2, y2 = clamp_box(box, image.size)
        if x2 - x1 < 2 or y2 - y1 < 2:
            return 0.0
        _, factor = _to_gray_size(image.size, cfg.work_side)
        radii = self._radii(image.size, factor)
        side = max(x2 - x1, y2 - y1) / factor
        radii = [r for r in radii if r <= max(1.0, 0.75 * side)] or radii[:1]
        reach = cfg.surround * max(radii) * factor + 2
        context = clamp_box((x1 - reach, y1 - reach, x2 + reach, y2 + reach), image.size)
        crop = image.crop(tuple(round(v) for v in context))
        size = (max(1, round(crop.width / factor)), max(1, round(crop.height / factor)))
        gray = np.asarray(crop.convert("L").resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0
        maps = contrast_maps(gray, radii, cfg.gap, cfg.surround)
        sx, sy = crop.width / size[0], crop.height / size[1]
        bx1, by1 = int((x1 - context[0]) / sx), int((y1 - context[1]) / sy)
        bx2, by2 = math.ceil((x2 - context[0]) / sx), math.ceil((y2 - context[1]) / sy)
        inner = maps[:, by1 : max(by1 + 1, by2), bx1 : max(bx1 + 1, bx2)]
        if inner.size == 0:
            return 0.0
        scale, yy, xx = np.unravel_index(int(np.argmax(inner)), inner.shape)
        confidence = self._confidence(float(inner[scale, yy, xx]), cfg.drill_cnr_centre)
        if cfg.solidity_weight > 0:
            full = np.asarray(crop.convert("L"), dtype=np.float32) / 255.0
            cy, cx = int((yy + by1 + 0.5) * sy), int((xx + bx1 + 0.5) * sx)
            solidity = _solidity(full, cy, cx, radii[scale] * factor)
            confidence *= 1.0 - cfg.solidity_weight * (1.0 - solidity)
        return _clip01(confidence)

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
        """A spot detector knows no facts beyond regions."""
        return None


def _to_gray_size(size: tuple[int, int], side: int) -> tuple[tuple[int, int], float]:
    factor = max(1.0, max(size) / side)
    if factor == 1.0:
        return size, 1.0
    new = (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))
    return new, size[0] / new[0]


def _contains(outer: Box, inner: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _solidity(gray: np.ndarray, cy: int, cx: int, radius: float) -> float:
    """1 for a filled spot, towards 0 for a ring: the centre's contrast over the rim's, against the halo.

    Contrast of the centre (distance < 0.35 r) and of the rim (0.55 r .. r) over the halo's median
    (1.5 r .. 2.2 r); solidity = centre / rim clipped to [0, 1] (1 when the rim has no contrast).
    """
    radius = max(1.5, radius)
    reach = math.ceil(2.2 * radius) + 1
    y0, y1 = max(0, cy - reach), min(gray.shape[0], cy + reach + 1)
    x0, x1 = max(0, cx - reach), min(gray.shape[1], cx + reach + 1)
    patch = gray[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    centre = patch[d < max(1.0, 0.35 * radius)]
    rim = patch[(d >= 0.55 * radius) & (d <= radius)]
    halo = patch[(d >= 1.5 * radius) & (d <= 2.2 * radius)]
    if centre.size == 0 or rim.size == 0 or halo.size == 0:
        return 1.0
    background = float(np.median(halo))
    rim_contrast = float(np.mean(rim)) - background
    centre_contrast = float(np.mean(centre)) - background
    if abs(rim_contrast) < 1e-6:
        return 1.0
    return _clip01(centre_contrast / rim_contrast)


# ----------------------------------------------------------------------------------------------------------------------
# VLM oracle: any OpenAI-compatible chat endpoint
# ----------------------------------------------------------------------------------------------------------------------

SCAN_PROMPT = (
    "Please locate all abnormal regions in this image. The image is {width} x {height} pixels. "
    'Reply with JSON only: a list of objects {{"box": [x1, y1, x2, y2], "confidence": c}} with pixel '
    "coordinates (origin top-left) and c between 0 and 1, at most {max_regions} objects, [] if there is none. "
    "Question being investigated: {question}"
)
DRILL_PROMPT = "Is any abnormality in this region? Answer yes or no. Question being investigated: {question}"
READ_PROMPT = "{question}\n{options}Answer with the answer only."


class VLMOracleConfig(BaseModel):
    """How the VLM oracle talks to an OpenAI-compatible server (e.g. ``vllm serve``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="Server URL up to and including /v1.")
    model: str | None = Field(default=None, description="Served model name; None asks the server's /models.")
    api_key: str | None = Field(default=None, description="Bearer token, if the server wants one.")
    timeout_s: float = Field(default=60.0, gt=0.0, description="Seconds to wait for one reply.")
    vllm_extensions: bool = Field(
        default=True, description="Send vLLM's extra request fields; False for a strict OpenAI server."
    )
    image_side: int = Field(default=448, ge=32, description="Longest side of images sent to the model.")
    max_regions: int = Field(default=5, ge=1, description="Most regions asked for in a scan (paper: 5).")
    scan_max_tokens: int = Field(default=256, ge=8, description="Token cap of a scan reply.")
    top_logprobs: int = Field(default=20, ge=1, le=20, description="Alternatives seen at the drill's first token.")
    scan_prompt: str = Field(
        default=SCAN_PROMPT, description="Scan prompt (paper: 'Please locate all abnormal regions')."
    )
    drill_prompt: str = Field(
        default=DRILL_PROMPT, description="Drill prompt (paper: 'Is any abnormality in this region?')."
    )
    read_facts: bool = Field(default=True, description="Ask the model questions regions cannot inform (modality...).")
    default_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Confidence of a scanned box when the model gives none."
    )

    @model_validator(mode="after")
    def _url(self) -> VLMOracleConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


def fit_image(image: Image.Image, side: int) -> Image.Image:
    """``image`` as RGB, scaled down so its longest side is at most ``side`` (never up)."""
    scale = min(1.0, side / max(image.size))
    sent = image.convert("RGB")
    if scale < 1.0:
        sent = sent.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return sent


def user_message(image: Image.Image, prompt: str) -> list[dict[str, Any]]:
    """One user message with an image part and a text part (OpenAI format, PIL image)."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


_JSON_LIST_RE = re.compile(r"\[.*\]", re.DOTALL)
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUMBER] * 4) + r"\s*\]")


def parse_regions(
    text: str,
    sent_size: tuple[int, int],
    original_size: tuple[int, int],
    default_confidence: float = 0.5,
    max_regions: int = 5,
) -> list[ScoredRegion]:
    """Boxes (and confidences) from a model's scan reply, scaled from the sent image to the original.

    Accepts a JSON list of ``{"box": [...], "confidence": c}`` objects (``bbox``/``bbox_2d`` and
    ``score`` also read), of bare ``[x1, y1, x2, y2]`` lists, an object with a ``regions`` list,
    JSON inside a Markdown fence, or, failing JSON, any ``[a, b, c, d]`` groups in the text.
    Boxes that are empty after clamping to the image are dropped; never raises on model text.

    >>> parse_regions('[{"box": [10, 10, 20, 20], "confidence": 0.8}]', (100, 100), (200, 200))
    [ScoredRegion(box=(20.0, 20.0, 40.0, 40.0), confidence=0.8, label=None, extent=None)]
    >>> parse_regions("I see one at [0, 0, 50, 50].", (100, 100), (100, 100))
    [ScoredRegion(box=(0.0, 0.0, 50.0, 50.0), confidence=0.5, label=None, extent=None)]
    """
    items: list[Any] = []
    cleaned = re.sub(r"```[a-zA-Z]*", "", text)
    try:
        data: Any = json.loads(cleaned.strip())
    except (json.JSONDecodeError, RecursionError):
        match = _JSON_LIST_RE.search(cleaned)
        try:
            data = json.loads(match.group(0)) if match else None
        except (json.JSONDecodeError, RecursionError):
            data = None
    if isinstance(data, dict):
        data = data.get("regions", data.get("boxes", [data]))
    if isinstance(data, list):
        items = [data] if len(data) == 4 and all(isinstance(v, (int, float)) for v in data) else data
    regions = _regions_from(items, sent_size, original_size, default_confidence)
    if not regions:
        fallback = [[float(v) for v in m.groups()] for m in _BOX_RE.finditer(cleaned)]
        regions = _regions_from(fallback, sent_size, original_size, default_confidence)
    regions.sort(key=lambda r: -r.confidence)
    return regions[:max_regions]


def _regions_from(
    items: list[Any], sent_size: tuple[int, int], original_size: tuple[int, int], default_confidence: float
) -> list[ScoredRegion]:
    sx = original_size[0] / sent_size[0]
    sy = original_size[1] / sent_size[1]
    regions: list[ScoredRegion] = []
    for item in items:
        raw_box, confidence, label = None, default_confidence, None
        if isinstance(item, dict):
            raw_box = item.get("box", item.get("bbox", item.get("bbox_2d")))
            raw_conf = item.get("confidence", item.get("score"))
            if isinstance(raw_conf, (int, float)) and not isinstance(raw_conf, bool) and math.isfinite(raw_conf):
                confidence = _clip01(float(raw_conf))
            label = item.get("label") if isinstance(item.get("label"), str) else None
        elif isinstance(item, list):
            raw_box = item
        if not (isinstance(raw_box, list) and len(raw_box) == 4):
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in raw_box)
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        box = clamp_box((x1 * sx, y1 * sy, x2 * sx, y2 * sy), original_size)
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            continue
        regions.append(ScoredRegion(box, confidence, label))
    return regions


class VLMOracle:
    """A region oracle behind any OpenAI-compatible chat endpoint, through :class:`OpenAIBackend`.

    scan: one greedy generation of JSON boxes on the whole image (scaled to ``image_side``);
    drill: :func:`~medeyes.agents.openai_backend.yes_probability` on the region's full-resolution crop;
    read: one short greedy generation of the question itself.
    """

    name = "vlm"

    def __init__(self, config: VLMOracleConfig | None = None, backend: Any | None = None) -> None:
        from medeyes.agents.openai_backend import OpenAIBackend

        self.config = config or VLMOracleConfig()
        cfg = self.config
        self.backend = backend or OpenAIBackend(
            cfg.base_url,
            cfg.model,
            cfg.api_key,
            cfg.timeout_s,
            vllm_extensions=cfg.vllm_extensions,
            content_separator="",
        )

    def describe(self) -> dict[str, Any]:
        """Name, server and prompts (never the API key)."""
        return {"name": self.name, **self.config.model_dump(exclude={"api_key"})}

    def _sampling(self, max_tokens: int) -> Any:
        from medeyes.agents.policy import SamplingConfig

        return SamplingConfig(temperature=0.0, max_new_tokens=max_tokens, stop=[])

    def scan_messages(self, image: Image.Image, question: str) -> tuple[list[dict[str, Any]], tuple[int, int]]:
        """The conversation a scan sends, and the size of the image in it."""
        cfg = self.config
        sent = fit_image(image, cfg.image_side)
        prompt = cfg.scan_prompt.format(
            width=sent.width, height=sent.height, max_regions=cfg.max_regions, question=question
        )
        return user_message(sent, prompt), sent.size

    def drill_messages(self, image: Image.Image, box: Box, question: str) -> list[dict[str, Any]]:
        """The conversation a drill sends: the region cropped at full resolution."""
        x1, y1, x2, y2 = clamp_box(box, image.size)
        crop = image.crop((round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1)))
        return user_message(fit_image(crop, self.config.image_side), self.config.drill_prompt.format(question=question))

    def scan(
        self,
        image: Image.Image,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[ScoredRegion]:
        """Ask the model for abnormal regions as JSON boxes."""
        messages, sent = self.scan_messages(image, question)
        (turn,) = self.backend.generate([messages], self._sampling(self.config.scan_max_tokens))
        cfg = self.config
        return parse_regions(turn.text, sent, image.size, cfg.default_confidence, cfg.max_regions)

    def drill(
        self,
        image: Image.Image,
        box: Box,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """P("yes") to "Is any abnormality in this region?" on the full-resolution crop."""
        from medeyes.agents.openai_backend import yes_probability

        messages = self.drill_messages(image, box, question)
        return float(yes_probability(self.backend, messages, top_logprobs=self.config.top_logprobs))

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
        """Ask the model the question itself (options listed), on the whole image."""
        if not self.config.read_facts:
            return None
        listing = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))
        messages = user_message(
            fit_image(image, self.config.image_side), READ_PROMPT.format(question=question, options=listing)
        )
        (turn,) = self.backend.generate([messages], self._sampling(16))
        return turn.text.strip() or None


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

OracleName = Literal["annotation", "perfect", "image", "vlm"]
ORACLES: tuple[str, ...] = ("annotation", "perfect", "image", "vlm")


def make_oracle(name: str, **options: Any) -> RegionOracle:
    """Build an oracle by name: ``annotation``, ``perfect`` (noise-free annotation), ``image`` or ``vlm``.

    ``options`` are the fields of that oracle's config (e.g. ``base_url=`` for ``vlm``).
    """
    try:
        if name == "annotation":
            return AnnotationOracle(AnnotationOracleConfig(**options))
        if name == "perfect":
            return AnnotationOracle(AnnotationOracleConfig.perfect().model_copy(update=options))
        if name == "image":
            return ImageOracle(ImageOracleConfig(**options))
        if name == "vlm":
            return VLMOracle(VLMOracleConfig(**options))
    except ValueError as exc:
        raise ConfigError(f"invalid options for the {name!r} oracle: {exc}") from None
    import difflib

    close = difflib.get_close_matches(name, ORACLES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown oracle {name!r}.{hint} Choose one of {', '.join(ORACLES)}")
