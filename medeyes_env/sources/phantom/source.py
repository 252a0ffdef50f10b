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
(:func:`~medeyes_env.sources.phantom.scene.lumen`). A 4x box downsample
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
See :data:`~medeyes_env.sources.phantom.config.PRESETS`: lesion radius, contrast, mimic count and noise. Any field
of :class:`~medeyes_env.sources.phantom.config.PhantomConfig` can be changed with ``PhantomSource(PhantomConfig(...))``.

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

Rendering a 1024 px case takes about 33 ms of CPU (CT 24, chest 42, brain 30; issue 24, docs/environment.md).
Not all information is gone at 256 px: an ideal observer that knew where a
blob was and both templates exactly would still separate lesion from mimic
with d' about 1.5 at medium contrast (about 15 at full resolution; white-noise
approximation). The detector's overview is near chance because it cannot tell
which of several identical-looking blobs to judge.
"""

from __future__ import annotations

import difflib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import numpy as np
from PIL import Image

from medeyes_env.cases import AnswerType, Case, Region, Split
from medeyes_env.errors import ConfigError, SourceError
from medeyes_env.shapes import disc_shape
from medeyes_env.sources import register_source
from medeyes_env.sources.phantom.brain import sample_brain
from medeyes_env.sources.phantom.chest import sample_chest
from medeyes_env.sources.phantom.config import (
    APPLICABLE_FAMILIES,
    BODY_PART,
    CHEST_FINDINGS,
    CT_ORGANS,
    FAMILY_WEIGHTS,
    LESION_KIND,
    LESION_PLURAL,
    MODALITY_NAME,
    MODALITY_OPEN,
    ORGAN,
    PIXEL_SPACING_MM,
    PRESETS,
    QUADRANTS,
    SALT,
    SIDE_NOTE,
    SIZE_CLASSES,
    SIZE_RADII,
    SIZE_THRESHOLDS_PX,
    SPLIT_CODES,
    Family,
    PhantomConfig,
    PhantomScene,
)
from medeyes_env.sources.phantom.ct import sample_abdomen
from medeyes_env.sources.phantom.layout import SceneBuilder, extended_box, size_stratum, swap_class
from medeyes_env.sources.phantom.render import render
from medeyes_env.sources.phantom.scene import Focal, Modality


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
        # Cases being rendered now: a thread that asks for one waits for it instead of rendering it again.
        self._rendering: dict[tuple[str, int], threading.Event] = {}

    # -- pickling (Ray, RLlib, gym.make_vec's async workers and copy.deepcopy copy environments) ---------------------

    def __getstate__(self) -> dict[str, Any]:
        """The config only.

        A lock cannot be pickled, and the caches are cheap to rebuild (every case is a pure function of
        ``(config, split, index)``), while the rendered images would add megabytes to each pickle.
        """
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A fresh source of the same config: a new lock, empty caches."""
        PhantomSource.__init__(self, state["config"])

    def size(self, split: Split) -> int | None:
        """Always ``None``: the phantom is infinite."""
        _split_code(split)
        return None

    # -- public API ----------------------------------------------------------------------------------------------------

    def case(self, split: Split, index: int) -> Case:
        """The ``index``-th case of ``split``; cheap (the image is rendered when first loaded)."""
        scene, draft, meta = self._draw(split, index)
        case = self._case_of(split, index, scene, draft, draft.answer, scene.lesions, scene.mimics, meta)
        return case.with_image_factory(partial(self.image, split, index))

    def scene(self, split: Split, index: int) -> PhantomScene:
        """What case ``index`` of ``split`` draws: anatomy, lesions, mimics and extended findings."""
        return self._draw(split, index)[0]

    def image(self, split: Split, index: int) -> Image.Image:
        """The rendered RGB image of a case (a fresh copy; the last few renders are cached)."""
        key = (split, index)
        while True:
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    return cached.copy()
                pending = self._rendering.get(key)
                if pending is None:
                    if self.config.cache_size:
                        self._rendering[key] = threading.Event()
                    break
            pending.wait()  # a GRPO group's sessions on a shared source ask for one case at once: render it once
        try:
            scene = self.scene(split, index)
            image = self._render(scene, [*scene.lesions, *scene.mimics], split, index)
            if self.config.cache_size:
                with self._lock:
                    self._cache[key] = image
                    while len(self._cache) > self.config.cache_size:
                        self._cache.popitem(last=False)
        finally:
            if self.config.cache_size:
                with self._lock:
                    self._rendering.pop(key).set()  # waiters retry: the cache, or (had it failed) their own render
        return image.copy()

    def swapped_case(self, split: Split, index: int) -> Case | None:
        """Case ``index`` of ``split`` with its round objects' classes swapped in the image itself.

        Every lesion becomes a mimic (same site, radius and contrast, with this config's ``lumen_sigma`` and
        ``mimic_stripes``) and every mimic a lesion; the anatomy, the extended findings and the noise (the same
        RNG) are those of the case, so the image differs from :meth:`image` only around the round objects.
        The question is the case's; its gold answer, regions (the new lesions) and lookalikes (the new mimics)
        are those of the swapped image. On ``phantom:look`` every image holds exactly one round object, so the
        presence answer flips.

        ``None`` for a question the swap leaves without an answer (location, organ, finding, size: "the
        lesion" may name none or several). The image-counterfactual ``swap`` of docs/eval.md.
        """
        scene, draft, meta = self._draw(split, index)
        family = meta["family"]
        if family not in ("presence", "count", "modality"):
            return None
        # One list in the order :meth:`image` stamps them, each object with its class swapped.
        swapped = [swap_class(focal, self.config) for focal in (*scene.lesions, *scene.mimics)]
        lesions = [f for f in swapped if f.kind == "lesion"]
        mimics = [f for f in swapped if f.kind == "mimic"]
        answer = draft.answer
        if family == "presence" and draft.variant in _FOCAL_KINDS:
            answer = "yes" if lesions else "no"
        elif family == "count":
            answer = str(len(lesions))
        radii = [f.radius for f in lesions]
        meta.update(
            n_lesions=len(lesions),
            n_mimics=len(mimics),
            lesion_radius_px=round(max(radii), 2) if radii else 0.0,
            lesion_contrast=round(abs(lesions[0].contrast), 4) if lesions else 0.0,
            stratum="extended" if scene.extended else size_stratum(radii, self.config),
            class_swapped=True,
        )
        case = self._case_of(split, index, scene, draft, answer, lesions, mimics, meta)
        return case.with_image_factory(partial(self._render, scene, swapped, split, index))

    def _case_of(
        self,
        split: Split,
        index: int,
        scene: PhantomScene,
        draft: _Draft,
        answer: str,
        lesions: Sequence[Focal],
        mimics: Sequence[Focal],
        meta: dict[str, str | int | float | bool],
    ) -> Case:
        """The case record of a drawn scene: ``lesions`` are its gold regions, ``mimics`` its lookalikes."""
        label = LESION_KIND[scene.modality].split()[-1]
        regions = tuple(_focal_region(f, scene.size, label) for f in lesions) + tuple(
            Region(box=extended_box(scene, f), label=f.kind) for f in scene.extended
        )
        return Case(
            id=f"phantom/{split}/{index:06d}",
            question=draft.question,
            answer=answer,
            answer_type=draft.answer_type,
            options=draft.options,
            regions=regions,
            lookalikes=tuple(_focal_region(f, scene.size, "mimic") for f in mimics),
            modality=scene.modality,
            organ=ORGAN[scene.modality],
            source=self.name,
            split=split,
            image_size=(scene.size, scene.size),
            meta=meta,
        )

    def _render(self, scene: PhantomScene, focals: list[Focal], split: Split, index: int) -> Image.Image:
        """The scene with ``focals`` drawn, its noise from the case's own RNG (so one case, one noise)."""
        rng = np.random.default_rng(np.random.SeedSequence([SALT, _split_code(split), index, 1]))
        return render(scene.anatomy, focals, list(scene.extended), scene.size, self.config.noise, rng)

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
        modalities = [m for m in cfg.modalities if any(f in APPLICABLE_FAMILIES[m] for f in cfg.families)]
        modality: Modality = modalities[int(rng.integers(len(modalities)))]
        families = [f for f in APPLICABLE_FAMILIES[modality] if f in cfg.families]
        weights = np.array([FAMILY_WEIGHTS[f] for f in families])
        family: Family = families[int(rng.choice(len(families), p=weights / weights.sum()))]
        p = {"xray": sample_chest, "mri": sample_brain, "ct": sample_abdomen}[modality](rng)
        builder = SceneBuilder(cfg, p, rng)
        draft = getattr(self, f"_family_{family}")(builder)
        builder.fill_mimics()
        scene = builder.scene()
        radii = [f.radius for f in scene.lesions]
        finding = builder.finding
        stratum = "extended" if scene.extended else size_stratum(radii, cfg)
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

    def _family_presence(self, b: SceneBuilder) -> _Draft:
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

    def _family_location(self, b: SceneBuilder) -> _Draft:
        kind = b.pick_finding_kind()
        by_quadrant = kind not in ("pleural effusion", "pneumothorax") and bool(b.rng.random() < 0.5)
        options = QUADRANTS if by_quadrant else ("left", "right")
        answer = options[int(b.rng.integers(len(options)))]
        b.add_finding(kind, region=answer if by_quadrant else f"{answer} side", organ="any")
        if b.p.modality == "ct":
            b.finding = "focal lesion"
        if by_quadrant:
            question = f"In which quadrant of the image is the {b.finding}? {SIDE_NOTE}"
        else:
            question = f"On which side of the image is the {b.finding}? {SIDE_NOTE}"
        return _Draft(question, answer, AnswerType.CHOICE, options, variant="quadrant" if by_quadrant else "side")

    def _family_organ(self, b: SceneBuilder) -> _Draft:
        organ = CT_ORGANS[int(b.rng.integers(3))]
        b.add_finding("liver lesion", organ=organ)
        b.finding = "focal lesion"
        if b.rng.random() < 0.5:
            options = tuple(b.rng.permutation(CT_ORGANS).tolist())
            return _Draft("Which organ contains the focal lesion?", organ, AnswerType.CHOICE, options, "choice")
        question = "Which organ contains the focal lesion? Answer with one word."
        return _Draft(question, organ, AnswerType.OPEN, variant="open")

    def _family_finding(self, b: SceneBuilder) -> _Draft:
        kind = CHEST_FINDINGS[int(b.rng.integers(3))]
        b.add_finding(kind)
        options = tuple(b.rng.permutation(CHEST_FINDINGS).tolist())
        return _Draft(
            "What is the abnormal finding on this chest radiograph?", kind, AnswerType.CHOICE, options, "choice"
        )

    def _family_count(self, b: SceneBuilder) -> _Draft:
        kind = LESION_KIND[b.p.modality]
        count = int(b.rng.integers(0, b.cfg.max_lesions + 1))
        for _ in range(count):
            b.add_finding(kind)
        b.finding = kind if count else "none"
        plural = LESION_PLURAL[b.p.modality]
        return _Draft(f"How many {plural} are there? Answer with a number.", str(count), AnswerType.OPEN, variant=kind)

    def _family_size(self, b: SceneBuilder) -> _Draft:
        kind = LESION_KIND[b.p.modality]
        answer = SIZE_CLASSES[int(b.rng.integers(3))]
        low, high = SIZE_RADII[answer]
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

    def _family_modality(self, b: SceneBuilder) -> _Draft:
        if b.rng.random() < 0.5:
            b.add_finding(b.pick_finding_kind())
        modality = b.p.modality
        if b.rng.random() < 0.5:
            options = tuple(b.rng.permutation(list(MODALITY_NAME.values())).tolist())
            return _Draft(
                "What imaging modality is this?", MODALITY_NAME[modality], AnswerType.CHOICE, options, "choice"
            )
        if b.rng.random() < 0.5:
            question = "What imaging modality was used for this image? Answer with one word."
            return _Draft(question, MODALITY_OPEN[modality], AnswerType.OPEN, variant="open")
        question = "Which part of the body is shown? Answer with one word."
        return _Draft(question, BODY_PART[modality], AnswerType.OPEN, variant="body part")


_FOCAL_KINDS = ("lung nodule", "brain lesion", "liver lesion")
"""Presence questions about a round object (the class swap turns their answer over)."""


@lru_cache(maxsize=4096)
def _focal_region(focal: Focal, size: int, label: str) -> Region:
    """A lesion's or mimic's gold region: its padded box and its exact outline, the disc of half intensity.

    The drawn profile falls to half its contrast at ``radius`` from the centre (``scene._edge``); the disc is
    clipped to the image like the box, so it always lies inside it. Cached: a replayed case (GRPO plays one
    case G times) does not build its polygons again; a Region is immutable.
    """
    outline = disc_shape(focal.x, focal.y, focal.radius, clip=(0.0, 0.0, float(size), float(size)))
    return Region(box=focal.box(size), label=label, shape=outline)


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
