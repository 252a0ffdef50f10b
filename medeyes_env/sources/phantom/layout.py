"""Where things go in a phantom case: organ masks, lesion sites, and the scene builder that places findings.

The builder consumes the case's RNG in a fixed order, so one ``(split, index)`` is always one scene.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from medeyes_env.errors import SourceError
from medeyes_env.sources.phantom.brain import brain_parenchyma_sdf
from medeyes_env.sources.phantom.chest import chest_lungs_sdf, effusion_mask, pneumothorax_mask
from medeyes_env.sources.phantom.config import (
    CHEST_FINDINGS,
    CT_ORGANS,
    LESION_KIND,
    SMALL_RADIUS_PX,
    PhantomConfig,
    PhantomScene,
)
from medeyes_env.sources.phantom.ct import ct_organ_sdf
from medeyes_env.sources.phantom.scene import Anatomy, Extended, Focal, pixel_grid


def organ_sdf(scene_anatomy: Anatomy, organ: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Signed distance (normalised units, negative inside) to where lesions of ``organ`` may sit.

    ``organ``: ``lung`` (chest), ``brain`` (parenchyma away from cortex and ventricles),
    or for CT ``liver``, ``spleen``, ``kidney``. Arguments are normalised ``(u, v)`` arrays.
    """
    p = scene_anatomy
    if p.modality == "xray":
        return lambda u, v: chest_lungs_sdf(p, u, v)
    if p.modality == "mri":
        return lambda u, v: brain_parenchyma_sdf(p, u, v)
    if organ == "kidney":
        return lambda u, v: np.minimum(ct_organ_sdf(p, "kidney_left", u, v), ct_organ_sdf(p, "kidney_right", u, v))
    return lambda u, v: ct_organ_sdf(p, organ, u, v)


