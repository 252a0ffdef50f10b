"""The ``samples`` source: real medical images that ship inside PyPI packages.

Spec strings: ``samples`` (images split disjointly into train/validation/test) and
``samples:all`` (every split holds every case: for smoke tests and demos, where a
train/test overlap does not matter).

Needs the optional extra ``pip install 'medeyes[samples]'`` (pydicom and scikit-image).
Only files bundled inside those wheels are read, never ones the packages would
download: pydicom's ``data/test_files/*.dcm`` and scikit-image's ``data/*.png|jpg``,
located on disk without importing scikit-image.

Questions ask only what is actually known about each image, from its DICOM header,
its DICOM overlay plane or the description its package gives it (see ``evidence``
in each case's ``meta``): imaging modality, body region, image plane, laterality,
staining, and the one annotated lesion (the hand-drawn overlay of
``examples_overlay.dcm``, whose bounding box is computed from the overlay bits at
load time and becomes the case's gold region). No finding is invented; in
particular, no "no abnormality here" question is asked of any image.

Split assignment is by image, fixed in :data:`SAMPLE_IMAGES`, so no image appears
in two splits (``samples:all`` lifts this on purpose):

==========================  ==========  =====
image                       split       cases
==========================  ==========  =====
examples_overlay.dcm        test        6
J2K_pixelrep_mismatch.dcm   test        4
examples_rgb_color.dcm      test        3
microaneurysms.png          test        2
MR_small.dcm                validation  3
JPEG2000.dcm                validation  2
CT_small.dcm                train       3
retina.jpg                  train       3
ihc.png                     train       3
==========================  ==========  =====

Images are decoded lazily, on the first :meth:`Case.load_image`, and cached per file.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medeyes_env.cases import SPLITS, Box, Case, Region, Split, load_image_file
from medeyes_env.errors import ImageLoadError, SourceError
from medeyes_env.sources import register_source
from medeyes_env.sources.samples_catalog import SAMPLE_IMAGES, SampleImage, SampleQuestion

__all__ = [
    "INSTALL_HINT",
    "SamplesSource",
    "dicom_overlay_mask",
    "dicom_to_image",
    "marked_lesion_box",
    "mask_components",
    "open_samples",
    "sample_file",
    "sample_image",
]

INSTALL_HINT = "pip install 'medeyes[samples]'"


# ---------------------------------------------------------------------------------------------
# Locating and decoding the bundled files


def _require_packages() -> None:
    missing = [name for name in ("pydicom", "skimage") if importlib.util.find_spec(name) is None]
    if missing:
        raise SourceError(
            f"the 'samples' source needs {' and '.join(missing)}, which is not installed; run: {INSTALL_HINT}"
        )


def sample_file(image: SampleImage) -> Path:
    """The bundled file of ``image`` inside its package's installed data folder (never downloaded)."""
    _require_packages()
    spec = importlib.util.find_spec(image.package)
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - guarded by _require_packages
        raise SourceError(f"cannot locate the installed {image.package} package; run: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "data" / "test_files" / image.file if image.package == "pydicom" else root / "data" / image.file
    if not path.is_file():
        raise SourceError(
            f"sample image {image.file!r} is not bundled with the installed {image.package} ({path} missing); "
            f"reinstall with: {INSTALL_HINT}"
        )
    return path


def _to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (array.astype(np.float64) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _first(value: object) -> float:
    """The first value of a DICOM multi-valued number (WindowCenter may hold several windows)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def dicom_to_image(path: str | Path) -> Image.Image:
    """Decode a DICOM file's first frame to an 8-bit RGB image.

    Greyscale: the modality LUT (RescaleSlope/Intercept) is applied, then the
    header's first window (WindowCenter/WindowWidth), or the min-max range when the
    header has none; MONOCHROME1 is inverted. Palette colour goes through its LUT;
    RGB/YBR data comes out as RGB. Raises :class:`ImageLoadError` naming the file.
    """
    _require_packages()
    import pydicom
    from pydicom.pixels import apply_color_lut

    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"DICOM file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for unreadable data
        raise ImageLoadError(f"cannot decode DICOM pixel data of {path}: {exc}") from exc
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, dataset)
        depth = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(_to_uint8(rgb, 0, 2**depth - 1), "RGB")
    if pixels.ndim == 3:  # colour samples, already RGB
        if pixels.dtype == np.uint8:
            return Image.fromarray(pixels, "RGB")
        return Image.fromarray(_to_uint8(pixels, 0, 2 ** int(dataset.BitsStored) - 1), "RGB")
    values = pixels.astype(np.float64) * float(dataset.get("RescaleSlope", 1) or 1) + float(
        dataset.get("RescaleIntercept", 0) or 0
    )
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        grey = _to_uint8(values, center - width / 2, center + width / 2)
    else:
        grey = _to_uint8(values, float(values.min()), float(values.max()))
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L").convert("RGB")


def dicom_overlay_mask(path: str | Path, group: int = 0x6000) -> np.ndarray:
    """The overlay plane ``group`` of a DICOM file as a boolean mask in image pixel coordinates.

    The overlay is placed at its OverlayOrigin (1-based row, column) and cut to the image.
    """
    _require_packages()
    import pydicom

    dataset = pydicom.dcmread(Path(path))
    if (group, 0x3000) not in dataset:
        raise SourceError(f"DICOM file {path} has no overlay data in group {group:#06x}")
    overlay = dataset.overlay_array(group).astype(bool)
    origin_row, origin_col = (int(v) for v in dataset[group, 0x0050].value)
    mask = np.zeros((int(dataset.Rows), int(dataset.Columns)), dtype=bool)
    row0, col0 = origin_row - 1, origin_col - 1
    rows = slice(max(row0, 0), min(row0 + overlay.shape[0], mask.shape[0]))
    cols = slice(max(col0, 0), min(col0 + overlay.shape[1], mask.shape[1]))
    mask[rows, cols] = overlay[rows.start - row0 : rows.stop - row0, cols.start - col0 : cols.stop - col0]
    return mask


def mask_components(mask: np.ndarray) -> list[tuple[int, Box]]:
    """8-connected components of a boolean mask as ``(pixel count, xyxy box)``, largest first.

    Boxes use pixel edges: a component covering columns 2-4 has ``x1 = 2, x2 = 5``.

    >>> m = np.zeros((6, 6), dtype=bool); m[1:3, 2:5] = True; m[5, 0] = True
    >>> mask_components(m)
    [(6, (2.0, 1.0, 5.0, 3.0)), (1, (0.0, 5.0, 1.0, 6.0))]
    """
    remaining = {(int(r), int(c)) for r, c in zip(*np.nonzero(mask), strict=True)}
    components: list[tuple[int, Box]] = []
    while remaining:
        stack = [remaining.pop()]
        pixels = []
        while stack:
            row, col = stack.pop()
            pixels.append((row, col))
            for d_row in (-1, 0, 1):
                for d_col in (-1, 0, 1):
                    neighbour = (row + d_row, col + d_col)
                    if neighbour in remaining:
                        remaining.remove(neighbour)
                        stack.append(neighbour)
        rows = [p[0] for p in pixels]
        cols = [p[1] for p in pixels]
        box = (float(min(cols)), float(min(rows)), float(max(cols) + 1), float(max(rows) + 1))
        components.append((len(pixels), box))
    components.sort(key=lambda item: (-item[0], item[1]))
    return components


@functools.cache
def marked_lesion_box(path: str) -> Box:
    """The gold box of the lesion hand-drawn in ``examples_overlay.dcm``'s overlay plane.

    The overlay holds the drawn contour (its largest 8-connected component) and a few
    small text glyphs ('Tra', a scale mark); the box is the contour's bounding box.
    """
    components = mask_components(dicom_overlay_mask(path))
    if not components:
        raise SourceError(f"the overlay of {path} is empty; expected a hand-drawn lesion contour")
    return components[0][1]


@functools.cache
def _decoded(key: str) -> Image.Image:
    image = _IMAGES[key]
    path = sample_file(image)
    decoded = dicom_to_image(path) if image.package == "pydicom" else load_image_file(path)
    if decoded.size != image.size:
        raise ImageLoadError(f"sample image {path} decoded to {decoded.size}, expected {image.size}")
    return decoded


def sample_image(key: str) -> Image.Image:
    """A decoded sample image as RGB (a fresh copy of the per-file cache)."""
    if key not in _IMAGES:
        raise SourceError(f"unknown sample image {key!r}; known: {', '.join(_IMAGES)}")
    return _decoded(key).copy()


_IMAGES = {image.key: image for image in SAMPLE_IMAGES}


# ---------------------------------------------------------------------------------------------
# The source


class SamplesSource:
    """Fixed cases over the sample images; see the module docstring for the split rules."""

    name = "samples"

    def __init__(self, all_splits: bool = False) -> None:
        """Build the case index; ``all_splits`` puts every case in every split."""
        _require_packages()
        self.all_splits = all_splits
        entries = [(image, question) for image in SAMPLE_IMAGES for question in image.questions]
        self._index: dict[Split, list[tuple[SampleImage, SampleQuestion]]] = {
            split: [e for e in entries if all_splits or e[0].split == split] for split in SPLITS
        }

    def size(self, split: Split) -> int:
        """Number of cases in ``split``."""
        return len(self._index[split])

    def case(self, split: Split, index: int) -> Case:
        """The ``index``-th case of ``split``."""
        entries = self._index[split]
        if not 0 <= index < len(entries):
            raise SourceError(f"samples/{split} has {len(entries)} cases; index {index} is out of range")
        image, question = entries[index]
        regions: tuple[Region, ...] = ()
        if question.marked_lesion:
            box = marked_lesion_box(str(sample_file(image)))
            regions = (Region(box=box, label="liver lesion (overlay contour)"),)
        case = Case(
            id=f"samples/{image.key}/{question.key}",
            question=question.question,
            answer=question.answer,
            answer_type=question.answer_type,
            options=question.options,
            regions=regions,
            modality=image.modality,
            organ=image.organ,
            source=self.name,
            split=split,
            image_size=image.size,
            meta={
                "file": image.file,
                "package": image.package,
                "evidence": question.evidence,
                "description": image.description,
                "home_split": image.split,
            },
        )
        return case.with_image_factory(functools.partial(sample_image, image.key))


def open_samples(argument: str | None) -> SamplesSource:
    """Factory for ``samples`` and ``samples:all``."""
    if argument not in (None, "all"):
        raise SourceError(f"unknown samples option {argument!r}; use 'samples' or 'samples:all'")
    return SamplesSource(all_splits=argument == "all")


register_source("samples", open_samples)
