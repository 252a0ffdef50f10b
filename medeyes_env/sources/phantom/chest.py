"""The phantom chest radiograph (PA): geometry, masks of extended findings, and the render."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from medeyes_env.sources.phantom.scene import (
    Anatomy,
    Extended,
    FloatArray,
    Focal,
    add_soft_ellipse,
    blur,
    draw_polyline,
    ellipse_sdf,
    float_pixels,
    inside,
    noise_patch,
    pixel_grid,
    resize,
    smooth_field,
    stamp_focal,
)

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
    u, v = pixel_grid(n)
    cx = p["cx"]
    body = inside(chest_body_sdf(p, u, v), 0.004)
    lateral = np.clip(np.abs(u - cx) / 0.5, 0.0, 1.0)
    att = body * (0.55 + 0.5 * (1.0 - lateral * lateral)) * (1.0 + 0.02 * smooth_field(rng, n, 5))
    lung_sdf, profile, air, keep = _lung_air(rng, p, u, v, extended)
    att -= air
    _mediastinum(att, p, u, v, body)
    # bones (seen best against the lungs) and vessels, drawn at this resolution
    canvas = Image.new("F", (n, n), 0.0)
    _ribs(ImageDraw.Draw(canvas), p, n)
    att += 0.16 * blur(float_pixels(canvas), 2) * body * (0.12 + 0.88 * profile)
    canvas = Image.new("F", (n, n), 0.0)
    _vessel_trees(ImageDraw.Draw(canvas), rng, p, n)
    drawn = float_pixels(canvas)
    vessels = blur(drawn, 2) * 0.5 + drawn * 0.5
    att += 1.3 * vessels * inside(lung_sdf, 0.004) * keep
    for hx, hy in ((cx - 0.075, 0.47), (cx + 0.08, 0.445)):
        add_soft_ellipse(att, u, v, (hx, hy), (hx, hy, 0.03, 0.055, 0.0), 0.03, 0.1)
    full = resize(att, size)
    for focal in focals:
        stamp_focal(full, focal, "xray", scale=1.15)  # about 1 display unit per unit of contrast in the lungs
    for finding in extended:
        if finding.kind == "pneumothorax":
            _pleural_line(full, p, finding)
    image = 1.0 - np.exp(-1.1 * full)
    image += noise * (0.6 * noise_patch(rng, size, 0) + 0.8 * noise_patch(rng, size, 1))
    return image


def _lung_air(
    rng: np.random.Generator, p: Anatomy, u: FloatArray, v: FloatArray, extended: list[Extended]
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """The lungs' sdf, air-thickness profile and air (less where fluid, more in a pneumothorax) and where vessels show.

    Lung air: its thickness along the ray rises quickly inside the pleural edge.
    """
    n = u.shape[0]
    side_sdf = {side: chest_lung_sdf(p, side, u, v) for side in ("left", "right")}
    lung_sdf = np.minimum(side_sdf["left"], side_sdf["right"])
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
    return lung_sdf, profile, air, keep


def _mediastinum(att: FloatArray, p: Anatomy, u: FloatArray, v: FloatArray, body: FloatArray) -> None:
    """Add the mediastinum and heart, spine and trachea, breast shadows and the gastric bubble to ``att``."""
    cx = p["cx"]
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
