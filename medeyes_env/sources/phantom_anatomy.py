"""Procedural anatomy for the phantom source: chest radiograph, brain MRI and abdominal CT.

This module draws pictures; :mod:`medeyes_env.sources.phantom` decides what is in
them and asks the questions. Geometry is written in normalised image
coordinates ``(u, v)`` in ``[0, 1]`` (``u`` to the image's right, ``v`` down) as
approximate signed distance functions (negative inside), so the same shape
functions draw the picture and answer "is this point inside the liver?" when
findings are placed.

A picture is made in three layers, which is what keeps a 1024 px render in the
tens of milliseconds with numpy and Pillow alone:

1. smooth anatomy at half resolution, upsampled bicubically;
2. fine structures at full resolution (lung vessel trees, pleural lines) and the
   focal objects (lesions and lesion-like normal structures) stamped in small patches;
3. noise with the texture of the modality, cut from a fixed bank of noise at a
   random offset and orientation.

Focal objects come in two kinds with the same low-resolution appearance: a
*lesion* is solid; a *mimic* (a vessel or bronchus seen end-on) is the same blob
with a small lumen cut into its centre: a dark dot about 3 px across with a
brighter rim (:func:`lumen`). The lumen pattern has zero integral and zero
second moment and lives at spatial frequencies above what a 4x downsample keeps,
so a 256 px overview of a 1024 px image shows both as the same blob, while a
full-resolution crop shows the lumen plainly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Modality = Literal["xray", "mri", "ct"]
FloatArray = np.ndarray

LUMEN_SIGMA = 1.2
"""Width (px) of the lumen pattern that tells a mimic from a lesion; its detail is finer than 4 px."""
LUMEN_DEPTH = 1.8
"""Depth of a mimic's lumen relative to the lesion's central contrast."""


# ----------------------------------------------------------------------------------------------------------------------
# Scene description (what to draw)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Focal:
    """A round focal object in pixels of the full image: a solid lesion or a lesion mimic with a lumen.

    A mimic with the same ``radius`` and ``contrast`` has the lesion's outline and
    integrated contrast; only its centre differs (:func:`mimic_profile`).
    """

    x: float
    y: float
    radius: float
    contrast: float
    kind: Literal["lesion", "mimic"]
    organ: str
    edema: float = 0.0
    """Brain only: relative radius of a surrounding oedema halo (0 for none)."""
    necrotic: bool = False
    """Brain only: a ring-enhancing mass with a dark core (large masses)."""
    lumen_sigma: float = LUMEN_SIGMA
    """Mimic only: width (px) of the lumen pattern; a box downsample by more than about 3x this erases it."""
    stripes: float = 0.0
    """Mimic only: depth of fine stripes (alternate pixel columns) across the object, relative to its contrast.
    Any box downsample by an even factor averages them away; a magnified view shows them plainly."""

    def box(self, image_size: int) -> tuple[float, float, float, float]:
        """The gold box ``xyxy`` around the visible object, clamped to the image."""
        pad = self.radius + 1.5
        return (
            max(0.0, math.floor(self.x - pad)),
            max(0.0, math.floor(self.y - pad)),
            min(float(image_size), math.ceil(self.x + pad)),
            min(float(image_size), math.ceil(self.y + pad)),
        )


@dataclass(frozen=True)
class Extended:
    """A chest finding that is not round: a pleural effusion or a pneumothorax on one side of the image."""

    kind: Literal["effusion", "pneumothorax"]
    side: Literal["left", "right"]
    """Side of the IMAGE (not of the patient)."""
    extent: float
    """Effusion: fluid height; pneumothorax: pleural gap; both in normalised units."""


@dataclass(frozen=True)
class Anatomy:
    """Per-patient anatomy parameters (normalised units), sampled once per case."""

    modality: Modality
    params: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.params[key]


# ----------------------------------------------------------------------------------------------------------------------
# Toolkit
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[FloatArray, FloatArray]:
    axis = ((np.arange(n, dtype=np.float32) + 0.5) / n).astype(np.float32)
    u, v = np.meshgrid(axis, axis)
    u.setflags(write=False)
    v.setflags(write=False)
    return u, v


def ellipse_sdf(u: FloatArray, v: FloatArray, cx: float, cy: float, a: float, b: float, angle: float = 0.0):
    """Approximate signed distance to an ellipse (negative inside), ``angle`` in radians."""
    x, y = u - cx, v - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        x, y = c * x + s * y, -s * x + c * y
    return (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1.0) * min(a, b)


def inside(sdf: FloatArray, width: float) -> FloatArray:
    """Soft indicator of ``sdf < 0`` with a linear edge ``width`` wide (normalised units)."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def resize(array: FloatArray, n: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> FloatArray:
    """Resize a float image to ``n`` x ``n`` with Pillow (``F`` mode)."""
    out = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), "F").resize((n, n), resample)
    return np.array(out, dtype=np.float32)


def smooth_field(rng: np.random.Generator, n: int, cells: int) -> FloatArray:
    """A smooth random field of unit-ish standard deviation with features about ``n / cells`` pixels wide.

    Drawn from a small fixed bank per ``(n, cells)`` in a random one of eight
    orientations and either sign, which costs nothing; a case combines several.
    """
    bank = _field_bank(n, cells)
    field_ = bank[int(rng.integers(len(bank)))]
    flip = int(rng.integers(16))
    if flip & 1:
        field_ = field_[::-1]
    if flip & 2:
        field_ = field_[:, ::-1]
    if flip & 4:
        field_ = field_.T
    return -field_ if flip & 8 else field_


@lru_cache(maxsize=64)
def _field_bank(n: int, cells: int, size: int = 6) -> FloatArray:
    rng = np.random.default_rng([n, cells])
    bank = np.stack([resize(rng.standard_normal((cells, cells)).astype(np.float32), n) for _ in range(size)])
    bank.setflags(write=False)
    return bank


def blur(array: FloatArray, factor: int) -> FloatArray:
    """Cheap blur: box-downsample by ``factor`` and upsample bicubically."""
    n = array.shape[0]
    small = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), "F").reduce(factor)
    return np.array(small.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float32)


