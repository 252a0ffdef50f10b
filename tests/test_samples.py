"""The ``samples`` source: real images bundled in pydicom and scikit-image, questions only from known facts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medeyes_env.cases import SPLITS, AnswerType
from medeyes_env.errors import SourceError
from medeyes_env.sources import iter_cases, open_source

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("skimage")

from medeyes_env.sources import samples  # noqa: E402  (needs the optional packages checked above)
from medeyes_env.sources.samples_catalog import SAMPLE_IMAGES  # noqa: E402

OVERLAY_IMAGE = next(image for image in SAMPLE_IMAGES if image.key == "examples_overlay")
OVERLAY_BOX = (46.0, 139.0, 81.0, 174.0)
"""Bounding box (pixel edges) of the hand-drawn contour in examples_overlay.dcm's overlay plane 0x6000."""


def all_cases(spec: str = "samples") -> list:
    source = open_source(spec)
    return [case for split in SPLITS for case in iter_cases(source, split)]


def test_split_sizes_and_no_image_in_two_splits() -> None:
    source = open_source("samples")
    assert {split: source.size(split) for split in SPLITS} == {"train": 9, "validation": 5, "test": 15}
    files_by_split = {split: {c.meta["file"] for c in iter_cases(source, split)} for split in SPLITS}
    assert not files_by_split["train"] & files_by_split["test"]
    assert not files_by_split["train"] & files_by_split["validation"]
    assert not files_by_split["validation"] & files_by_split["test"]


def test_samples_all_puts_every_case_in_every_split() -> None:
    source = open_source("samples:all")
    assert {source.size(split) for split in SPLITS} == {29}


def test_unknown_option_is_refused() -> None:
    with pytest.raises(SourceError, match=r"unknown samples option 'every'; use 'samples' or 'samples:all'"):
        open_source("samples:every")


def test_every_case_loads_an_rgb_image_of_its_declared_size() -> None:
    for case in all_cases():
        image = case.load_image()
        assert image.mode == "RGB"
        assert image.size == case.image_size, case.id
        assert case.source == "samples"
        if case.answer_type is AnswerType.CHOICE:
            assert case.answer in case.options and len(set(case.options)) == len(case.options)


def test_cases_are_deterministic() -> None:
    first, second = all_cases(), all_cases()
    assert [c.model_dump() for c in first] == [c.model_dump() for c in second]
    assert len({c.id for c in first}) == len(first)


def test_images_are_cached_per_file_and_copies_are_handed_out() -> None:
    case = next(c for c in all_cases() if c.meta["file"] == "CT_small.dcm")
    first = case.load_image()
    first.putpixel((0, 0), (255, 0, 0))
    assert case.load_image().getpixel((0, 0)) != (255, 0, 0)


def test_overlay_box_is_the_bounding_box_of_the_drawn_contour() -> None:
    path = samples.sample_file(OVERLAY_IMAGE)
    dataset = pydicom.dcmread(path)
    # Read the overlay plane independently: 1 bit per pixel, little-endian bit order, origin (1, 1).
    assert [int(v) for v in dataset[0x6000, 0x0050].value] == [1, 1]
    rows, cols = int(dataset[0x6000, 0x0010].value), int(dataset[0x6000, 0x0011].value)
    bits = np.unpackbits(np.frombuffer(dataset[0x6000, 0x3000].value, np.uint8), bitorder="little")
    overlay = bits[: rows * cols].reshape(rows, cols).astype(bool)
    # The contour is the only large stroke; the rest are the 'Tra' glyphs (top right) and a mark (bottom right).
    contour = overlay.copy()
    contour[:, 300:] = False
    ys, xs = np.nonzero(contour)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == OVERLAY_BOX
    assert contour.sum() == 128

    lesion_cases = [c for c in all_cases() if c.regions]
    assert [c.id for c in lesion_cases] == [
        "samples/examples_overlay/lesion_present",
        "samples/examples_overlay/lesion_organ",
    ]
    for case in lesion_cases:
        assert [r.box for r in case.regions] == [OVERLAY_BOX]
        assert case.organ == "liver" and case.modality == "mri"


