"""Draw a phantom scene: chest radiograph, brain MRI or abdominal CT, by the scene's modality.

The drawing modules (:mod:`~medeyes_env.sources.phantom.scene`, the kit, and one per modality:
:mod:`~medeyes_env.sources.phantom.chest`, :mod:`~medeyes_env.sources.phantom.brain`,
:mod:`~medeyes_env.sources.phantom.ct`) draw pictures; :mod:`~medeyes_env.sources.phantom.layout` and
:mod:`~medeyes_env.sources.phantom.source` decide what is in them and ask the questions. Geometry is written
in normalised image coordinates ``(u, v)`` in ``[0, 1]`` (``u`` to the image's right, ``v`` down) as
approximate signed distance functions (negative inside), so the same shape functions draw the picture and
answer "is this point inside the liver?" when findings are placed.

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
brighter rim (:func:`~medeyes_env.sources.phantom.scene.lumen`). The lumen pattern has zero integral
and zero second moment and lives at spatial frequencies above what a 4x downsample keeps, so a 256 px
overview of a 1024 px image shows both as the same blob, while a full-resolution crop shows the lumen plainly.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from medeyes_env.sources.phantom.brain import render_brain
from medeyes_env.sources.phantom.chest import render_chest
from medeyes_env.sources.phantom.ct import render_ct
from medeyes_env.sources.phantom.scene import Anatomy, Extended, Focal


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
