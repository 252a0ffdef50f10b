"""The phantom source: a procedural benchmark of medical images where small findings need a closer look.

The embedded default data source of MedEyes. It needs nothing but numpy and
Pillow, renders every case on demand in tens of milliseconds, and is infinite
and deterministic: the same ``(split, index, config)`` always gives the same
case and the same image bytes.

Modalities (grey values in all three RGB channels, 1024 px by default)
----------------------------------------------------------------------
- ``xray``: a PA chest radiograph. Lungs with branching vessels, heart,
  mediastinum and trachea, posterior and anterior ribs, clavicles, spine,
  diaphragm domes and gastric bubble. Findings: lung nodules; pleural effusion
  (fluid with a meniscus that blunts the costophrenic angle); pneumothorax (a
  thin visceral pleural line with no lung markings beyond it).
- ``mri``: an axial T1-weighted post-contrast brain slice. Scalp, skull with
  diploe, sulcal CSF, cortex and white matter, lateral ventricles with choroid
  plexus, deep grey nuclei, sagittal sinus, coil shading and Rician noise.
  Finding: an enhancing mass; larger ones are ring-enhancing with a necrotic
  core and surrounding oedema.
- ``ct``: an axial portal-venous abdominal CT (window W400/L40). Body wall,
  liver with vessels, spleen, stomach with an air-fluid level, kidneys, pancreas,
  bowel loops, aorta, IVC, vertebra, psoas and back muscles, the table.
  Finding: a focal lesion, hypodense (70 %) or hyperdense, in the liver (or in
  the spleen or a kidney for the organ question).

Every image also holds lesion-like normal structures ("mimics": vessels and
bronchi seen end-on, drawn from the same size and contrast distribution as the
lesions). A mimic is the lesion's blob with a lumen: a dark (for a dark
lesion, bright) centre about 3 px across with a brighter rim, a pattern with
zero integral and zero second moment, finer than 4 px
(:func:`~medeyes_env.sources.phantom_anatomy.lumen`). A 4x box downsample
(the 256 px overview of a 1024 px image) turns lesion and mimic into the same
blob; a full-resolution crop shows the lumen plainly. A small lesion takes the
place of a mimic in its organ, so neither the number nor the places of the
round objects in an image depend on whether a lesion is present.

Image sides
-----------
Images follow the radiological convention: the patient's right is on the
image's LEFT. Every question about sides says "as seen on the image", and every
answer is an image side, never a patient side.

Question families (``case.meta["family"]``)
-------------------------------------------
========== ======= =====================================================================
family     type    example (answers balanced: yes/no 50/50, choices uniform)
========== ======= =====================================================================
presence   CLOSED  "Is there a lung nodule?" -> yes / no
location   CHOICE  side (left/right of the image) or quadrant of the image
organ      CHOICE  CT only: "Which organ contains the lesion?" liver/spleen/kidney
           / OPEN
finding    CHOICE  chest only: nodule / pleural effusion / pneumothorax
count      OPEN    "How many lung nodules are there?" -> "0" .. ``max_lesions`` (digits)
size       CHOICE  small (< 24 px across) / medium (24-48 px) / large (> 48 px), px of 1024
modality   CHOICE  "What imaging modality is this?" X-ray/CT/MRI; or OPEN body part
           / OPEN
========== ======= =====================================================================

``case.meta`` also holds the facts behind the answer: ``finding``,
``n_lesions``, ``lesion_radius_px`` (largest lesion), ``lesion_contrast``,
``n_mimics``, ``stratum`` (``small``: radius <= 10.5 px, ``medium``, ``large``,
``extended`` for effusion and pneumothorax, ``none``), ``organ_with_lesion``,
``preset`` and ``pixel_spacing_mm``. Gold regions are exact boxes around each
lesion (radius + 1.5 px); for effusion and pneumothorax, the box of the
region computed on a 256-cell grid (within 4 px).

Presets (``phantom:easy``, ``phantom`` = ``phantom:medium``, ``phantom:hard``)
-----------------------------------------------------------------------------
See :data:`PRESETS`: lesion radius, contrast, mimic count and noise. Any field
of :class:`PhantomConfig` can be changed with ``PhantomSource(PhantomConfig(...))``.

Seeding
-------
The case RNG is ``numpy.random.SeedSequence([SALT, split_code, index, stream])``
with distinct split codes (train 1, validation 2, test 3): no two splits share a
seed, so no case appears in two splits.

Why drill (measured by ``benchmarks/phantom_focus.py``)
-------------------------------------------------------
Presence of a small lesion is close to chance from the 256 px overview and
answerable from a 192 px crop around the suspected spot zoomed to 256 px. A
classical detector (a lesion matched filter with a lumen veto, one per
modality) fitted on 200 train cases, scored on 400 test presence cases per
preset (accuracy %, chance 50; ``drill``: normal cases drilled at a random
plausible site; ``drill@mimic``: at a mimic, the harder case)::

    preset  modality  overview  drill  drill@mimic
    easy    all          65.0    89.0     71.5     (radius 7-14 px, 0-2 mimics)
    easy    small        63.8    88.4     70.4     (radius <= 10.5 px only)
    medium  all          49.8    86.0     73.8     (radius 5-10 px: all small)
    medium  xray         50.0    86.0     83.7
    medium  mri          44.2    86.1     66.1
    medium  ct           55.7    85.9     76.5
    hard    all          48.2    79.5     78.5     (radius 5-8 px, 4-8 mimics)

Rendering a 1024 px case takes about 52 ms of CPU (CT 35, chest 59, brain 61).
Not all information is gone at 256 px: an ideal observer that knew where a
blob was and both templates exactly would still separate lesion from mimic
with d' about 1.5 at medium contrast (about 15 at full resolution; white-noise
approximation). The detector's overview is near chance because it cannot tell
which of several identical-looking blobs to judge.
"""