def test_overlay_box_lies_over_the_lesion() -> None:
    case = next(c for c in all_cases() if c.regions)
    grey = np.asarray(case.load_image().convert("L"), dtype=float)
    x1, y1, x2, y2 = (int(v) for v in case.regions[0].box)
    inside = grey[y1:y2, x1:x2]
    assert (inside > 60).mean() > 0.7  # mostly soft tissue (liver), not air or fat
    # The lesion is a small bright ring: the brightest 3x3 spot of the box sits in its central half
    # and is clearly brighter than plain liver just to the right of the box.
    smooth = np.lib.stride_tricks.sliding_window_view(inside, (3, 3)).mean(axis=(-1, -2))
    row, col = np.unravel_index(smooth.argmax(), smooth.shape)
    cx, cy = x1 + col + 1, y1 + row + 1
    assert x1 + (x2 - x1) / 4 <= cx <= x2 - (x2 - x1) / 4
    assert y1 + (y2 - y1) / 4 <= cy <= y2 - (y2 - y1) / 4
    liver = grey[150:165, 90:110].mean()
    assert smooth.max() > liver + 20


def _plane(orientation: list[float]) -> str:
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.abs(np.cross(row, col))
    return ("Sagittal", "Coronal", "Axial")[int(normal.argmax())]


MODALITY_TAGS = {"MR": "MRI", "CT": "CT", "US": "Ultrasound", "NM": "Nuclear medicine"}


def test_dicom_answers_agree_with_the_dicom_headers() -> None:
    checked = 0
    by_file = {image.file: image for image in SAMPLE_IMAGES}
    for case in all_cases():
        if case.meta["package"] != "pydicom":
            continue
        dataset = pydicom.dcmread(samples.sample_file(by_file[str(case.meta["file"])]))
        key = case.id.rsplit("/", 1)[1]
        if key == "modality_choice":
            assert MODALITY_TAGS[dataset.Modality] == case.answer
        elif key == "modality_open":
            assert MODALITY_TAGS[dataset.Modality].lower() == case.answer.lower()
        elif key == "body_region":
            assert dataset.BodyPartExamined.replace(" ", "").lower() == case.answer.replace(" ", "").lower()
        elif key == "plane":
            assert _plane(list(dataset.ImageOrientationPatient)) == case.answer
        checked += 1
    assert checked >= 15


def test_only_bundled_files_are_read() -> None:
    for image in SAMPLE_IMAGES:
        path = samples.sample_file(image)
        package_dir = Path(next(iter(importlib.util.find_spec(image.package).submodule_search_locations)))
        assert package_dir in path.parents
        assert path.is_file()


def test_dicom_window_and_min_max_conversion() -> None:
    overlay = samples.sample_image("examples_overlay")
    ct = samples.sample_image("CT_small")  # no window in the header: min-max
    grey = np.asarray(ct.convert("L"))
    assert grey.min() == 0 and grey.max() == 255
    # examples_overlay: the first window (450 +- 395) maps raw 450 to mid-grey.
    dataset = pydicom.dcmread(samples.sample_file(OVERLAY_IMAGE))
    raw = dataset.pixel_array.astype(float)
    expected = np.clip(np.rint((raw - (450 - 395)) / 790 * 255), 0, 255)
    assert np.array_equal(np.asarray(overlay.convert("L")), expected.astype(np.uint8))


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_pydicom(name: str, *args: object):
        return None if name == "pydicom" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_pydicom)
    with pytest.raises(SourceError) as error:
        open_source("samples")
    assert str(error.value) == (
        "the 'samples' source needs pydicom, which is not installed; run: pip install 'medeyes[samples]'"
    )
