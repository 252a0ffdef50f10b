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

import numpy as np
from PIL import Image

from medeyes_env.sources.phantom_brain import (
    BRAIN_INSET,
    SULCUS_MAX_DEPTH,
    brain_head_sdf,
    brain_parenchyma_sdf,
    brain_ventricles_sdf,
    render_brain,
    sample_brain,
)
from medeyes_env.sources.phantom_chest import (
    chest_body_sdf,
    chest_heart_sdf,
    chest_lung_sdf,
    chest_lungs_sdf,
    effusion_mask,
    pneumothorax_mask,
    render_chest,
    sample_chest,
)
from medeyes_env.sources.phantom_ct import (
    CT_WINDOW,
    ct_body_sdf,
    ct_organ_sdf,
    hu,
    render_ct,
    sample_abdomen,
)
from medeyes_env.sources.phantom_scene import (
    LUMEN_DEPTH,
    LUMEN_SIGMA,
    Anatomy,
    Extended,
    FloatArray,
    Focal,
    Modality,
    _grid,
    blur,
    draw_polyline,
    ellipse_sdf,
    inside,
    lesion_profile,
    lumen,
    mimic_profile,
    noise_patch,
    paint,
    resize,
    smooth_field,
    stamp_focal,
)

__all__ = [
    "BRAIN_INSET",
    "CT_WINDOW",
    "LUMEN_DEPTH",
    "LUMEN_SIGMA",
    "SULCUS_MAX_DEPTH",
    "Anatomy",
    "Extended",
    "FloatArray",
    "Focal",
    "Modality",
    "_grid",
    "blur",
    "brain_head_sdf",
    "brain_parenchyma_sdf",
    "brain_ventricles_sdf",
    "chest_body_sdf",
    "chest_heart_sdf",
    "chest_lung_sdf",
    "chest_lungs_sdf",
    "ct_body_sdf",
    "ct_organ_sdf",
    "draw_polyline",
    "effusion_mask",
    "ellipse_sdf",
    "hu",
    "inside",
    "lesion_profile",
    "lumen",
    "mimic_profile",
    "noise_patch",
    "paint",
    "pneumothorax_mask",
    "render",
    "render_brain",
    "render_chest",
    "render_ct",
    "resize",
    "sample_abdomen",
    "sample_brain",
    "sample_chest",
    "smooth_field",
    "stamp_focal",
]


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
