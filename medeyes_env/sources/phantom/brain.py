"""The phantom brain MRI (axial T1 after contrast): geometry and the render."""

from __future__ import annotations

import itertools
import math

import numpy as np

from medeyes_env.sources.phantom.scene import (
    Anatomy,
    FloatArray,
    Focal,
    add_soft_ellipse,
    blur,
    inside,
    noise_patch,
    pixel_grid,
    resize,
    smooth_field,
    stamp_focal,
)

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


def _frame_to_grid(p: Anatomy, x: float, y: float) -> tuple[float, float]:
    """The ``(u, v)`` of a point given in the head's frame (the inverse of :func:`_brain_frame`)."""
    c, s = math.cos(p["tilt"]), math.sin(p["tilt"])
    return p["cx"] + c * x - s * y, p["cy"] + s * x + c * y


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
    u, v = pixel_grid(n)
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
    surface = _cortical_surface(rng, p, x, y, brain_depth)
    gap = (0.0011 + 0.0007 * smooth_field(rng, n, 12)) * p["sulci"]
    csf = inside(surface - gap, 0.0024)
    grey = inside(surface - 0.0095 - 0.0015 * smooth_field(rng, n, 20), 0.006)
    tissue = (0.68 - 0.25 * grey) * (1.0 + 0.025 * smooth_field(rng, n, 70) + 0.02 * smooth_field(rng, n, 12))
    for s in (-1.0, 1.0):  # caudate heads and thalami
        caudate = (s * 0.065 * p["vent"], -0.1, 0.026, 0.045, -s * 0.3)
        add_soft_ellipse(tissue, x, y, _frame_to_grid(p, *caudate[:2]), caudate, 0.015, -0.1)
        thalamus = (s * 0.045, 0.05, 0.035, 0.05, 0.0)
        add_soft_ellipse(tissue, x, y, _frame_to_grid(p, *thalamus[:2]), thalamus, 0.02, -0.07)
    window = (slice(int((p["cy"] - 0.26) * n), int((p["cy"] + 0.26) * n)),) * 1 + (
        slice(int((p["cx"] - 0.2) * n), int((p["cx"] + 0.2) * n)),
    )
    csf[window] = np.maximum(csf[window], inside(brain_ventricles_sdf(p, u[window], v[window]), 0.006))
    value = tissue * (1.0 - csf) + 0.1 * csf
    for s in (-1.0, 1.0):  # choroid plexus in the atria enhances
        plexus = (s * 0.072 * p["vent"], 0.11, 0.014, 0.02, 0.0)
        add_soft_ellipse(value, x, y, _frame_to_grid(p, *plexus[:2]), plexus, 0.008, 0.28)
    for sy in (-1.0, 1.0):  # superior sagittal sinus, front and back
        sinus = (0.0, sy * (p["b"] - BRAIN_INSET - 0.02), 0.01, 0.007, 0.0)
        add_soft_ellipse(value, x, y, _frame_to_grid(p, *sinus[:2]), sinus, 0.004, 0.45)
    image = image * (1.0 - brain) + value * brain
    image *= 1.0 + 0.07 * smooth_field(rng, n, 3)  # coil sensitivity
    image = 0.5 * image + 0.5 * blur(image, 2)  # acquisition resolution below the display's
    full = resize(image, size)
    for focal in focals:
        stamp_focal(full, focal, "mri")
    real = full + noise * noise_patch(rng, size, 0)
    imag = noise * noise_patch(rng, size, 0)
    return np.sqrt(real * real + imag * imag)  # magnitude image: Rician noise


def _cortical_surface(
    rng: np.random.Generator, p: Anatomy, x: FloatArray, y: FloatArray, brain_depth: FloatArray
) -> FloatArray:
    """Distance to the nearest surface the cortex follows: the brain's own, the sulci and the midline fissure.

    Sulci are radial lines whose phase wanders with a smooth field; the cortex is the ribbon along all of them.
    """
    n = x.shape[0]
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
    return np.minimum(dist, brain_depth)