def _region_test(region: str | None, size: int, radius: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Which candidate points (normalised) lie clearly inside an image side or quadrant."""
    margin = (radius + 12.0) / size
    if region is None:
        return lambda u, v: np.ones(np.shape(u), dtype=bool)
    horizontal = "left" if "left" in region else "right" if "right" in region else None
    vertical = "upper" if "upper" in region else "lower" if "lower" in region else None

    def test(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        ok = np.ones(np.shape(u), dtype=bool)
        if horizontal == "left":
            ok &= u < 0.5 - margin
        elif horizontal == "right":
            ok &= u > 0.5 + margin
        if vertical == "upper":
            ok &= v < 0.5 - margin
        elif vertical == "lower":
            ok &= v > 0.5 + margin
        return ok

    return test


def _place(
    rng: np.random.Generator,
    p: Anatomy,
    organs: str | list[str],
    radius: float,
    size: int,
    taken: list[Focal],
    region: str | None = None,
) -> tuple[float, float, str] | None:
    """A random centre (px) for a round object of ``radius`` px inside one of ``organs``, clear of ``taken``."""
    organs = [organs] if isinstance(organs, str) else organs
    sdfs = [organ_sdf(p, organ) for organ in organs]
    in_region = _region_test(region, size, radius)
    inset = (radius + 6.0) / size
    for _ in range(40):
        u, v = rng.uniform(0.04, 0.96, size=(2, 128))
        values = np.stack([sdf(u, v) for sdf in sdfs])
        ok = (values.min(axis=0) < -inset) & in_region(u, v)
        for index in np.flatnonzero(ok):
            x, y = float(u[index] * size), float(v[index] * size)
            if all(math.hypot(x - f.x, y - f.y) > radius + f.radius + 10.0 for f in taken):
                return x, y, organs[int(values[:, index].argmin())]
    return None


def lesion_site(scene: PhantomScene, rng: np.random.Generator, organ: str | None = None) -> tuple[float, float]:
    """A random plausible lesion centre (px) in ``scene``: where a drill of a normal case may look.

    Drawn from the same distribution as lesion and mimic positions, ignoring
    what is already there, so a crop centred on it does not reveal the label.
    """
    organ = organ or {"xray": "lung", "mri": "brain", "ct": "liver"}[scene.modality]
    site = _place(rng, scene.anatomy, organ, 8.0, scene.size, [])
    if site is None:  # pragma: no cover - the organs are large enough for this never to happen
        raise SourceError(f"no room for a lesion in the {organ} of this phantom")
    return site[0], site[1]


class SceneBuilder:
    """Places findings and mimics for one case, consuming the case RNG in a fixed order."""

    def __init__(self, cfg: PhantomConfig, p: Anatomy, rng: np.random.Generator) -> None:
        self.cfg, self.p, self.rng = cfg, p, rng
        self.scale = cfg.image_size / 1024
        self.lesions: list[Focal] = []
        self.extended: list[Extended] = []
        self.mimics: list[Focal] = []
        self.finding = "none"
        self.organ_with_lesion = "none"

    def pick_finding_kind(self) -> str:
        """The finding a positive case holds: the modality's lesion, or for a chest one of :data:`CHEST_FINDINGS`."""
        if self.p.modality != "xray":
            return LESION_KIND[self.p.modality]
        if self.cfg.focal_only:
            self.rng.random()  # consume what the weighted choice would, so other draws of the case keep their values
            return CHEST_FINDINGS[0]
        return str(self.rng.choice(CHEST_FINDINGS, p=[0.5, 0.25, 0.25]))

    def _contrast(self) -> float:
        low, high = self.cfg.lesion_contrast
        contrast = float(self.rng.uniform(low, high))
        if self.p.modality == "ct" and self.rng.random() < 0.7:
            contrast = -contrast
        return contrast

    def add_finding(self, kind: str, radius: float | None = None, region: str | None = None, organ: str | None = None):
        """Add one finding of ``kind``, optionally of a given radius (px of 1024), image region or CT organ."""
        self.finding = kind
        if kind in ("pleural effusion", "pneumothorax"):
            side = region.split()[0] if region else ("left" if self.rng.random() < 0.5 else "right")
            if kind == "pleural effusion":
                self.extended.append(Extended("effusion", side, float(self.rng.uniform(0.04, 0.1))))
            else:
                self.extended.append(Extended("pneumothorax", side, float(self.rng.uniform(0.02, 0.045))))
            self.organ_with_lesion = "pleura"
            return
        if radius is None:
            radius = float(self.rng.uniform(*self.cfg.lesion_radius))
        radius *= self.scale
        contrast = self._contrast()
        if self.p.modality == "ct":
            organs = list(CT_ORGANS) if organ == "any" else [organ or "liver"]
        else:
            organs = ["lung" if self.p.modality == "xray" else "brain"]
        organs = [o for o in organs if o != "kidney" or radius < 24 * self.scale]
        site = _place(self.rng, self.p, organs, radius, self.cfg.image_size, self.lesions, region)
        if site is None:  # pragma: no cover - placement always succeeds for the shipped geometry
            raise SourceError(f"could not place a {kind} of radius {radius:.1f} px in region {region!r}")
        target = site[2]
        edema, necrotic = 0.0, False
        if self.p.modality == "mri" and radius > 12 * self.scale:
            edema = float(self.rng.uniform(0.5, 1.0))
            necrotic = radius > 20 * self.scale
            contrast = max(contrast, 0.2)
        self.lesions.append(Focal(site[0], site[1], radius, contrast, "lesion", target, edema, necrotic))
        self.organ_with_lesion = target

    def fill_mimics(self) -> None:
        """Add lesion-like normal structures so that the count of round objects does not reveal lesions.

        ``distractor_count`` slots are spread over the organs; each small lesion takes
        the place of one slot in its own organ, so no organ holds more round objects
        because it holds a lesion.
        """
        low, high = self.cfg.distractor_count
        ct_pool = ["liver"] if self.cfg.focal_only else ["liver", "liver", "liver", "spleen", "kidney"]
        pool = {"xray": ["lung"], "mri": ["brain"], "ct": ct_pool}[self.p.modality]
        slots = [pool[int(self.rng.integers(len(pool)))] for _ in range(int(self.rng.integers(low, high + 1)))]
        for lesion in self.lesions:
            replaces = self.cfg.lesion_replaces_mimic == "always" or lesion.radius <= SMALL_RADIUS_PX * self.scale
            if replaces and slots:
                slots.remove(lesion.organ) if lesion.organ in slots else slots.pop()
        for organ in slots:
            radius = float(self.rng.uniform(*self.cfg.lesion_radius)) * self.scale
            contrast = self._contrast()
            site = _place(self.rng, self.p, organ, radius, self.cfg.image_size, self.lesions + self.mimics)
            if site is not None:  # a crowded organ may have no room left; then the image has one mimic less
                mimic = Focal(
                    site[0],
                    site[1],
                    radius,
                    contrast,
                    "mimic",
                    organ,
                    lumen_sigma=self.cfg.lumen_sigma,
                    stripes=self.cfg.mimic_stripes,
                )
                self.mimics.append(mimic)

    def scene(self) -> PhantomScene:
        """The scene placed so far."""
        return PhantomScene(self.p, tuple(self.lesions), tuple(self.mimics), tuple(self.extended), self.cfg.image_size)


def extended_box(scene: PhantomScene, finding: Extended) -> tuple[float, float, float, float]:
    """The box of an effusion or pneumothorax, from its mask on a 256-cell grid."""
    n = 256
    u, v = pixel_grid(n)
    if finding.kind == "effusion":
        mask = effusion_mask(scene.anatomy, finding.side, finding.extent, u, v)
    else:
        mask = pneumothorax_mask(scene.anatomy, finding.side, finding.extent, u, v)
    rows, cols = np.nonzero(mask > 0.5)
    if rows.size == 0:  # pragma: no cover - the masks are never empty for the shipped ranges
        raise SourceError(f"empty {finding.kind} mask")
    cell = scene.size / n
    return (
        float(cols.min() * cell),
        float(rows.min() * cell),
        float(min(scene.size, (cols.max() + 1) * cell)),
        float(min(scene.size, (rows.max() + 1) * cell)),
    )


def swap_class(focal: Focal, config: PhantomConfig) -> Focal:
    """``focal`` as the other class: a lesion as a mimic with the config's lumen and stripes, or the reverse."""
    if focal.kind == "lesion":
        return replace(
            focal, kind="mimic", edema=0.0, necrotic=False, lumen_sigma=config.lumen_sigma, stripes=config.mimic_stripes
        )
    return replace(focal, kind="lesion", stripes=0.0)


def size_stratum(radii: list[float], config: PhantomConfig) -> str:
    """The size stratum of a case's largest lesion (``none`` without one), in px of a 1024 px image."""
    if not radii:
        return "none"
    top = max(radii) * 1024 / config.image_size
    return "small" if top <= SMALL_RADIUS_PX else "medium" if top <= 24 else "large"
