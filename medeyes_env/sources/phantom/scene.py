"""The phantom's drawing kit: the scene description, shape and noise tools, and the focal objects.

The scene is :class:`Anatomy`, :class:`Focal` and :class:`Extended`; the focal objects are a solid lesion and its
hollow mimic.

The picture-making rules are in :mod:`medeyes_env.sources.phantom.render`'s docstring.
"""

from __future__ import annotations

import ctypes
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
def pixel_grid(n: int) -> tuple[FloatArray, FloatArray]:
    """Normalised ``(u, v)`` of the pixel centres of an ``n`` x ``n`` image (float32, read-only, cached)."""
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


def add_soft_ellipse(
    image: FloatArray,
    x: FloatArray,
    y: FloatArray,
    centre_uv: tuple[float, float],
    ellipse: tuple[float, float, float, float, float],
    edge: float,
    weight: float,
) -> None:
    """``image += weight * inside(ellipse_sdf(x, y, *ellipse), edge)``, computed only where it is not 0.

    ``x, y`` are the grid's coordinates in the ellipse's frame (``u, v`` or a rotated frame) and ``centre_uv``
    the ellipse's centre in ``u, v``. The soft mask is 0 wherever ``ellipse_sdf >= edge / 2``, which lies outside
    the disc of radius ``max(a, b) * (1 + edge / (2 * min(a, b)))`` about the centre, so only that disc's
    bounding window (2 px more on each side) is evaluated: the same pixels as the full-grid sum, a few percent
    of its work.
    """
    n = image.shape[0]
    cx, cy, a, b, angle = ellipse
    reach = max(a, b) * (1.0 + edge / (2.0 * min(a, b)))
    cu, cv = centre_uv
    x0, x1 = max(0, int((cu - reach) * n) - 2), min(n, int((cu + reach) * n) + 3)
    y0, y1 = max(0, int((cv - reach) * n) - 2), min(n, int((cv + reach) * n) + 3)
    if x0 >= x1 or y0 >= y1:
        return
    window = (slice(y0, y1), slice(x0, x1))
    image[window] += weight * inside(ellipse_sdf(x[window], y[window], cx, cy, a, b, angle), edge)


def inside(sdf: FloatArray, width: float) -> FloatArray:
    """Soft indicator of ``sdf < 0`` with a linear edge ``width`` wide (normalised units)."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def resize(array: FloatArray, n: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> FloatArray:
    """Resize a float image to ``n`` x ``n`` with Pillow (``F`` mode)."""
    out = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), "F").resize((n, n), resample)
    return float_pixels(out)


class _ArrowArray(ctypes.Structure):
    """The Arrow C data interface's ``struct ArrowArray`` (a stable ABI), as Pillow exports an image."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.c_void_p),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def float_pixels(image: Image.Image) -> FloatArray:
    """A writable float32 array of an ``F`` image's pixels (a copy).

    ``np.array(image)`` goes through ``Image.tobytes``, which packs the pixels row by row into chunks and joins
    them: 5 ms for a 1024 px float image, a tenth of a render. Pillow (11.2 and later) also exports an image
    through the Arrow C data interface, whose pixel buffer is copied here in one ``memmove`` (0.1 ms); any image
    that export does not give as one flat float buffer takes the ``np.array`` path. The same bytes either way.
    """
    width, height = image.size
    try:
        _schema, capsule = image.__arrow_c_array__()
        exported = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
        flat = exported.length == width * height and exported.offset == 0 and exported.n_children == 0
        data = exported.buffers[1] if flat and exported.n_buffers == 2 else None
    except (AttributeError, ValueError, TypeError):
        data = None
    if image.mode != "F" or not data:
        return np.array(image, dtype=np.float32)
    pixels = np.empty((height, width), dtype=np.float32)
    ctypes.memmove(pixels.ctypes.data, data, pixels.nbytes)
    return pixels  # the capsule's destructor releases Pillow's export


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
        field_ = np.ascontiguousarray(field_.T)  # rows in memory order: later elementwise ops run 2-3x faster
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
    return float_pixels(small.resize((n, n), Image.Resampling.BICUBIC))


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