from __future__ import annotations

import difflib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes_env.cases import AnswerType, Case, Region, Split
from medeyes_env.errors import ConfigError, SourceError
from medeyes_env.sources import phantom_anatomy as anatomy
from medeyes_env.sources import register_source
from medeyes_env.sources.phantom_anatomy import Anatomy, Extended, Focal, Modality

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
_APPLICABLE: dict[str, tuple[Family, ...]] = {
    "xray": ("presence", "location", "finding", "count", "size", "modality"),
    "mri": ("presence", "location", "count", "size", "modality"),
    "ct": ("presence", "location", "organ", "count", "size", "modality"),
}
SIZE_CLASSES: tuple[str, ...] = ("small", "medium", "large")
SIZE_THRESHOLDS_PX = (24.0, 48.0)
"""Lesion diameters (px of a 1024 px image) between the size classes."""
_SIZE_RADII = {"small": (3.0, 10.5), "medium": (13.0, 22.0), "large": (26.0, 40.0)}
SMALL_RADIUS_PX = 10.5
"""Lesions up to this radius (px of 1024) form the ``small`` stratum."""
PIXEL_SPACING_MM = {"xray": 0.35, "mri": 0.23, "ct": 0.4}
_ORGAN = {"xray": "chest", "mri": "brain", "ct": "abdomen"}
_BODY_PART = {"xray": "chest", "mri": "head", "ct": "abdomen"}
_MODALITY_NAME = {"xray": "X-ray", "mri": "MRI", "ct": "CT"}
_MODALITY_OPEN = {"xray": "x-ray", "mri": "mri", "ct": "ct"}
_LESION = {"xray": "lung nodule", "mri": "brain lesion", "ct": "liver lesion"}
_LESION_PLURAL = {"xray": "lung nodules", "mri": "enhancing brain lesions", "ct": "focal liver lesions"}
_CHEST_FINDINGS = ("lung nodule", "pleural effusion", "pneumothorax")
_CT_ORGANS = ("liver", "spleen", "kidney")
_QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
_SIDE_NOTE = "Left and right are as seen on the image (the patient's right is on the image's left)."


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
        if not any(f in _APPLICABLE[m] for m in self.modalities for f in self.families):
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


# ----------------------------------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------------------------------