@lru_cache(maxsize=1)
def _noise_bank() -> tuple[FloatArray, FloatArray]:
    """Two 2048 px fields of unit standard deviation: white grain, and grain correlated over ~2 px."""
    rng = np.random.default_rng(20_251_129)
    white = rng.standard_normal((2048, 2048), dtype=np.float32)
    coarse = rng.standard_normal((1024, 1024), dtype=np.float32)
    correlated = resize(coarse, 2048, Image.Resampling.BILINEAR)
    correlated /= correlated.std()
    white.setflags(write=False)
    correlated.setflags(write=False)
    return white, correlated


def noise_patch(rng: np.random.Generator, n: int, which: int) -> FloatArray:
    """An ``n`` x ``n`` view of bank ``which`` (0 white, 1 correlated) at a random offset and orientation."""
    bank = _noise_bank()[which]
    if n > bank.shape[0]:
        return rng.standard_normal((n, n), dtype=np.float32)
    ox, oy = (int(v) for v in rng.integers(0, bank.shape[0] - n + 1, size=2))
    patch = bank[oy : oy + n, ox : ox + n]
    flip = int(rng.integers(0, 8))
    if flip & 1:
        patch = patch[::-1]
    if flip & 2:
        patch = patch[:, ::-1]
    if flip & 4:
        patch = patch.T
    return patch


def draw_polyline(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float, value: float, scale: float
) -> None:
    """Draw a polyline given in normalised coordinates onto a float image of side ``scale``."""
    draw.line([(x * scale, y * scale) for x, y in points], fill=float(value), width=max(1, round(width)), joint="curve")


# ----------------------------------------------------------------------------------------------------------------------
# Focal objects: a solid lesion and its hollow mimic, with matched low-resolution moments
# ----------------------------------------------------------------------------------------------------------------------


def _edge(d: FloatArray, radius: float, softness: float) -> FloatArray:
    return np.clip(0.5 - (d - radius) / softness, 0.0, 1.0)


def lesion_profile(d: FloatArray, radius: float, modality: Modality) -> FloatArray:
    """Relative intensity of a solid lesion at distance ``d`` px from its centre (1 = full contrast).

    Radiograph: a flattened projected sphere (a little denser in the middle); CT
    and MRI: a slice through a sphere, flat with a soft rim.
    """
    if modality == "xray":
        dome = np.clip(1.0 - (d / (radius + 0.5)) ** 2, 0.0, 1.0) ** 0.3
        return dome * _edge(d, radius, 1.2) * 1.1
    return _edge(d, radius, 1.4) * (1.0 - 0.15 * (d / (radius + 1.0)) ** 2)


def lumen(d: FloatArray, sigma: float = LUMEN_SIGMA) -> FloatArray:
    """The lumen pattern of a mimic: 1 at the centre, a negative ring, a faint positive halo.

    It is the radial profile of the biharmonic of a Gaussian (``nabla^4 G``, width
    :data:`LUMEN_SIGMA`), so its integral and its second moment are zero: a box
    downsample by 4 leaves almost nothing of it, while a full-resolution view
    shows a dark (or, for dark lesions, bright) centre with a rim.
    """
    t = (d / sigma) ** 2
    return (t * t - 8.0 * t + 8.0) / 8.0 * np.exp(-t / 2.0)


def mimic_profile(
    d: FloatArray,
    radius: float,
    modality: Modality,
    envelope_d: FloatArray | None = None,
    lumen_sigma: float = LUMEN_SIGMA,
) -> FloatArray:
    """Relative intensity of a mimic: the lesion's profile with a lumen cut into its centre."""
    body = lesion_profile(d if envelope_d is None else envelope_d, radius, modality)
    centre = float(lesion_profile(np.zeros(1), radius, modality)[0])
    return body - LUMEN_DEPTH * centre * lumen(d, lumen_sigma)