@lru_cache(maxsize=1)
def _noise_bank_transposed() -> tuple[FloatArray, FloatArray]:
    """:func:`_noise_bank`'s fields transposed into C order (32 MB more per process, built once)."""
    banks = tuple(np.ascontiguousarray(bank.T) for bank in _noise_bank())
    for bank in banks:
        bank.setflags(write=False)
    return banks


def noise_patch(rng: np.random.Generator, n: int, which: int) -> FloatArray:
    """An ``n`` x ``n`` view of bank ``which`` (0 white, 1 correlated) at a random offset and orientation."""
    bank = _noise_bank()[which]
    if n > bank.shape[0]:
        return rng.standard_normal((n, n), dtype=np.float32)
    ox, oy = (int(v) for v in rng.integers(0, bank.shape[0] - n + 1, size=2))
    patch = bank[oy : oy + n, ox : ox + n]
    flip = int(rng.integers(0, 8))
    if flip & 4:
        # The transpose, cut from the bank's transposed copy: the same values with rows in memory order. A
        # transposed view made every elementwise op on the full image stride across rows (2-3x slower).
        patch = _noise_bank_transposed()[which][ox : ox + n, oy : oy + n]
        if flip & 1:
            patch = patch[:, ::-1]
        if flip & 2:
            patch = patch[::-1]
        return patch
    if flip & 1:
        patch = patch[::-1]
    if flip & 2:
        patch = patch[:, ::-1]
    return patch


def draw_polyline(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], width: float, value: float, scale: float
) -> None:
    """Draw a polyline given in normalised coordinates onto a float image of side ``scale``.

    The pixels of Pillow 12's ``ImageDraw.line(..., joint="curve")``: the same C calls with the same arguments
    (computed by the same float expressions), without its per-joint Python overhead (closures, ink lookups,
    re-entrant ``line`` calls), which was about a fifth of a chest radiograph's render. The phantom's images
    are pinned by these calls, so a later Pillow that changes its joints does not change them.
    """
    xy = [(x * scale, y * scale) for x, y in points]
    width = max(1, round(width))
    core = draw.draw  # the C drawing object behind ImageDraw
    ink = core.draw_ink(float(value))
    core.draw_lines(xy, ink, width)
    if width <= 4:
        return
    distance = width / 2 - 1
    for i in range(1, len(xy) - 1):
        (x0, y0), point, (x1, y1) = xy[i - 1], xy[i], xy[i + 1]
        px, py = point
        angle_in = math.degrees(math.atan2(px - x0, y0 - py)) % 360
        angle_out = math.degrees(math.atan2(x1 - px, py - y1)) % 360
        if angle_in == angle_out:
            continue  # straight on: no joint
        flipped = (angle_out > angle_in and angle_out - 180 > angle_in) or (
            angle_out < angle_in and angle_out + 180 > angle_in
        )
        corners = [(px - width / 2 + 1, py - width / 2 + 1), (px + width / 2 - 1, py + width / 2 - 1)]
        start, end = (angle_out + 90, angle_in + 90) if flipped else (angle_in - 90, angle_out - 90)
        core.draw_pieslice(corners, start - 90, end - 90, ink, 1)
        if width > 8:  # cover gaps between the line and the joint, as Pillow does
            turn = 90 if flipped else -90
            gap = [
                _joint_corner(point, angle_in + turn, distance),
                point,
                _joint_corner(point, angle_out + turn, distance),
            ]
            core.draw_lines(gap, ink, 3)


def _joint_corner(point: tuple[float, float], angle: float, distance: float) -> tuple[float, float]:
    """Pillow's ``coord_at_angle`` inside ``ImageDraw.line``, expression for expression."""
    angle -= 90
    x, y = point
    dx, dy = distance * math.cos(math.radians(angle)), distance * math.sin(math.radians(angle))
    return (x + (math.floor(dx) if dx > 0 else math.ceil(dx)), y + (math.floor(dy) if dy > 0 else math.ceil(dy)))


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
    u_all, v_all = pixel_grid(n)
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


def ellipse_shape(cx: float, cy: float, a: float, b: float, angle: float = 0.0):
    """An ellipse as an ``(sdf, bbox)`` pair for :func:`paint`."""
    r = max(a, b)
    return (lambda u, v: ellipse_sdf(u, v, cx, cy, a, b, angle)), (cx - r, cy - r, cx + r, cy + r)
