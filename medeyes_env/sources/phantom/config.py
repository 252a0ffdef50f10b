"""The phantom source's settings: :class:`PhantomConfig`, its named presets, the question families and constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.sources.phantom.scene import Anatomy, Extended, Focal, Modality

SALT = 0x4D45_4459
"""First word of every case seed; change it to draw a different benchmark."""
SPLIT_CODES: dict[str, int] = {"train": 1, "validation": 2, "test": 3}
Family = Literal["presence", "location", "organ", "finding", "count", "size", "modality"]
FAMILIES: tuple[Family, ...] = ("presence", "location", "organ", "finding", "count", "size", "modality")
MODALITIES: tuple[Modality, ...] = ("xray", "mri", "ct")
FAMILY_WEIGHTS: dict[str, float] = {
    "presence": 0.34,
    "location": 0.14,
    "organ": 0.1,
    "finding": 0.1,
    "count": 0.14,
    "size": 0.14,
    "modality": 0.08,
}
"""Relative frequency of each family (renormalised over the families a modality has)."""
APPLICABLE_FAMILIES: dict[str, tuple[Family, ...]] = {
    "xray": ("presence", "location", "finding", "count", "size", "modality"),
    "mri": ("presence", "location", "count", "size", "modality"),
    "ct": ("presence", "location", "organ", "count", "size", "modality"),
}
"""The question families each modality can ask."""
SIZE_CLASSES: tuple[str, ...] = ("small", "medium", "large")
SIZE_THRESHOLDS_PX = (24.0, 48.0)
"""Lesion diameters (px of a 1024 px image) between the size classes."""
SIZE_RADII = {"small": (3.0, 10.5), "medium": (13.0, 22.0), "large": (26.0, 40.0)}
"""Lesion radius range (px of 1024) a size question draws for each answer."""
SMALL_RADIUS_PX = 10.5
"""Lesions up to this radius (px of 1024) form the ``small`` stratum."""
PIXEL_SPACING_MM = {"xray": 0.35, "mri": 0.23, "ct": 0.4}
ORGAN = {"xray": "chest", "mri": "brain", "ct": "abdomen"}
"""The organ each modality shows (``Case.organ``)."""
BODY_PART = {"xray": "chest", "mri": "head", "ct": "abdomen"}
"""Gold answer of the open "which part of the body" question."""
MODALITY_NAME = {"xray": "X-ray", "mri": "MRI", "ct": "CT"}
"""Gold answer (and options) of the multiple-choice modality question."""
MODALITY_OPEN = {"xray": "x-ray", "mri": "mri", "ct": "ct"}
"""Gold answer of the open one-word modality question."""
LESION_KIND = {"xray": "lung nodule", "mri": "brain lesion", "ct": "liver lesion"}
"""The round finding each modality asks about."""
LESION_PLURAL = {"xray": "lung nodules", "mri": "enhancing brain lesions", "ct": "focal liver lesions"}
"""The count question's wording of :data:`LESION_KIND`."""
CHEST_FINDINGS = ("lung nodule", "pleural effusion", "pneumothorax")
"""Findings a chest radiograph can hold (the finding question's options)."""
CT_ORGANS = ("liver", "spleen", "kidney")
"""Organs a CT lesion can sit in (the organ question's options)."""
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
"""Options of the quadrant location question, as seen on the image."""
SIDE_NOTE = "Left and right are as seen on the image (the patient's right is on the image's left)."
"""Appended to every question about sides."""


