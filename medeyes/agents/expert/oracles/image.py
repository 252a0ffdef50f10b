"""The image oracle: no labels, a classical blob detector with a solidity check on drill."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from medeyes.agents.expert.oracles.base import ScoredRegion, clip01
from medeyes_env.cases import Box, Case
from medeyes_env.rewards import box_iou
from medeyes_env.views import clamp_box, expand_to_min_side


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
        return clip01(confidence)

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
    return clip01(centre_contrast / rim_contrast)
