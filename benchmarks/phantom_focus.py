"""Does the phantom need a drill? Presence accuracy from the 256 px overview vs from a 192 px drill crop.

For each preset, draws presence cases about a focal lesion (lung nodule, brain
lesion, liver lesion) from the train split (to fit) and the test split (to
score), and shows a classical detector two views of each case, both 256 px:

- overview: the whole 1024 px image, box-downsampled (``views.overview``);
- drill: a 192 px box zoomed to 256 px (``views.drill_view``). Positive cases:
  centred on the lesion plus a random shift of up to +-48 px. Normal cases, two
  ways: ``random``, a random plausible lesion site in the organ; ``mimic``, a
  lesion-like normal structure plus the same random shift (what a scan that
  found the most suspicious spot would drill into). The crop's place never
  depends on the label in ``random``; ``mimic`` is the harder, realistic case.

The detector: for radii of 4..14 original px, a solid-blob score
``min(centre - background, wall - background)`` (either polarity) and a
difference-of-means blob score, each z-normalised over the organ, maxed over
the organ (lung, brain parenchyma, liver) and radii. Per preset, modality and
view it keeps the score and threshold with the best train accuracy, and reports
test accuracy. Chance is 50 %.

    python benchmarks/phantom_focus.py                 # 400 test + 200 train cases per preset
    python benchmarks/phantom_focus.py --n 120 --presets medium
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from functools import lru_cache, partial

import numpy as np
from PIL import Image

from medeyes_env import views
from medeyes_env.sources import phantom_anatomy as anatomy
from medeyes_env.sources.phantom import PRESETS, PhantomSource, lesion_site, organ_sdf

VIEW = 256
CROP = 192
JITTER = 48
SEARCH = 176
"""Side (view px) of the central square of a drill view the detector searches: the jitter plus a margin."""
RADII = (4.0, 5.0, 6.5, 8.0, 10.0, 13.0)
THRESHOLDS = (2, 3, 4)
"""Lumen z-scores above which a blob counts as a mimic; the fit on train picks one."""
ORGAN = {"xray": "lung", "mri": "brain", "ct": "liver"}


# ----------------------------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------------------------


def _pad_fft(kernel: np.ndarray, n: int = VIEW) -> np.ndarray:
    half = kernel.shape[0] // 2
    padded = np.zeros((n, n))
    padded[: kernel.shape[0], : kernel.shape[1]] = kernel
    return np.fft.rfft2(np.roll(padded, (-half, -half), axis=(0, 1)))


def _render_template(profile, reach: int, scale: float, zero_mean_within: float | None) -> np.ndarray:
    """FFT of a radial profile (a function of distance in original px) rendered 4x supersampled at view scale,
    made zero-mean within ``zero_mean_within`` original px (if given) and unit-norm."""
    sub = 4
    side = 2 * reach + 1
    axis = (np.arange(side * sub) + 0.5) / sub - reach - 0.5  # view px, pixel centres at integers
    xx, yy = np.meshgrid(axis / scale, axis / scale)  # original px
    d = np.sqrt(xx * xx + yy * yy)
    coarse = profile(d).reshape(side, sub, side, sub).mean(axis=(1, 3))
    if zero_mean_within is not None:
        window = (d <= zero_mean_within).reshape(side, sub, side, sub).mean(axis=(1, 3)) > 0.5
        coarse = np.where(window, coarse - coarse[window].mean(), 0.0)
    coarse /= np.sqrt((coarse**2).sum()) + 1e-12
    return _pad_fft(coarse[::-1, ::-1])


@lru_cache(maxsize=256)
def _lesion_template(radius: float, scale: float, modality: str) -> tuple[np.ndarray, int]:
    """Matched filter for a solid lesion of ``radius`` (zero mean over 2.6 radii) and its reach in view px."""
    reach = int(np.ceil(2.6 * radius * scale)) + 1
    profile = partial(anatomy.lesion_profile, radius=radius, modality=modality)
    return _render_template(profile, reach, scale, 2.6 * radius), reach


@lru_cache(maxsize=16)
def _lumen_template(scale: float) -> np.ndarray:
    """Matched filter for the lumen a mimic adds to a bright lesion (its responses are > 0 on a mimic)."""
    reach = int(np.ceil(4.0 * anatomy.LUMEN_SIGMA * scale)) + 1
    return _render_template(lambda d: -anatomy.lumen(d), reach, scale, None)


def _z(score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = score[mask]
    centre = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - centre)) + 1e-9
    return (score - centre) / spread


def _local_max(values: np.ndarray, reach: int) -> np.ndarray:
    """Maximum over a square of side ``2 * reach + 1`` (separable, edges padded)."""
    out = values
    for axis in (0, 1):
        padded = np.pad(out, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        stack = [np.take(padded, range(k, k + values.shape[axis]), axis=axis) for k in range(2 * reach + 1)]
        out = np.max(stack, axis=0)
    return out


def features(view: Image.Image, scale: float, depth: np.ndarray, modality: str) -> dict[str, float]:
    """Max detector z-scores over the organ; ``scale`` = view px per original px.

    ``blob``: the lesion matched filter, either polarity. ``solidT``: at each blob
    centre (a local maximum of the lesion filter), the lesion z-score vetoed by a
    lumen (what tells a mimic from a lesion) there: ``min(z_lesion, 2 (T - z_lumen) + 2)``.
    Radius ``r`` is tried only where
    the view lies at least ``1.3 r + 4`` original px inside the organ (``depth``, see
    :func:`_view_depth`), so organ edges do not pose as blobs.
    """
    grey = np.asarray(view.convert("L"), dtype=np.float64) / 255.0
    best = {"blob": 0.0} | {f"solid{t}": 0.0 for t in THRESHOLDS}
    spectrum = np.fft.rfft2(grey)
    raw_lumen = np.fft.irfft2(spectrum * _lumen_template(round(scale, 4)), s=grey.shape)
    for radius in RADII:
        lesion_f, reach = _lesion_template(radius, round(scale, 4), modality)
        mask = depth > 1.3 * radius + 4.0
        inner = np.zeros_like(mask)  # the FFT filters wrap around: ignore a border as wide as the window
        inner[reach:-reach, reach:-reach] = mask[reach:-reach, reach:-reach]
        if not inner.any():
            continue
        z_lesion = _z(np.fft.irfft2(spectrum * lesion_f, s=grey.shape), inner)
        z_lumen = _z(raw_lumen, inner)
        peak_reach = max(1, round(0.7 * radius * scale))
        for sign in (1.0, -1.0):
            zl = sign * z_lesion
            best["blob"] = max(best["blob"], float(zl[inner].max()))
            # blob centres: local maxima of the lesion filter; the lumen is judged right there
            centres = inner & (zl >= _local_max(zl, peak_reach)) & (zl > 2.0)
            if not centres.any():
                continue
            lumen_at = _local_max(sign * z_lumen, 1)[centres]
            for threshold in THRESHOLDS:
                score = np.minimum(zl[centres], 2.0 * (threshold - lumen_at) + 2.0)
                best[f"solid{threshold}"] = max(best[f"solid{threshold}"], float(score.max()))
    return best


def _view_depth(scene, box: tuple[float, float, float, float], central: int | None = None) -> np.ndarray:
    """For each pixel of a 256 px view of ``box``: how deep (original px) it lies inside the lesion organ.

    Negative outside the organ; ``-inf`` outside the central square of side ``central`` view px.
    """
    x1, y1, x2, y2 = box
    size = scene.size
    axis = (np.arange(VIEW) + 0.5) / VIEW
    u = np.broadcast_to((x1 + axis[None, :] * (x2 - x1)) / size, (VIEW, VIEW))
    v = np.broadcast_to((y1 + axis[:, None] * (y2 - y1)) / size, (VIEW, VIEW))
    depth = -organ_sdf(scene.anatomy, ORGAN[scene.modality])(u, v) * size
    if central is not None:
        low = (VIEW - central) // 2
        outside = np.ones_like(depth, dtype=bool)
        outside[low : low + central, low : low + central] = False
        depth = np.where(outside, -np.inf, depth)
    return depth


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def presence_cases(source: PhantomSource, split: str, n: int):
    """The first ``n`` presence cases about a focal lesion in ``split`` (index, case, scene)."""
    index = 0
    while n > 0:
        case = source.case(split, index)
        if case.meta["variant"] in ("lung nodule", "brain lesion", "liver lesion"):
            yield index, case, source.scene(split, index)
            n -= 1
        index += 1


def measure(source: PhantomSource, split: str, n: int, seed: int) -> list[dict]:
    """Features of the overview and of both drill crops for ``n`` presence cases."""
    rng = np.random.default_rng(seed)
    rows = []
    overview_box = (0.0, 0.0, float(source.config.image_size), float(source.config.image_size))
    for index, case, scene in presence_cases(source, split, n):
        image = case.load_image()
        overview_depth = _view_depth(scene, overview_box)
        row = {
            "modality": case.modality,
            "label": case.answer == "yes",
            "small": case.meta["stratum"] in ("small", "none"),
            "overview": features(views.overview(image, VIEW), VIEW / image.width, overview_depth, case.modality),
        }
        shift = rng.uniform(-JITTER, JITTER, size=2)
        if scene.lesions:
            centre = np.array([scene.lesions[0].x, scene.lesions[0].y]) + shift
            centres = {"random": centre, "mimic": centre}
        else:
            site = np.array(lesion_site(scene, rng, ORGAN[scene.modality]))
            mimics = [m for m in scene.mimics if m.organ == ORGAN[scene.modality]]
            near = np.array([mimics[0].x, mimics[0].y]) + shift if mimics else site
            centres = {"random": site, "mimic": near}
        for name, (cx, cy) in centres.items():
            box = (cx - CROP / 2, cy - CROP / 2, cx + CROP / 2, cy + CROP / 2)
            view, shown = views.drill_view(image, box, VIEW, min_side=96)
            scale = VIEW / (shown[2] - shown[0])
            row[f"drill_{name}"] = features(view, scale, _view_depth(scene, shown, SEARCH), case.modality)
        rows.append(row)
        del index
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Fit on train, score on test
# ----------------------------------------------------------------------------------------------------------------------


def _best_threshold(values: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.unique(values)
    candidates = np.concatenate([[order[0] - 1], (order[:-1] + order[1:]) / 2, [order[-1] + 1]])
    accuracies = [((values > t) == labels).mean() for t in candidates]
    best = int(np.argmax(accuracies))
    return float(candidates[best]), float(accuracies[best])


def fit_and_score(train: list[dict], test: list[dict], view: str) -> tuple[float, int]:
    """Test accuracy of the best (score, threshold) on train for this view; and the test count."""
    labels_train = np.array([r["label"] for r in train])
    labels_test = np.array([r["label"] for r in test])
    best = (-1.0, "solid", 0.0)
    for feature in ("blob", *(f"solid{t}" for t in THRESHOLDS)):
        threshold, accuracy = _best_threshold(np.array([r[view][feature] for r in train]), labels_train)
        if accuracy > best[0]:
            best = (accuracy, feature, threshold)
    _, feature, threshold = best
    predictions = np.array([r[view][feature] for r in test]) > threshold
    return float((predictions == labels_test).mean()), len(test)


def render_ms(source: PhantomSource, n: int) -> dict[str, float]:
    """Mean milliseconds to render one case (no cache), per modality."""
    uncached = PhantomSource(source.config.model_copy(update={"cache_size": 0}))
    times: dict[str, list[float]] = defaultdict(list)
    for index in range(n):
        case = uncached.case("validation", index)
        start = time.perf_counter()
        uncached.image("validation", index)
        times[case.modality].append((time.perf_counter() - start) * 1000)
    return {modality: float(np.mean(values)) for modality, values in sorted(times.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="test presence cases per preset")
    parser.add_argument("--n-train", type=int, default=200, help="train presence cases per preset")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--timing", type=int, default=60, help="cases to time the renderer on (0 to skip)")
    args = parser.parse_args()

    views_ = ("overview", "drill_random", "drill_mimic")
    print("Presence accuracy (%, test), detector fitted on train; small = lesion radius <= 10.5 px + normals")
    print(f"{'preset':8} {'modality':8} {'stratum':7} {'n':>4} {'overview':>9} {'drill':>9} {'drill@mimic':>12}")
    for preset in args.presets:
        source = PhantomSource(PRESETS[preset].model_copy(update={"families": ("presence",), "cache_size": 0}))
        started = time.perf_counter()
        train = measure(source, "train", args.n_train, seed=1)
        test = measure(source, "test", args.n, seed=2)
        for modality in ("all", "xray", "mri", "ct"):
            for stratum in ("all", "small"):
                subset_train = [r for r in train if modality in ("all", r["modality"])]
                subset_test = [r for r in test if modality in ("all", r["modality"])]
                if stratum == "small":
                    subset_test = [r for r in subset_test if r["small"]]
                    subset_train = [r for r in subset_train if r["small"]]
                if not subset_test or len({r["label"] for r in subset_train}) < 2:
                    continue
                scores = [fit_and_score(subset_train, subset_test, view)[0] * 100 for view in views_]
                print(
                    f"{preset:8} {modality:8} {stratum:7} {len(subset_test):4d} "
                    f"{scores[0]:9.1f} {scores[1]:9.1f} {scores[2]:12.1f}"
                )
        print(f"# {preset}: {time.perf_counter() - started:.0f} s")
    if args.timing:
        source = PhantomSource(PRESETS["medium"])
        timing = render_ms(source, args.timing)
        overall = np.mean(list(timing.values()))
        print("render ms/case (1024 px, no cache): " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
        print(f"render ms/case mean over modalities: {overall:.1f}")


if __name__ == "__main__":
    main()
