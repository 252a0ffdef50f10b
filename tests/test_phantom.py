"""The phantom source: determinism, split separation, gold boxes on the lesions, balanced answers, coverage."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from medeyes_env.cases import AnswerType
from medeyes_env.errors import SourceError
from medeyes_env.sources import available_sources, open_source
from medeyes_env.sources.phantom.config import FAMILIES, PRESETS, PhantomConfig
from medeyes_env.sources.phantom.scene import Focal, stamp_focal
from medeyes_env.sources.phantom.source import PhantomSource


@pytest.fixture(scope="module")
def source() -> PhantomSource:
    return PhantomSource(PRESETS["medium"])


@pytest.fixture(scope="module")
def many(source: PhantomSource):
    return [source.case("test", index) for index in range(1200)]


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_registered_and_presets_open() -> None:
    assert "phantom" in available_sources()
    for spec, preset in (("phantom", "medium"), ("phantom:easy", "easy"), ("phantom:hard", "hard")):
        opened = open_source(spec)
        assert opened.name == "phantom"
        assert opened.size("train") is None
        assert opened.case("train", 0).meta["preset"] == preset


def test_unknown_preset_gets_a_suggestion() -> None:
    with pytest.raises(SourceError, match=r"unknown phantom preset 'hardd'\. Did you mean 'hard'\?"):
        open_source("phantom:hardd")


def test_bad_split_and_index_are_refused(source: PhantomSource) -> None:
    with pytest.raises(SourceError, match="unknown split 'dev'"):
        source.case("dev", 0)  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="index must be an integer >= 0"):
        source.case("test", -1)


def test_config_rejects_inverted_ranges() -> None:
    with pytest.raises(ValidationError, match="lesion_contrast must be"):
        PhantomConfig(lesion_contrast=(0.2, 0.1))
    with pytest.raises(ValidationError, match="no modality"):
        PhantomConfig(families=("organ",), modalities=("mri",))


def test_same_case_twice_is_identical_down_to_the_pixels() -> None:
    first = PhantomSource(PhantomConfig(preset="medium", cache_size=0))
    second = PhantomSource(PhantomConfig(preset="medium", cache_size=0))
    for index in (0, 7):
        a, b = first.case("test", index), second.case("test", index)
        assert a.model_dump() == b.model_dump()
        assert _digest(a.load_image()) == _digest(b.load_image())
        assert _digest(a.load_image()) == _digest(first.image("test", index))


def test_cached_images_are_copies(source: PhantomSource) -> None:
    image = source.image("validation", 3)
    image.paste((255, 0, 0), (0, 0, 50, 50))
    assert source.image("validation", 3).getpixel((10, 10)) != (255, 0, 0)


def test_splits_never_share_a_case(source: PhantomSource) -> None:
    seen: dict[tuple, str] = {}
    for split in ("train", "validation", "test"):
        for index in range(150):
            scene = source.scene(split, index)
            key = tuple(sorted(scene.anatomy.params.items()))
            assert key not in seen, f"{split}/{index} repeats {seen[key]}"
            seen[key] = f"{split}/{index}"
    assert source.case("train", 5).id == "phantom/train/000005"


def test_every_family_and_modality_appears(many) -> None:
    assert {case.meta["family"] for case in many[:300]} == set(FAMILIES)
    assert {case.modality for case in many[:300]} == {"xray", "mri", "ct"}
    assert {case.answer_type for case in many[:300]} == set(AnswerType)


def test_answers_are_balanced(many) -> None:
    closed = [case.answer for case in many if case.answer_type is AnswerType.CLOSED]
    assert abs(closed.count("yes") / len(closed) - 0.5) < 0.08, collections.Counter(closed)
    by_family: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in many:
        if case.answer_type is AnswerType.CHOICE:
            by_family[(case.meta["family"], case.options if case.meta["family"] != "modality" else 3)][case.answer] += 1
    for (family, _), counts in by_family.items():
        total = sum(counts.values())
        if total < 60:
            continue
        shares = [count / total for count in counts.values()]
        assert max(abs(share - 1 / len(shares)) for share in shares) < 0.12, (family, counts)
    counts = collections.Counter(case.answer for case in many if case.meta["family"] == "count")
    assert set(counts) == {"0", "1", "2", "3"}
    assert max(counts.values()) / min(counts.values()) < 2.0, counts
    normal = sum(1 for case in many if not case.regions) / len(many)
    assert 0.2 < normal < 0.5


def test_answers_agree_with_the_scene(source: PhantomSource, many) -> None:
    for index, case in enumerate(many[:400]):
        scene = source.scene("test", index)
        family = case.meta["family"]
        assert case.meta["n_lesions"] == len(scene.lesions)
        assert len(case.regions) == len(scene.lesions) + len(scene.extended)
        if family == "presence":
            assert (case.answer == "yes") == bool(case.regions)
        elif family == "count":
            assert case.answer == str(len(scene.lesions))
        elif family == "location" and scene.lesions:
            lesion = scene.lesions[0]
            side = "left" if lesion.x < scene.size / 2 else "right"
            vertical = "upper" if lesion.y < scene.size / 2 else "lower"
            assert case.answer in (side, f"{vertical} {side}")
        elif family == "size":
            diameter = 2 * scene.lesions[0].radius
            expected = "small" if diameter < 24 else "medium" if diameter <= 48 else "large"
            assert case.answer == expected


def test_gold_boxes_lie_inside_and_on_the_lesions(source: PhantomSource, many) -> None:
    checked = collections.Counter()
    for index, case in enumerate(many):
        scene = source.scene("test", index)
        if not scene.lesions or checked[case.modality] >= 3:
            continue
        checked[case.modality] += 1
        grey = np.asarray(case.load_image().convert("L"), dtype=np.float64) / 255.0
        for region, lesion in zip(case.regions[: len(scene.lesions)], scene.lesions, strict=True):
            x1, y1, x2, y2 = region.box
            assert 0 <= x1 < x2 <= scene.size and 0 <= y1 < y2 <= scene.size
            assert x1 <= lesion.x <= x2 and y1 <= lesion.y <= y2
            yy, xx = np.mgrid[0 : scene.size, 0 : scene.size]
            d = np.hypot(xx + 0.5 - lesion.x, yy + 0.5 - lesion.y)
            inside = grey[d <= 0.6 * lesion.radius].mean()
            around = grey[(d >= lesion.radius + 4) & (d <= lesion.radius + 10)].mean()
            assert (inside - around) * np.sign(lesion.contrast) > 0.4 * abs(lesion.contrast), (case.id, inside, around)
    assert set(checked) == {"xray", "mri", "ct"}


def test_every_modality_renders_grey_rgb_of_the_stated_size(source: PhantomSource, many) -> None:
    for modality in ("xray", "mri", "ct"):
        case = next(case for case in many if case.modality == modality)
        image = case.load_image()
        assert image.mode == "RGB" and image.size == case.image_size == (1024, 1024)
        pixels = np.asarray(image)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        assert pixels.std() > 20, f"{modality} image is nearly flat"


def test_a_mimic_matches_its_lesion_when_downsampled_but_not_at_full_resolution() -> None:
    for modality in ("xray", "mri", "ct"):
        for radius in (4.5, 8.0):
            images = {}
            for kind in ("lesion", "mimic"):
                canvas = np.zeros((64, 64), dtype=np.float32)
                stamp_focal(canvas, Focal(32.0, 32.0, radius, 0.1, kind, "organ"), modality)
                images[kind] = canvas
            small = {k: v.reshape(16, 4, 16, 4).mean(axis=(1, 3)) for k, v in images.items()}
            assert abs(images["lesion"].sum() - images["mimic"].sum()) < 0.05 * images["lesion"].sum()
            assert np.abs(small["lesion"] - small["mimic"]).max() < 0.35 * small["lesion"].max()
            assert images["lesion"][32, 32] - images["mimic"][32, 32] > 0.05


def test_families_and_modalities_can_be_restricted() -> None:
    only = PhantomSource(PhantomConfig(families=("count",), modalities=("ct",)))
    cases = [only.case("train", index) for index in range(30)]
    assert {case.meta["family"] for case in cases} == {"count"}
    assert {case.modality for case in cases} == {"ct"}


def test_the_render_shortcuts_give_the_pixels_of_the_plain_numpy_paths() -> None:
    """Issue 24's speed-ups keep every image byte: each shortcut against what it replaced."""
    from medeyes_env.sources.phantom import scene

    rng = np.random.default_rng(7)
    for shape in ((3, 5), (512, 512), (1024, 1024)):
        image = Image.fromarray(rng.standard_normal(shape).astype(np.float32), "F")
        fast = scene.float_pixels(image)
        assert fast.flags.writeable and fast.dtype == np.float32
        assert np.array_equal(fast, np.array(image, dtype=np.float32))
    u, v = scene.pixel_grid(256)
    for _ in range(20):
        cx, cy, a, b = rng.uniform(-0.1, 1.1), rng.uniform(-0.1, 1.1), rng.uniform(0.005, 0.1), rng.uniform(0.005, 0.1)
        ellipse, edge, weight = (cx, cy, a, b, rng.uniform(-1, 1)), rng.uniform(0.002, 0.05), rng.uniform(-1, 1)
        base = rng.standard_normal((256, 256)).astype(np.float32)
        full = base + weight * scene.inside(scene.ellipse_sdf(u, v, *ellipse), edge)
        windowed = base.copy()
        scene.add_soft_ellipse(windowed, u, v, (cx, cy), ellipse, edge, weight)
        assert windowed.tobytes() == full.tobytes()
    white, correlated = scene._noise_bank()
    for seed in range(16):  # every flip, from the transposed bank or the plain one
        draw = np.random.default_rng(seed)
        ox, oy = (int(x) for x in draw.integers(0, 2048 - 300 + 1, size=2))
        flip = int(draw.integers(0, 8))
        plain = correlated[oy : oy + 300, ox : ox + 300]
        plain = plain[::-1] if flip & 1 else plain
        plain = plain[:, ::-1] if flip & 2 else plain
        plain = plain.T if flip & 4 else plain
        assert np.array_equal(scene.noise_patch(np.random.default_rng(seed), 300, 1), plain)