def stamp_focal(image: FloatArray, focal: Focal, modality: Modality, scale: float = 1.0) -> None:
    """Add ``focal`` to ``image`` in place (its intensity change is ``contrast``, scaled by ``scale``)."""
    n = image.shape[0]
    reach = focal.radius * (1.0 + max(focal.edema, 0.0) * 1.2) + 4.0
    x0, x1 = max(0, int(focal.x - reach)), min(n, int(focal.x + reach) + 2)
    y0, y1 = max(0, int(focal.y - reach)), min(n, int(focal.y + reach) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - focal.y
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - focal.x
    d = np.sqrt(xs * xs + ys * ys)
    amp = focal.contrast * scale
    theta = np.arctan2(ys, xs)
    envelope = d
    if focal.radius > 6:
        # lobulated margin for the larger objects: the radius varies with a few low harmonics of the angle
        envelope = d / (1.0 + 0.07 * np.sin(3 * theta + focal.x) + 0.05 * np.sin(5 * theta + focal.y))
    if focal.kind == "mimic":
        patch = mimic_profile(d, focal.radius, modality, envelope, focal.lumen_sigma)
        if focal.stripes > 0:
            columns = np.where(np.arange(x0, x1) % 2 == 0, 1.0, -1.0).astype(np.float32)[None, :]
            patch = patch + focal.stripes * lesion_profile(envelope, focal.radius, modality) * columns
    else:
        d = envelope
        if focal.necrotic:
            core = focal.radius * (0.55 + 0.08 * np.sin(2 * theta + focal.y) + 0.05 * np.sin(5 * theta + focal.x))
            patch = _edge(d, focal.radius, 2.5) - 1.2 * _edge(d, core, 4.0)
        else:
            patch = lesion_profile(d, focal.radius, modality)
        if focal.edema > 0:
            theta = np.arctan2(ys, xs)
            lobes = 1.0 + 0.25 * np.sin(3 * theta + focal.x) + 0.15 * np.sin(7 * theta + focal.y)
            halo = np.exp(-((d / (focal.radius * (1 + focal.edema * lobes))) ** 4))
            image[y0:y1, x0:x1] -= 0.5 * abs(amp) * halo * (1 - _edge(d, focal.radius, 2.0))
    image[y0:y1, x0:x1] += amp * patch


def paint(
    image: FloatArray,
    bbox: tuple[float, float, float, float],
    sdf,
    value: float | FloatArray,
    edge: float,
    mode: Literal["set", "add"] = "set",
) -> FloatArray | None:
    """Paint the shape ``sdf(u, v) < 0`` into ``image`` inside ``bbox`` (normalised ``u0, v0, u1, v1``).

    ``set`` blends towards ``value``; ``add`` adds ``value`` times the soft mask.
    Returns the soft mask of the painted window (or None if the window is empty).
    """
    n = image.shape[0]
    u_all, v_all = _grid(n)
    x0, x1 = max(0, int(bbox[0] * n) - 2), min(n, int(bbox[2] * n) + 3)
    y0, y1 = max(0, int(bbox[1] * n) - 2), min(n, int(bbox[3] * n) + 3)
    if x0 >= x1 or y0 >= y1:
        return None
    u, v = u_all[y0:y1, x0:x1], v_all[y0:y1, x0:x1]
    mask = inside(sdf(u, v), edge)
    window = image[y0:y1, x0:x1]
    if isinstance(value, np.ndarray):
        value = value[y0:y1, x0:x1]
    if mode == "add":
        window += mask * value
    else:
        window += mask * (value - window)
    return mask


def _ell(cx: float, cy: float, a: float, b: float, angle: float = 0.0):
    """An ellipse as an ``(sdf, bbox)`` pair for :func:`paint`."""
    r = max(a, b)
    return (lambda u, v: ellipse_sdf(u, v, cx, cy, a, b, angle)), (cx - r, cy - r, cx + r, cy + r)


# ----------------------------------------------------------------------------------------------------------------------
# Chest radiograph (PA). Image left = patient's right.
# ----------------------------------------------------------------------------------------------------------------------


def sample_chest(rng: np.random.Generator) -> Anatomy:
    """Per-patient chest geometry."""
    u = rng.uniform
    return Anatomy(
        "xray",
        {
            "cx": 0.5 + u(-0.012, 0.012),
            "sw": u(0.93, 1.05),
            "sh": u(0.94, 1.04),
            "heart": u(0.9, 1.1),
            "dome_r": 0.64 + u(-0.02, 0.02),
            "dome_l": 0.665 + u(-0.02, 0.02),
            "rib0": 0.105 + u(-0.008, 0.008),
            "ribsp": 0.057 + u(-0.003, 0.003),
            "breast": float(u() < 0.5) * u(0.06, 0.14),
            "density": u(0.95, 1.05),
        },
    )


def chest_heart_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Cardiac silhouette."""
    hs = p["heart"]
    return np.minimum(
        ellipse_sdf(u, v, p["cx"] + 0.045 * hs, 0.64, 0.16 * hs, 0.125 * hs, -0.3),
        ellipse_sdf(u, v, p["cx"] + 0.055, 0.32, 0.03, 0.035),  # aortic knob
    )


def chest_lung_sdf(p: Anatomy, side: str, u: FloatArray, v: FloatArray) -> FloatArray:
    """One lung field; ``side`` is the image side ('left' = patient's right lung)."""
    s = -1.0 if side == "left" else 1.0
    lcx = p["cx"] + s * 0.195 * p["sw"]
    shell = ellipse_sdf(u, v, lcx, 0.585, 0.158 * p["sw"], 0.485 * p["sh"])
    top = p["dome_l"] if side == "left" else p["dome_r"]
    dome = v - (top + 0.115 * ((u - lcx - s * 0.01) / 0.17) ** 2)
    medial = s * (p["cx"] + s * 0.042 - u)
    return np.maximum(np.maximum(shell, dome), np.maximum(medial, -chest_heart_sdf(p, u, v)))


def chest_lungs_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Both lung fields."""
    return np.minimum(chest_lung_sdf(p, "left", u, v), chest_lung_sdf(p, "right", u, v))


def chest_body_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Outline of the trunk, with the neck running into sloping shoulders."""
    cx = p["cx"]
    x, y = np.abs(u - cx) / 0.5, np.abs(v - 0.85) / 0.9
    trunk = (np.cbrt(x * x * x + y * y * y) - 1.0) * 0.5
    slope = np.clip((np.abs(u - cx) - 0.07) / 0.16, 0.0, 1.0)
    top = 0.11 * slope * slope * (3.0 - 2.0 * slope) + 0.12 * x * x * x
    return np.maximum(trunk, top - v)


def effusion_mask(
    p: Anatomy, side: str, height: float, u: FloatArray, v: FloatArray, lung_sdf: FloatArray | None = None
) -> FloatArray:
    """Pleural fluid at the base of one lung: a meniscus that climbs the lateral chest wall."""
    s = -1.0 if side == "left" else 1.0
    lcx = p["cx"] + s * 0.195 * p["sw"]
    lateral = np.clip(0.5 + s * (u - lcx) / (0.3 * p["sw"]), 0.0, 1.0)
    top = p["dome_l"] if side == "left" else p["dome_r"]
    dome = top + 0.115 * ((u - lcx - s * 0.01) / 0.17) ** 2
    surface = dome - height * (0.25 + 1.5 * lateral**3)
    lung_sdf = chest_lung_sdf(p, side, u, v) if lung_sdf is None else lung_sdf
    return inside(lung_sdf, 0.004) * inside(surface - v, 0.012)


def pneumothorax_mask(
    p: Anatomy, side: str, gap: float, u: FloatArray, v: FloatArray, lung_sdf: FloatArray | None = None
) -> FloatArray:
    """Air between the chest wall and the collapsed lung's edge, over the apex and upper lateral lung."""
    sdf = chest_lung_sdf(p, side, u, v) if lung_sdf is None else lung_sdf
    return inside(sdf, 0.002) * inside(-gap - sdf, 0.002) * inside(v - 0.5, 0.05)


def _vessel_trees(draw: ImageDraw.ImageDraw, rng: np.random.Generator, p: Anatomy, n: int) -> None:
    """Branching, tapering pulmonary vessels from each hilum (attenuation units, widths in px at side ``n``)."""
    for side, hx, hy in (("left", p["cx"] - 0.075, 0.47), ("right", p["cx"] + 0.08, 0.445)):
        for spread in (-1.25, -0.8, -0.35, 0.1, 0.5, 0.95, 1.35):
            angle = math.pi + spread + rng.normal(0, 0.1)
            if side == "right":
                angle = math.pi - angle
            length = n * rng.uniform(0.07, 0.085) * (1.0 + 0.3 * abs(math.sin(angle)))
            stack = [(hx * n, hy * n, angle, length, n * 0.008, 5)]
            while stack:
                x, y, a, length, width, depth = stack.pop()
                points = [(x, y)]
                for _ in range(3):
                    a += rng.normal(0, 0.2)
                    x, y = x + length / 3 * math.cos(a), y + length / 3 * math.sin(a) * 1.35
                    points.append((x, y))
                draw.line(points, fill=0.012 * width**1.4 + 0.02, width=max(1, round(width)))
                if depth > 0 and width > 0.8:
                    split = rng.uniform(0.25, 0.5)
                    for sgn, share in ((-1.0, 0.55), (1.0, 0.45)):
                        stack.append(
                            (
                                x,
                                y,
                                a + sgn * split * (1.3 - share),
                                length * rng.uniform(0.7, 0.85),
                                width * share * 1.25,
                                depth - 1,
                            )
                        )


def _ribs(draw: ImageDraw.ImageDraw, p: Anatomy, n: int) -> None:
    """Posterior ribs (dense, with cortical margins), fainter anterior ribs, and clavicles."""
    cx, sw = p["cx"], p["sw"]
    for side in (-1.0, 1.0):
        for i in range(10):
            v0 = p["rib0"] + i * p["ribsp"]
            reach = 0.36 * sw * (0.72 + 0.28 * math.sin(math.pi * min(1.0, 0.2 + i / 9)))
            post = [
                (cx + side * (0.035 + reach * t), v0 - 0.025 * t + (0.11 + 0.004 * i) * t**2.2)
                for t in np.linspace(0, 1, 16)
            ]
            lx, ly = post[-1]
            ant = [
                (lx - side * (0.26 * sw * t), ly + 0.015 + 0.11 * t - 0.02 * t * t) for t in np.linspace(0.05, 0.85, 12)
            ]
            width = n * 0.02
            draw_polyline(draw, post, width, 1.0, n)
            draw_polyline(draw, post, width - 4, 0.55, n)
            draw_polyline(draw, ant, width * 1.1, 0.4, n)
            draw_polyline(draw, ant, width * 1.1 - 4, 0.25, n)
        clav = [
            (cx + side * (0.04 + 0.27 * t * sw), 0.2 - 0.075 * t + 0.02 * math.sin(math.pi * t * 1.5))
            for t in np.linspace(0, 1, 14)
        ]
        draw_polyline(draw, clav, n * 0.028, 1.4, n)
        draw_polyline(draw, clav, n * 0.028 - 4, 0.9, n)


def render_chest(
    p: Anatomy,
    focals: list[Focal],
    extended: list[Extended],
    size: int,
    noise: float,
    rng: np.random.Generator,
) -> FloatArray:
    """A PA chest radiograph, display intensities in ``[0, 1]``.

    Built as an attenuation map (soft tissue minus lung air plus mediastinum,
    bones and vessels) shown through ``1 - exp(-k * attenuation)``.
    """
    n = size // 2
    u, v = _grid(n)
    cx = p["cx"]
    body = inside(chest_body_sdf(p, u, v), 0.004)
    lateral = np.clip(np.abs(u - cx) / 0.5, 0.0, 1.0)
    att = body * (0.55 + 0.5 * (1.0 - lateral * lateral)) * (1.0 + 0.02 * smooth_field(rng, n, 5))
    side_sdf = {side: chest_lung_sdf(p, side, u, v) for side in ("left", "right")}
    lung_sdf = np.minimum(side_sdf["left"], side_sdf["right"])
    # lung air: its thickness along the ray rises quickly inside the pleural edge
    profile = np.sqrt(np.clip(-lung_sdf / 0.05, 0.0, 1.0))
    air = profile * (0.85 + 0.05 * smooth_field(rng, n, 6) + 0.025 * smooth_field(rng, n, 48)) * p["density"]
    keep = np.ones_like(u)
    for finding in extended:
        if finding.kind == "effusion":
            fluid = effusion_mask(p, finding.side, finding.extent, u, v, side_sdf[finding.side])
            air *= 1.0 - 0.97 * fluid
            keep *= 1.0 - fluid
        else:
            ptx = pneumothorax_mask(p, finding.side, finding.extent, u, v, side_sdf[finding.side])
            air += 0.05 * ptx
            keep *= 1.0 - ptx
    att -= air
    # mediastinum and heart
    hs = p["heart"]
    heart = ellipse_sdf(u, v, cx + 0.045 * hs, 0.64, 0.16 * hs, 0.125 * hs, -0.3)
    width = 0.05 + 0.03 * np.clip((v - 0.2) / 0.35, 0.0, 1.0)
    att += 0.2 * inside(np.abs(u - cx - 0.01) - width, 0.04) * inside(0.12 - v, 0.05) * inside(v - 0.8, 0.05)
    att += 0.18 * np.sqrt(np.clip(-heart / 0.08, 0.0, 1.0))
    att += 0.08 * inside(ellipse_sdf(u, v, cx + 0.055, 0.32, 0.03, 0.035), 0.03)
    # spine faintly through the mediastinum, trachea as a lucent band
    spine = inside(np.abs(u - cx) - 0.033, 0.012)
    phase = ((v - p["rib0"]) / p["ribsp"]) % 1.0
    att += spine * (0.04 - 0.02 * inside(np.abs(phase - 0.9) - 0.05, 0.04)) * inside(v - 0.75, 0.1)
    att -= 0.2 * inside(np.abs(u - cx - 0.01 * v) - 0.016, 0.008) * inside(v - 0.37, 0.03) * body
    # breast shadows and the gastric bubble
    if p["breast"] > 0:
        for s in (-1.0, 1.0):
            att += p["breast"] * inside(ellipse_sdf(u, v, cx + s * 0.25, 0.8, 0.19, 0.12), 0.06)
    bubble = inside(ellipse_sdf(u, v, cx + 0.19, p["dome_l"] + 0.085, 0.055, 0.032), 0.01)
    att -= 0.25 * bubble * inside(v - p["dome_l"] - 0.085, 0.006)
    # bones (seen best against the lungs) and vessels, drawn at this resolution
    canvas = Image.new("F", (n, n), 0.0)
    _ribs(ImageDraw.Draw(canvas), p, n)
    att += 0.16 * blur(np.asarray(canvas, dtype=np.float32), 2) * body * (0.12 + 0.88 * profile)
    canvas = Image.new("F", (n, n), 0.0)
    _vessel_trees(ImageDraw.Draw(canvas), rng, p, n)
    vessels = blur(np.asarray(canvas, dtype=np.float32), 2) * 0.5 + np.asarray(canvas, dtype=np.float32) * 0.5
    att += 1.3 * vessels * inside(lung_sdf, 0.004) * keep
    for hx, hy in ((cx - 0.075, 0.47), (cx + 0.08, 0.445)):
        att += 0.1 * inside(ellipse_sdf(u, v, hx, hy, 0.03, 0.055), 0.03)
    full = resize(att, size)
    for focal in focals:
        stamp_focal(full, focal, "xray", scale=1.15)  # about 1 display unit per unit of contrast in the lungs
    for finding in extended:
        if finding.kind == "pneumothorax":
            _pleural_line(full, p, finding)
    image = 1.0 - np.exp(-1.1 * full)
    image += noise * (0.6 * noise_patch(rng, size, 0) + 0.8 * noise_patch(rng, size, 1))
    return image


def _pleural_line(full: FloatArray, p: Anatomy, finding: Extended) -> None:
    """The visceral pleural line of a pneumothorax, drawn at full resolution in a window over the upper lung."""
    n = full.shape[0]
    s = -1.0 if finding.side == "left" else 1.0
    lcx = p["cx"] + s * 0.195 * p["sw"]
    u0, u1 = sorted((lcx - 0.2, lcx + 0.2))
    x0, x1, y0, y1 = max(0, int(u0 * n)), min(n, int(u1 * n)), int(0.05 * n), int(0.62 * n)
    axis_x = (np.arange(x0, x1, dtype=np.float32) + 0.5) / n
    axis_y = (np.arange(y0, y1, dtype=np.float32) + 0.5) / n
    uu, vv = np.meshgrid(axis_x, axis_y)
    sdf = chest_lung_sdf(p, finding.side, uu, vv)
    line = np.clip(1.0 - np.abs(sdf + finding.extent) * n / 1.2, 0.0, 1.0) * inside(vv - 0.5, 0.05)
    full[y0:y1, x0:x1] += 0.09 * line


# ----------------------------------------------------------------------------------------------------------------------
# Brain MRI, axial T1 after contrast, at the level of the lateral ventricles. Image left = patient's right.
# ----------------------------------------------------------------------------------------------------------------------

BRAIN_INSET = 0.036
"""Scalp, skull and the subarachnoid space together, in normalised units."""
SULCUS_MAX_DEPTH = 0.1
"""Deepest reach of a sulcus below the brain surface (normalised units)."""


def sample_brain(rng: np.random.Generator) -> Anatomy:
    """Per-patient head geometry."""
    u = rng.uniform
    return Anatomy(
        "mri",
        {
            "cx": 0.5 + u(-0.01, 0.01),
            "cy": 0.5 + u(-0.01, 0.01),
            "a": u(0.34, 0.37),
            "b": u(0.42, 0.45),
            "tilt": u(-0.06, 0.06),
            "vent": u(0.8, 1.25),
            "vent_asym": u(-0.1, 0.1),
            "sulci": u(0.85, 1.2),
        },
    )


def _brain_frame(p: Anatomy, u: FloatArray, v: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Coordinates in the head's own frame (tilt removed): ``x`` to the image right, ``y`` down, centred."""
    c, s = math.cos(p["tilt"]), math.sin(p["tilt"])
    x, y = u - p["cx"], v - p["cy"]
    return c * x + s * y, -s * x + c * y


def brain_head_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """The outer surface of the head (skin), slightly egg-shaped: wider at the back."""
    x, y = _brain_frame(p, u, v)
    a = p["a"] * (1.0 + 0.06 * y / p["b"])
    return (np.sqrt((x / a) ** 2 + (y / p["b"]) ** 2) - 1.0) * p["a"]


_VENTRICLE_PATH = (
    (0.028, -0.165, 0.012),
    (0.036, -0.12, 0.024),
    (0.03, -0.05, 0.014),
    (0.038, 0.03, 0.014),
    (0.068, 0.1, 0.024),
    (0.075, 0.15, 0.012),
    (0.06, 0.19, 0.004),
)
"""Centre line of one lateral ventricle in the head frame: ``(|x|, y, half-width)`` from frontal to occipital horn."""


def brain_ventricles_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Both lateral ventricles (a conservative outline: a capsule around each centre line)."""
    x, y = _brain_frame(p, u, v)
    k = p["vent"]
    out = np.full(np.shape(u), np.inf, dtype=np.float32)
    for s in (-1.0, 1.0):
        pts = [(s * px * k * (1.0 + s * p["vent_asym"]), py, w * k) for px, py, w in _VENTRICLE_PATH]
        for (x0, y0, w0), (x1, y1, w1) in itertools.pairwise(pts):
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
            d = np.sqrt((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2) - (w0 + t * (w1 - w0))
            out = np.minimum(out, d)
    return out


def brain_parenchyma_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Where a brain lesion may sit: inside the brain, away from the cortex surface and the ventricles."""
    x, _ = _brain_frame(p, u, v)
    deep = np.maximum(brain_head_sdf(p, u, v) + BRAIN_INSET + SULCUS_MAX_DEPTH + 0.02, 0.03 - np.abs(x))
    return np.maximum(deep, -brain_ventricles_sdf(p, u, v) + 0.02)


def render_brain(p: Anatomy, focals: list[Focal], size: int, noise: float, rng: np.random.Generator) -> FloatArray:
    """An axial T1-weighted post-contrast slice, display intensities in ``[0, 1]``.

    Gyri: sulci run inwards from the surface at about 56 places around the brain,
    wandering with a smooth random field; the cortex is the ribbon within a fixed
    thickness of the surface and of every sulcus, white matter is the rest.
    """
    n = size // 2
    u, v = _grid(n)
    x, y = _brain_frame(p, u, v)
    head = brain_head_sdf(p, u, v)
    depth = -head  # from the skin inwards
    scalp = inside(head, 0.0015) * (0.42 + 0.2 * inside(np.abs(depth - 0.007) - 0.004, 0.002))
    bone = 0.011 + 0.0012 * smooth_field(rng, n, 9)
    skull = inside(np.abs(depth - 0.014 - bone) - bone, 0.002)
    diploe = inside(np.abs(depth - 0.014 - bone) - 0.45 * bone, 0.002) * (0.22 + 0.08 * smooth_field(rng, n, 40))
    image = scalp * (1.0 - skull) + skull * (0.05 + diploe)
    brain_depth = depth - BRAIN_INSET - (bone - 0.011)
    brain = inside(-brain_depth, 0.0015)
    # sulci: radial lines whose phase wanders with a smooth field; cortex = ribbon along surface and sulci
    radius = np.sqrt(x * x + y * y) + 1e-3
    angle = np.arctan2(y, x)
    # primary sulci: radial lines whose phase wanders with a smooth field
    sulci = 46
    phase = angle * (sulci / (2 * math.pi)) + 0.8 * smooth_field(rng, n, 9) + rng.uniform(0, 1)
    phase += brain_depth * (10.0 * smooth_field(rng, n, 5))
    lateral = np.abs(phase - np.round(phase)) * (2 * math.pi / sulci) * radius
    reach = np.clip(0.06 + 0.025 * smooth_field(rng, n, 16), 0.03, SULCUS_MAX_DEPTH / 1.2) * p["sulci"]
    dist = lateral + np.clip(brain_depth - reach, 0.0, None) * 2.0
    # secondary sulci: zero lines of a band-limited field, meandering and branching, in the outer cortex
    meander = smooth_field(rng, n, 30)
    gy, gx = np.gradient(meander)
    secondary = np.abs(meander) / (np.sqrt(gx * gx + gy * gy) * n + 1e-3)
    dist = np.minimum(dist, secondary + np.clip(brain_depth - 0.55 * reach, 0.0, None) * 2.0)
    fissure = np.abs(x + 0.005 * np.sin(y * 13)) + np.clip(0.19 - np.abs(y + 0.01), 0.0, None) * 4.0
    dist = np.minimum(dist, fissure)
    surface = np.minimum(dist, brain_depth)
    gap = (0.0011 + 0.0007 * smooth_field(rng, n, 12)) * p["sulci"]
    csf = inside(surface - gap, 0.0024)
    grey = inside(surface - 0.0095 - 0.0015 * smooth_field(rng, n, 20), 0.006)
    tissue = (0.68 - 0.25 * grey) * (1.0 + 0.025 * smooth_field(rng, n, 70) + 0.02 * smooth_field(rng, n, 12))
    for s in (-1.0, 1.0):  # caudate heads and thalami
        tissue -= 0.1 * inside(ellipse_sdf(x, y, s * 0.065 * p["vent"], -0.1, 0.026, 0.045, -s * 0.3), 0.015)
        tissue -= 0.07 * inside(ellipse_sdf(x, y, s * 0.045, 0.05, 0.035, 0.05), 0.02)
    window = (slice(int((p["cy"] - 0.26) * n), int((p["cy"] + 0.26) * n)),) * 1 + (
        slice(int((p["cx"] - 0.2) * n), int((p["cx"] + 0.2) * n)),
    )
    csf[window] = np.maximum(csf[window], inside(brain_ventricles_sdf(p, u[window], v[window]), 0.006))
    value = tissue * (1.0 - csf) + 0.1 * csf
    for s in (-1.0, 1.0):  # choroid plexus in the atria enhances
        value += 0.28 * inside(ellipse_sdf(x, y, s * 0.072 * p["vent"], 0.11, 0.014, 0.02), 0.008)
    for sy in (-1.0, 1.0):  # superior sagittal sinus, front and back
        value += 0.45 * inside(ellipse_sdf(x, y, 0.0, sy * (p["b"] - BRAIN_INSET - 0.02), 0.01, 0.007), 0.004)
    image = image * (1.0 - brain) + value * brain
    image *= 1.0 + 0.07 * smooth_field(rng, n, 3)  # coil sensitivity
    image = 0.5 * image + 0.5 * blur(image, 2)  # acquisition resolution below the display's
    full = resize(image, size)
    for focal in focals:
        stamp_focal(full, focal, "mri")
    real = full + noise * noise_patch(rng, size, 0)
    imag = noise * noise_patch(rng, size, 0)
    return np.sqrt(real * real + imag * imag)  # magnitude image: Rician noise


# ----------------------------------------------------------------------------------------------------------------------
# Abdominal CT, axial, portal venous phase, soft-tissue window (W 400, L 40). Image left = patient's right.
# ----------------------------------------------------------------------------------------------------------------------

CT_WINDOW = (40.0, 400.0)
"""Level and width (HU) of the display window."""


def hu(value: float) -> float:
    """Display intensity of a Hounsfield value in the soft-tissue window."""
    level, width = CT_WINDOW
    return (value - (level - width / 2)) / width


def sample_abdomen(rng: np.random.Generator) -> Anatomy:
    """Per-patient abdominal geometry."""
    u = rng.uniform
    return Anatomy(
        "ct",
        {
            "cx": 0.5 + u(-0.01, 0.01),
            "cy": 0.47 + u(-0.01, 0.01),
            "a": u(0.41, 0.46),
            "b": u(0.3, 0.34),
            "fat": u(0.015, 0.045),
            "liver": u(0.92, 1.08),
            "spleen": u(0.85, 1.15),
            "kidney_y": u(-0.015, 0.015),
            "stomach_air": u(0.0, 1.0),
        },
    )


def ct_body_sdf(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Skin surface: a wide ellipse, flatter at the back where the patient lies on the table."""
    y = v - p["cy"]
    back = np.clip(y, 0.0, None) / (p["b"] * 0.92)
    front = np.clip(y, None, 0.0) / p["b"]
    x = (u - p["cx"]) / p["a"]
    return (np.sqrt(x * x + back * back * (1.0 + 0.35 * back * back) + front * front) - 1.0) * p["b"]


def ct_organ_sdf(p: Anatomy, organ: str, u: FloatArray, v: FloatArray) -> FloatArray:
    """Liver, spleen or one kidney ('kidney_left'/'kidney_right' by IMAGE side)."""
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    if organ == "liver":
        k = p["liver"]
        right_lobe = ellipse_sdf(u, v, cx - 0.42 * a, cy - 0.08 * b, 0.42 * a * k, 0.66 * b * k, 0.35)
        left_lobe = ellipse_sdf(u, v, cx - 0.02 * a, cy - 0.5 * b, 0.32 * a * k, 0.2 * b * k, -0.3)
        liver = np.minimum(right_lobe, left_lobe)
        liver = np.maximum(liver, 0.012 - ct_organ_sdf(p, "kidney_left", u, v))  # the kidney lies in front
        return np.maximum(liver, ct_body_sdf(p, u, v) + p["fat"] + 0.02)
    if organ == "spleen":
        k = p["spleen"]
        outer = ellipse_sdf(u, v, cx + 0.7 * a, cy + 0.2 * b, 0.13 * a * k, 0.34 * b * k, -0.55)
        hilum = ellipse_sdf(u, v, cx + 0.52 * a, cy + 0.16 * b, 0.08 * a * k, 0.22 * b * k, -0.55)
        return np.maximum(np.maximum(outer, -hilum), ct_body_sdf(p, u, v) + p["fat"] + 0.018)
    side = -1.0 if organ == "kidney_left" else 1.0
    return ellipse_sdf(u, v, cx + side * 0.36 * a, cy + (0.42 + p["kidney_y"]) * b, 0.095 * a, 0.19 * b, side * 0.4)


def _bowel(image: FloatArray, rng: np.random.Generator, p: Anatomy) -> None:
    """Loops of bowel in the free space of the abdomen: a wall and mixed content, some with air."""
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    centres = np.stack([cx + rng.uniform(-0.45, 0.62, 80) * a, cy + rng.uniform(-0.8, 0.45, 80) * b])
    bu, bv = centres
    clear = np.minimum(ct_organ_sdf(p, "liver", bu, bv), ct_organ_sdf(p, "spleen", bu, bv))
    clear = np.minimum(clear, ellipse_sdf(bu, bv, cx + 0.33 * a, cy - 0.5 * b, 0.17 * a, 0.27 * b, 0.6))
    clear = np.minimum(clear, ellipse_sdf(bu, bv, cx, cy + 0.4 * b, 0.16, 0.09))  # spine, aorta, kidneys
    clear = np.minimum(clear, -(ct_body_sdf(p, bu, bv) + p["fat"] + 0.03))
    placed: list[tuple[float, float]] = []
    for x, y, room in zip(bu, bv, clear, strict=True):
        if room < 0.02 or any((x - px) ** 2 + (y - py) ** 2 < 0.045**2 for px, py in placed):
            continue
        r = min(float(room), rng.uniform(0.016, 0.03))
        angle, stretch = rng.uniform(0, math.pi), rng.uniform(0.8, 1.5)
        sdf, box = _ell(x, y, r * stretch, r, angle)
        paint(image, box, sdf, hu(50), 0.004)
        content = float(rng.choice([hu(10), hu(25), hu(-950), hu(160)], p=[0.35, 0.3, 0.25, 0.1]))
        inner, box = _ell(x, y, (r - 0.004) * stretch, r - 0.004, angle)
        paint(image, box, inner, content, 0.003)
        placed.append((x, y))
        if len(placed) >= 16:
            break


def _hepatic_vessels(draw: ImageDraw.ImageDraw, rng: np.random.Generator, p: Anatomy, n: int) -> None:
    """Portal and hepatic vein branches fanning from the liver hilum."""
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    hx, hy = cx - 0.2 * a, cy + 0.1 * b
    for base in np.linspace(2.2, 4.6, 6):
        stack = [(hx, hy, base + rng.normal(0, 0.15), rng.uniform(0.045, 0.06), 4.5, 3)]
        while stack:
            x, y, angle, length, width, depth = stack.pop()
            x2, y2 = x + length * math.cos(angle), y + length * math.sin(angle)
            draw.line([(x * n, y * n), (x2 * n, y2 * n)], fill=1.0, width=max(1, round(width)))
            if depth > 0:
                for sgn in (-1.0, 1.0):
                    stack.append((x2, y2, angle + sgn * rng.uniform(0.25, 0.6), length * 0.75, width * 0.7, depth - 1))


def render_ct(p: Anatomy, focals: list[Focal], size: int, noise: float, rng: np.random.Generator) -> FloatArray:
    """An axial contrast-enhanced abdominal CT slice at the level of the kidneys, intensities in ``[0, 1]``."""
    n = size // 2
    u, v = _grid(n)
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    body_sdf = ct_body_sdf(p, u, v)
    image = hu(-1000) + inside(body_sdf, 0.002) * (hu(-105) - hu(-1000))  # subcutaneous fat
    # abdominal wall muscles: thick in front and at the flanks, none at the back
    y = (v - cy) / b
    wall_depth = body_sdf + p["fat"] * (1.0 + 0.6 * np.clip(y, 0.0, None))
    muscle = inside(wall_depth, 0.003) * (1.0 - inside(wall_depth + 0.012 + 0.006 * np.clip(-y, 0, None), 0.003))
    muscle *= inside(y - 0.55, 0.1)
    inner = inside(wall_depth + 0.012, 0.003)
    image += muscle * (hu(50) - hu(-105)) + inner * (hu(-90) - hu(-105))
    image += inside(np.abs(body_sdf + 0.0012) - 0.0012, 0.001) * (hu(25) - hu(-105))  # skin
    # liver with its vessels, spleen
    canvas = Image.new("F", (n, n), 0.0)
    _hepatic_vessels(ImageDraw.Draw(canvas), rng, p, n)
    tissue = blur(np.asarray(canvas, dtype=np.float32), 2) * (hu(150) - hu(108)) + hu(108)
    tissue += (hu(5) - hu(0)) * smooth_field(rng, n, 40)
    box = (cx - 0.95 * a, cy - 0.8 * b, cx + 0.35 * a, cy + 0.7 * b)
    paint(image, box, lambda uu, vv: ct_organ_sdf(p, "liver", uu, vv), tissue, 0.003)
    box = (cx + 0.4 * a, cy - 0.25 * b, cx + a, cy + 0.7 * b)
    paint(image, box, lambda uu, vv: ct_organ_sdf(p, "spleen", uu, vv), hu(120), 0.003)
    # stomach with an air-fluid level
    sx, sy = cx + 0.33 * a, cy - 0.5 * b
    sdf, box = _ell(sx, sy, 0.15 * a, 0.25 * b, 0.6)
    paint(image, box, sdf, hu(55), 0.003)
    sdf, box = _ell(sx, sy, 0.125 * a, 0.21 * b, 0.6)
    paint(image, box, sdf, hu(18), 0.003)
    level = sy - 0.21 * b * (0.2 + 0.6 * p["stomach_air"])
    paint(image, box, lambda uu, vv: np.maximum(sdf(uu, vv), vv - level), hu(-950), 0.002)
    # kidneys: homogeneous nephrogram, a sinus of fat and a renal pelvis at the hilum
    for organ, side in (("kidney_left", -1.0), ("kidney_right", 1.0)):
        kx, ky = cx + side * 0.36 * a, cy + (0.42 + p["kidney_y"]) * b
        box = (kx - 0.1, ky - 0.1, kx + 0.1, ky + 0.1)
        paint(image, box, lambda uu, vv, o=organ: ct_organ_sdf(p, o, uu, vv), hu(175), 0.003)
        sinus, _ = _ell(kx - side * 0.06 * a, ky, 0.045 * a, 0.085 * b, side * 0.4)
        paint(image, box, sinus, hu(-50), 0.006)
        pelvis, _ = _ell(kx - side * 0.075 * a, ky, 0.03 * a, 0.045 * b, side * 0.4)
        paint(image, box, pelvis, hu(15), 0.005)
    # spine: body, pedicles and laminae around the canal, spinous and transverse processes; back muscles, psoas
    sx, sy = cx, cy + 0.36 * b
    for m in (-1.0, 1.0):
        sdf, box = _ell(sx + m * 0.06, sy + 0.095, 0.048, 0.04, m * 0.3)
        paint(image, box, sdf, hu(55), 0.004)
        sdf, box = _ell(sx + m * 0.058, sy + 0.005, 0.026, 0.042, m * 0.35)
        paint(image, box, sdf, hu(50), 0.004)
    cortex, box = _ell(sx, sy, 0.045, 0.038)
    paint(image, box, cortex, hu(800), 0.003)
    spongy, box = _ell(sx, sy, 0.039, 0.032)
    paint(image, box, spongy, hu(260), 0.004)
    arch, box = _ell(sx, sy + 0.062, 0.024, 0.022)
    paint(image, box, arch, hu(750), 0.003)
    canal, box = _ell(sx, sy + 0.058, 0.014, 0.013)
    paint(image, box, canal, hu(25), 0.003)
    paint(
        image,
        (sx - 0.01, sy + 0.075, sx + 0.01, sy + 0.13),
        lambda uu, vv: np.maximum(np.abs(uu - sx) - 0.005 + 0.05 * (vv - sy - 0.08), np.abs(vv - sy - 0.1) - 0.022),
        hu(700),
        0.003,
    )
    for m in (-1.0, 1.0):
        paint(
            image,
            (sx - 0.09, sy + 0.02, sx + 0.09, sy + 0.08),
            lambda uu, vv, m=m: np.maximum(
                np.abs(uu - sx - m * 0.045) - 0.02, np.abs(vv - sy - 0.03 - 0.45 * np.abs(uu - sx)) - 0.0035
            ),
            hu(600),
            0.004,
        )
    aorta, box = _ell(sx + 0.03, sy - 0.072, 0.021, 0.021)
    paint(image, box, aorta, hu(170), 0.003)
    ivc, box = _ell(sx - 0.055, sy - 0.085, 0.026, 0.017, 0.3)
    paint(image, box, ivc, hu(130), 0.003)
    pancreas = [
        (cx + (0.55 - 0.7 * t) * a, cy + (0.12 + 0.08 * math.sin(math.pi * t)) * b) for t in np.linspace(0, 1, 9)
    ]
    canvas = Image.new("F", (n, n), 0.0)
    draw_polyline(ImageDraw.Draw(canvas), pancreas, n * 0.032, 1.0, n)
    pancreas_mask = blur(np.asarray(canvas, dtype=np.float32), 2)
    image += pancreas_mask * (hu(95) + (hu(12) - hu(0)) * smooth_field(rng, n, 90) - image)
    for dx, dy, r, value in ((0.035, -0.15, 0.008, 170.0), (0.0, -0.15, 0.011, 140.0)):  # SMA and SMV
        sdf, box = _ell(sx + dx, sy + dy, r, r)
        paint(image, box, sdf, hu(value), 0.003)
    _bowel(image, rng, p)
    table_y = cy + b * 0.92 + 0.008
    image += inside(np.abs(v - table_y + 0.25 * (u - cx) ** 2) - 0.005, 0.002) * (hu(40) - hu(-1000))
    image = 0.6 * image + 0.4 * blur(image, 2)
    full = resize(image, size)
    for focal in focals:
        stamp_focal(full, focal, "ct")
    full += noise * (0.5 * noise_patch(rng, size, 0) + 0.9 * noise_patch(rng, size, 1))
    return full


def render(
    anatomy: Anatomy,
    focals: list[Focal],
    extended: list[Extended],
    size: int,
    noise: float,
    rng: np.random.Generator,
) -> Image.Image:
    """Render a scene to an RGB image (grey values in all three channels)."""
    if anatomy.modality == "xray":
        values = render_chest(anatomy, focals, extended, size, noise, rng)
    elif anatomy.modality == "mri":
        values = render_brain(anatomy, focals, size, noise, rng)
    else:
        values = render_ct(anatomy, focals, size, noise, rng)
    grey = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