class PhantomConfig(BaseModel):
    """Difficulty and content of the phantom benchmark. Pixel values are pixels of a 1024 px image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = Field(default="custom", description="Name recorded in case.meta['preset'].")
    image_size: int = Field(default=1024, ge=256, le=4096, description="Side of the square image in pixels.")
    lesion_radius: tuple[float, float] = Field(
        default=(5.0, 10.0),
        description="Range of lesion radii (px of 1024) for presence, location, count, organ and modality cases.",
    )
    lesion_contrast: tuple[float, float] = Field(
        default=(0.14, 0.22), description="Range of lesion contrast in display intensity (0..1 grey scale)."
    )
    max_lesions: int = Field(default=3, ge=1, le=6, description="Largest lesion count a count question asks about.")
    distractor_count: tuple[int, int] = Field(
        default=(3, 6),
        description="Range of lesion-like round objects per image (mimics); a lesion takes the place of one.",
    )
    noise: float = Field(default=0.03, ge=0.0, le=0.3, description="Noise standard deviation in display intensity.")
    lesion_replaces_mimic: Literal["small", "always"] = Field(
        default="small",
        description="Which lesions take the place of a mimic: small ones only (large lesions are extra round "
        "objects), or always (the number of round objects never depends on whether a lesion is present).",
    )
    lumen_sigma: float = Field(
        default=1.2,
        ge=0.5,
        le=4.0,
        description="Width (px of the rendered image) of a mimic's lumen, the one detail that tells it from a lesion. "
        "A box downsample by more than about 3x this erases it; a drill that magnifies it makes it plain.",
    )
    mimic_stripes: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Depth of fine stripes (alternate pixel columns) across each mimic, relative to its contrast: "
        "a second full-resolution-only detail, spread over the whole object instead of its centre. Any box "
        "downsample by an even factor (the overview) averages them away.",
    )
    focal_only: bool = Field(
        default=False,
        description="Chest presence and location questions ask about nodules only (no effusion or pneumothorax) and "
        "CT mimics sit in the liver, where CT presence questions look: every finding is a round object in the "
        "organ the question names, as are its mimics.",
    )
    families: tuple[Family, ...] = Field(default=FAMILIES, description="Question families to draw from.")
    modalities: tuple[Modality, ...] = Field(default=MODALITIES, description="Modalities to draw from.")
    cache_size: int = Field(default=8, ge=0, le=256, description="Rendered images kept in the LRU cache.")

    @model_validator(mode="after")
    def _ranges(self) -> PhantomConfig:
        for name in ("lesion_radius", "lesion_contrast", "distractor_count"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(low, high)}")
        if self.lesion_radius[0] < 2.0 or self.lesion_radius[1] > 64.0:
            raise ValueError(f"lesion_radius must lie within [2, 64] px, got {self.lesion_radius}")
        if not self.families or not self.modalities:
            raise ValueError("families and modalities must each name at least one entry")
        if not any(f in APPLICABLE_FAMILIES[m] for m in self.modalities for f in self.families):
            raise ValueError(f"no modality in {self.modalities} has a question family in {self.families}")
        return self


PRESETS: dict[str, PhantomConfig] = {
    "easy": PhantomConfig(
        preset="easy", lesion_radius=(7.0, 14.0), lesion_contrast=(0.18, 0.28), distractor_count=(0, 2), noise=0.025
    ),
    "medium": PhantomConfig(preset="medium"),
    # Looking is necessary by construction: every image holds exactly one round object, plainly visible in a
    # 4x-downsampled overview, and it is a lesion or a mimic with equal odds; only the mimic's lumen (finer
    # than 4 px) tells them apart, so the overview alone answers presence at chance and a drill on the
    # object answers it. MRI is left out: its large lesions carry oedema that shows in the overview.
    "look": PhantomConfig(
        preset="look",
        image_size=512,
        lesion_radius=(56.0, 64.0),
        lesion_contrast=(0.3, 0.4),
        distractor_count=(1, 1),
        noise=0.025,
        lesion_replaces_mimic="always",
        lumen_sigma=2.0,
        mimic_stripes=0.5,
        focal_only=True,
        modalities=("xray", "ct"),
        families=("presence", "modality"),
    ),
    "hard": PhantomConfig(
        preset="hard", lesion_radius=(5.0, 8.0), lesion_contrast=(0.1, 0.15), distractor_count=(4, 8), noise=0.035
    ),
}
"""Named difficulty levels; ``medium`` is the default."""


@dataclass(frozen=True)
class PhantomScene:
    """Everything that is drawn in one case, in pixels of the full image."""

    anatomy: Anatomy
    lesions: tuple[Focal, ...]
    mimics: tuple[Focal, ...]
    extended: tuple[Extended, ...]
    size: int

    @property
    def modality(self) -> Modality:
        """``xray``, ``mri`` or ``ct``."""
        return self.anatomy.modality
