"""The phantom abdominal CT (axial, portal venous phase, soft-tissue window): geometry and the render."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from medeyes_env.sources.phantom.scene import (
    Anatomy,
    FloatArray,
    Focal,
    blur,
    draw_polyline,
    ellipse_sdf,
    ellipse_shape,
    float_pixels,
    inside,
    noise_patch,
    paint,
    pixel_grid,
    resize,
    smooth_field,
    stamp_focal,
)

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
        sdf, box = ellipse_shape(x, y, r * stretch, r, angle)
        paint(image, box, sdf, hu(50), 0.004)
        content = float(rng.choice([hu(10), hu(25), hu(-950), hu(160)], p=[0.35, 0.3, 0.25, 0.1]))
        inner, box = ellipse_shape(x, y, (r - 0.004) * stretch, r - 0.004, angle)
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
    u, v = pixel_grid(n)
    image = _ct_body_wall(p, u, v)
    _ct_upper_organs(image, rng, p, n)
    _ct_kidneys(image, p)
    _ct_spine_and_vessels(image, p)
    _ct_pancreas(image, rng, p, n)
    _bowel(image, rng, p)
    table_y = p["cy"] + p["b"] * 0.92 + 0.008
    image += inside(np.abs(v - table_y + 0.25 * (u - p["cx"]) ** 2) - 0.005, 0.002) * (hu(40) - hu(-1000))
    image = 0.6 * image + 0.4 * blur(image, 2)
    full = resize(image, size)
    for focal in focals:
        stamp_focal(full, focal, "ct")
    full += noise * (0.5 * noise_patch(rng, size, 0) + 0.9 * noise_patch(rng, size, 1))
    return full


def _ct_body_wall(p: Anatomy, u: FloatArray, v: FloatArray) -> FloatArray:
    """Air, subcutaneous fat, the abdominal wall muscles and the skin, at half resolution."""
    cy, b = p["cy"], p["b"]
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
    return image


def _ct_upper_organs(image: FloatArray, rng: np.random.Generator, p: Anatomy, n: int) -> None:
    """Liver with its vessels, spleen, and the stomach with an air-fluid level, painted into ``image``."""
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    canvas = Image.new("F", (n, n), 0.0)
    _hepatic_vessels(ImageDraw.Draw(canvas), rng, p, n)
    tissue = blur(float_pixels(canvas), 2) * (hu(150) - hu(108)) + hu(108)
    tissue += (hu(5) - hu(0)) * smooth_field(rng, n, 40)
    box = (cx - 0.95 * a, cy - 0.8 * b, cx + 0.35 * a, cy + 0.7 * b)
    paint(image, box, lambda uu, vv: ct_organ_sdf(p, "liver", uu, vv), tissue, 0.003)
    box = (cx + 0.4 * a, cy - 0.25 * b, cx + a, cy + 0.7 * b)
    paint(image, box, lambda uu, vv: ct_organ_sdf(p, "spleen", uu, vv), hu(120), 0.003)
    # stomach with an air-fluid level
    sx, sy = cx + 0.33 * a, cy - 0.5 * b
    sdf, box = ellipse_shape(sx, sy, 0.15 * a, 0.25 * b, 0.6)
    paint(image, box, sdf, hu(55), 0.003)
    sdf, box = ellipse_shape(sx, sy, 0.125 * a, 0.21 * b, 0.6)
    paint(image, box, sdf, hu(18), 0.003)
    level = sy - 0.21 * b * (0.2 + 0.6 * p["stomach_air"])
    paint(image, box, lambda uu, vv: np.maximum(sdf(uu, vv), vv - level), hu(-950), 0.002)


def _ct_kidneys(image: FloatArray, p: Anatomy) -> None:
    """Kidneys: homogeneous nephrogram, a sinus of fat and a renal pelvis at the hilum."""
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    for organ, side in (("kidney_left", -1.0), ("kidney_right", 1.0)):
        kx, ky = cx + side * 0.36 * a, cy + (0.42 + p["kidney_y"]) * b
        box = (kx - 0.1, ky - 0.1, kx + 0.1, ky + 0.1)
        paint(image, box, lambda uu, vv, o=organ: ct_organ_sdf(p, o, uu, vv), hu(175), 0.003)
        sinus, _ = ellipse_shape(kx - side * 0.06 * a, ky, 0.045 * a, 0.085 * b, side * 0.4)
        paint(image, box, sinus, hu(-50), 0.006)
        pelvis, _ = ellipse_shape(kx - side * 0.075 * a, ky, 0.03 * a, 0.045 * b, side * 0.4)
        paint(image, box, pelvis, hu(15), 0.005)


def _ct_spine_and_vessels(image: FloatArray, p: Anatomy) -> None:
    """Spine (body, pedicles and laminae around the canal, spinous and transverse processes), aorta and IVC."""
    sx, sy = p["cx"], p["cy"] + 0.36 * p["b"]
    for m in (-1.0, 1.0):
        sdf, box = ellipse_shape(sx + m * 0.06, sy + 0.095, 0.048, 0.04, m * 0.3)
        paint(image, box, sdf, hu(55), 0.004)
        sdf, box = ellipse_shape(sx + m * 0.058, sy + 0.005, 0.026, 0.042, m * 0.35)
        paint(image, box, sdf, hu(50), 0.004)
    cortex, box = ellipse_shape(sx, sy, 0.045, 0.038)
    paint(image, box, cortex, hu(800), 0.003)
    spongy, box = ellipse_shape(sx, sy, 0.039, 0.032)
    paint(image, box, spongy, hu(260), 0.004)
    arch, box = ellipse_shape(sx, sy + 0.062, 0.024, 0.022)
    paint(image, box, arch, hu(750), 0.003)
    canal, box = ellipse_shape(sx, sy + 0.058, 0.014, 0.013)
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
    aorta, box = ellipse_shape(sx + 0.03, sy - 0.072, 0.021, 0.021)
    paint(image, box, aorta, hu(170), 0.003)
    ivc, box = ellipse_shape(sx - 0.055, sy - 0.085, 0.026, 0.017, 0.3)
    paint(image, box, ivc, hu(130), 0.003)


def _ct_pancreas(image: FloatArray, rng: np.random.Generator, p: Anatomy, n: int) -> None:
    """The pancreas along its curve, and the superior mesenteric artery and vein."""
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    sx, sy = cx, cy + 0.36 * b
    pancreas = [
        (cx + (0.55 - 0.7 * t) * a, cy + (0.12 + 0.08 * math.sin(math.pi * t)) * b) for t in np.linspace(0, 1, 9)
    ]
    canvas = Image.new("F", (n, n), 0.0)
    draw_polyline(ImageDraw.Draw(canvas), pancreas, n * 0.032, 1.0, n)
    pancreas_mask = blur(float_pixels(canvas), 2)
    image += pancreas_mask * (hu(95) + (hu(12) - hu(0)) * smooth_field(rng, n, 90) - image)
    for dx, dy, r, value in ((0.035, -0.15, 0.008, 170.0), (0.0, -0.15, 0.011, 140.0)):  # SMA and SMV
        sdf, box = ellipse_shape(sx + dx, sy + dy, r, r)
        paint(image, box, sdf, hu(value), 0.003)