def organ_sdf(scene_anatomy: Anatomy, organ: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Signed distance (normalised units, negative inside) to where lesions of ``organ`` may sit.

    ``organ``: ``lung`` (chest), ``brain`` (parenchyma away from cortex and ventricles),
    or for CT ``liver``, ``spleen``, ``kidney``. Arguments are normalised ``(u, v)`` arrays.
    """
    p = scene_anatomy
    if p.modality == "xray":
        return lambda u, v: anatomy.chest_lungs_sdf(p, u, v)
    if p.modality == "mri":
        return lambda u, v: anatomy.brain_parenchyma_sdf(p, u, v)
    if organ == "kidney":
        return lambda u, v: np.minimum(
            anatomy.ct_organ_sdf(p, "kidney_left", u, v), anatomy.ct_organ_sdf(p, "kidney_right", u, v)
        )
    return lambda u, v: anatomy.ct_organ_sdf(p, organ, u, v)


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


# ----------------------------------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A case under construction."""

    question: str
    answer: str
    answer_type: AnswerType
    options: tuple[str, ...] = ()
    variant: str = ""


_DRAWN_CACHE = 4096
"""Drawn scenes (geometry and question, no pixels) kept per source."""


class PhantomSource:
    """Infinite, deterministic procedural cases: ``case(split, index)`` for any index >= 0."""

    name = "phantom"

    def __init__(self, config: PhantomConfig | None = None) -> None:
        self.config = config or PRESETS["medium"]
        self._cache: OrderedDict[tuple[str, int], Image.Image] = OrderedDict()
        # Drawn scenes are small: keep many, so the G rollouts of a case (and its render) draw it once.
        self._drawn: OrderedDict[tuple[str, int], tuple[Any, Any, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def size(self, split: Split) -> int | None:
        """Always ``None``: the phantom is infinite."""
        _split_code(split)
        return None

    # -- public API ----------------------------------------------------------------------------------------------------

    def case(self, split: Split, index: int) -> Case:
        """The ``index``-th case of ``split``; cheap (the image is rendered when first loaded)."""
        scene, draft, meta = self._draw(split, index)
        regions = tuple(
            Region(box=lesion.box(scene.size), label=_LESION[scene.modality].split()[-1]) for lesion in scene.lesions
        ) + tuple(Region(box=_extended_box(scene, f), label=f.kind) for f in scene.extended)
        case = Case(
            id=f"phantom/{split}/{index:06d}",
            question=draft.question,
            answer=draft.answer,
            answer_type=draft.answer_type,
            options=draft.options,
            regions=regions,
            lookalikes=tuple(Region(box=mimic.box(scene.size), label="mimic") for mimic in scene.mimics),
            modality=scene.modality,
            organ=_ORGAN[scene.modality],
            source=self.name,
            split=split,
            image_size=(scene.size, scene.size),
            meta=meta,
        )
        return case.with_image_factory(partial(self.image, split, index))

    def scene(self, split: Split, index: int) -> PhantomScene:
        """What case ``index`` of ``split`` draws: anatomy, lesions, mimics and extended findings."""
        return self._draw(split, index)[0]

    def image(self, split: Split, index: int) -> Image.Image:
        """The rendered RGB image of a case (a fresh copy; the last few renders are cached)."""
        key = (split, index)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached.copy()
        scene = self.scene(split, index)
        rng = np.random.default_rng(np.random.SeedSequence([SALT, _split_code(split), index, 1]))
        image = anatomy.render(
            scene.anatomy, [*scene.lesions, *scene.mimics], list(scene.extended), scene.size, self.config.noise, rng
        )
        if self.config.cache_size:
            with self._lock:
                self._cache[key] = image
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        return image.copy()

    # -- drawing a case ------------------------------------------------------------------------------------------------

    def _draw(self, split: Split, index: int) -> tuple[PhantomScene, _Draft, dict[str, str | int | float | bool]]:
        if not isinstance(index, int | np.integer) or index < 0:
            raise SourceError(f"phantom case index must be an integer >= 0, got {index!r}")
        key = (split, int(index))
        with self._lock:
            drawn = self._drawn.get(key)
            if drawn is not None:
                self._drawn.move_to_end(key)
                return drawn[0], drawn[1], dict(drawn[2])  # meta copied: a Case's meta may be edited
        scene, draft, meta = self._draw_uncached(split, int(index))
        with self._lock:
            self._drawn[key] = (scene, draft, meta)
            while len(self._drawn) > _DRAWN_CACHE:
                self._drawn.popitem(last=False)
        return scene, draft, dict(meta)

    def _draw_uncached(
        self, split: Split, index: int
    ) -> tuple[PhantomScene, _Draft, dict[str, str | int | float | bool]]:
        rng = np.random.default_rng(np.random.SeedSequence([SALT, _split_code(split), int(index), 0]))
        cfg = self.config
        modalities = [m for m in cfg.modalities if any(f in _APPLICABLE[m] for f in cfg.families)]
        modality: Modality = modalities[int(rng.integers(len(modalities)))]
        families = [f for f in _APPLICABLE[modality] if f in cfg.families]
        weights = np.array([FAMILY_WEIGHTS[f] for f in families])
        family: Family = families[int(rng.choice(len(families), p=weights / weights.sum()))]
        p = {"xray": anatomy.sample_chest, "mri": anatomy.sample_brain, "ct": anatomy.sample_abdomen}[modality](rng)
        builder = _SceneBuilder(cfg, p, rng)
        draft = getattr(self, f"_family_{family}")(builder)
        builder.fill_mimics()
        scene = builder.scene()
        radii = [f.radius for f in scene.lesions]
        finding = builder.finding
        if scene.extended:
            stratum = "extended"
        elif radii:
            top = max(radii) * 1024 / cfg.image_size
            stratum = "small" if top <= SMALL_RADIUS_PX else "medium" if top <= 24 else "large"
        else:
            stratum = "none"
        meta: dict[str, str | int | float | bool] = {
            "family": family,
            "variant": draft.variant,
            "preset": cfg.preset,
            "finding": finding,
            "n_lesions": len(scene.lesions),
            "lesion_radius_px": round(max(radii), 2) if radii else 0.0,
            "lesion_contrast": round(abs(scene.lesions[0].contrast), 4) if scene.lesions else 0.0,
            "n_mimics": len(scene.mimics),
            "stratum": stratum,
            "organ_with_lesion": builder.organ_with_lesion,
            "pixel_spacing_mm": round(PIXEL_SPACING_MM[modality] * 1024 / cfg.image_size, 4),
        }
        return scene, draft, meta

    # One method per question family: each decides the answer first, then makes the scene agree with it.

    def _family_presence(self, b: _SceneBuilder) -> _Draft:
        present = bool(b.rng.random() < 0.5)
        kind = b.pick_finding_kind()
        question = {
            "lung nodule": "Is there a lung nodule on this chest radiograph?",
            "pleural effusion": "Is there a pleural effusion?",
            "pneumothorax": "Is there a pneumothorax?",
            "brain lesion": "Is there an enhancing lesion in the brain?",
            "liver lesion": "Is there a focal lesion in the liver?",
        }[kind]
        if present:
            b.add_finding(kind)
        return _Draft(question, "yes" if present else "no", AnswerType.CLOSED, variant=kind)

    def _family_location(self, b: _SceneBuilder) -> _Draft:
        kind = b.pick_finding_kind()
        by_quadrant = kind not in ("pleural effusion", "pneumothorax") and bool(b.rng.random() < 0.5)
        options = _QUADRANTS if by_quadrant else ("left", "right")
        answer = options[int(b.rng.integers(len(options)))]
        b.add_finding(kind, region=answer if by_quadrant else f"{answer} side", organ="any")
        if b.p.modality == "ct":
            b.finding = "focal lesion"
        if by_quadrant:
            question = f"In which quadrant of the image is the {b.finding}? {_SIDE_NOTE}"
        else:
            question = f"On which side of the image is the {b.finding}? {_SIDE_NOTE}"
        return _Draft(question, answer, AnswerType.CHOICE, options, variant="quadrant" if by_quadrant else "side")

    def _family_organ(self, b: _SceneBuilder) -> _Draft:
        organ = _CT_ORGANS[int(b.rng.integers(3))]
        b.add_finding("liver lesion", organ=organ)
        b.finding = "focal lesion"
        if b.rng.random() < 0.5:
            options = tuple(b.rng.permutation(_CT_ORGANS).tolist())
            return _Draft("Which organ contains the focal lesion?", organ, AnswerType.CHOICE, options, "choice")
        question = "Which organ contains the focal lesion? Answer with one word."
        return _Draft(question, organ, AnswerType.OPEN, variant="open")

    def _family_finding(self, b: _SceneBuilder) -> _Draft:
        kind = _CHEST_FINDINGS[int(b.rng.integers(3))]
        b.add_finding(kind)
        options = tuple(b.rng.permutation(_CHEST_FINDINGS).tolist())
        return _Draft(
            "What is the abnormal finding on this chest radiograph?", kind, AnswerType.CHOICE, options, "choice"
        )

    def _family_count(self, b: _SceneBuilder) -> _Draft:
        kind = _LESION[b.p.modality]
        count = int(b.rng.integers(0, b.cfg.max_lesions + 1))
        for _ in range(count):
            b.add_finding(kind)
        b.finding = kind if count else "none"
        plural = _LESION_PLURAL[b.p.modality]
        return _Draft(f"How many {plural} are there? Answer with a number.", str(count), AnswerType.OPEN, variant=kind)

    def _family_size(self, b: _SceneBuilder) -> _Draft:
        kind = _LESION[b.p.modality]
        answer = SIZE_CLASSES[int(b.rng.integers(3))]
        low, high = _SIZE_RADII[answer]
        if answer == "small":
            low = max(low, b.cfg.lesion_radius[0])
        b.add_finding(kind, radius=float(b.rng.uniform(low, high)), organ="liver" if kind == "liver lesion" else None)
        scale = b.cfg.image_size / 1024
        small, large = (t * scale for t in SIZE_THRESHOLDS_PX)
        mm = PIXEL_SPACING_MM[b.p.modality] / scale
        question = (
            f"How large is the {kind} (its diameter)? small: under {small:.0f} px (about {small * mm:.0f} mm); "
            f"medium: {small:.0f} to {large:.0f} px; large: over {large:.0f} px (about {large * mm:.0f} mm). "
            f"Pixels are those of the full {b.cfg.image_size} px image."
        )
        return _Draft(question, answer, AnswerType.CHOICE, SIZE_CLASSES, variant=kind)

    def _family_modality(self, b: _SceneBuilder) -> _Draft:
        if b.rng.random() < 0.5:
            b.add_finding(b.pick_finding_kind())
        modality = b.p.modality
        if b.rng.random() < 0.5:
            options = tuple(b.rng.permutation(list(_MODALITY_NAME.values())).tolist())
            return _Draft(
                "What imaging modality is this?", _MODALITY_NAME[modality], AnswerType.CHOICE, options, "choice"
            )
        if b.rng.random() < 0.5:
            question = "What imaging modality was used for this image? Answer with one word."
            return _Draft(question, _MODALITY_OPEN[modality], AnswerType.OPEN, variant="open")
        question = "Which part of the body is shown? Answer with one word."
        return _Draft(question, _BODY_PART[modality], AnswerType.OPEN, variant="body part")


class _SceneBuilder:
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
        if self.p.modality != "xray":
            return _LESION[self.p.modality]
        if self.cfg.focal_only:
            self.rng.random()  # consume what the weighted choice would, so other draws of the case keep their values
            return _CHEST_FINDINGS[0]
        return str(self.rng.choice(_CHEST_FINDINGS, p=[0.5, 0.25, 0.25]))

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
            organs = list(_CT_ORGANS) if organ == "any" else [organ or "liver"]
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
        return PhantomScene(self.p, tuple(self.lesions), tuple(self.mimics), tuple(self.extended), self.cfg.image_size)


def _extended_box(scene: PhantomScene, finding: Extended) -> tuple[float, float, float, float]:
    """The box of an effusion or pneumothorax, from its mask on a 256-cell grid."""
    n = 256
    u, v = anatomy._grid(n)
    if finding.kind == "effusion":
        mask = anatomy.effusion_mask(scene.anatomy, finding.side, finding.extent, u, v)
    else:
        mask = anatomy.pneumothorax_mask(scene.anatomy, finding.side, finding.extent, u, v)
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


def _split_code(split: str) -> int:
    if split not in SPLIT_CODES:
        raise SourceError(f"unknown split {split!r}; use one of {', '.join(SPLIT_CODES)}")
    return SPLIT_CODES[split]


def open_phantom(argument: str | None) -> PhantomSource:
    """Factory for ``open_source("phantom[:easy|medium|hard]")``."""
    name = argument or "medium"
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SourceError(f"unknown phantom preset {name!r}.{hint} Available: {', '.join(PRESETS)}")
    return PhantomSource(PRESETS[name])


def open_phantom_with_options(argument: str | None, options: dict[str, Any]) -> PhantomSource:
    """Factory for ``open_cases("phantom[:PRESET]", options)``: ``options`` override fields of the preset."""
    base = PRESETS.get(argument or "medium")
    if base is None:
        raise ConfigError(f"unknown phantom preset {argument!r}; use one of {', '.join(PRESETS)}")
    try:
        return PhantomSource(PhantomConfig(**{**base.model_dump(), **options}))
    except ValueError as exc:
        raise ConfigError(f"invalid data_options for the phantom source: {exc}") from None


register_source("phantom", open_phantom, open_phantom_with_options)
