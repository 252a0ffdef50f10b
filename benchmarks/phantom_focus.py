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

The detector (:func:`features`): a matched filter for a solid lesion at radii
of 4..13 original px, either polarity, z-normalised over the organ (lung, deep
brain white matter, liver); at each blob centre it is vetoed by a matched filter
for the lumen that marks a mimic. The scores are maxima over the organ (drill:
its central 176 px) and radii. Per preset, modality and
view it fits on train either one score with a threshold or a logistic regression
on all scores, whichever has the better train accuracy, and reports test
accuracy. Chance is 50 %.

    python benchmarks/phantom_focus.py                 # 400 test + 200 train cases per preset
    python benchmarks/phantom_focus.py --n 120 --n-train 120 --presets medium --jobs 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import defaultdict
from functools import lru_cache, partial

import numpy as np
from PIL import Image

from medeyes_env import views
from medeyes_env.sources.phantom.config import PRESETS
from medeyes_env.sources.phantom.layout import lesion_site, organ_sdf
from medeyes_env.sources.phantom.scene import LUMEN_SIGMA, lesion_profile, lumen
from medeyes_env.sources.phantom.source import PhantomSource

VIEW = 256
CROP = 192
JITTER = 48
SEARCH = 176
"""Side (view px) of the central square of a drill view the detector searches: the jitter plus a margin."""
RADII = (4.0, 5.0, 6.5, 8.0, 10.0, 13.0)
THRESHOLDS = (2, 3, 4, 5, 6)
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
    profile = partial(lesion_profile, radius=radius, modality=modality)
    return _render_template(profile, reach, scale, 2.6 * radius), reach


@lru_cache(maxsize=16)
def _lumen_template(scale: float) -> np.ndarray:
    """Matched filter for the lumen a mimic adds to a bright lesion (its responses are > 0 on a mimic)."""
    reach = int(np.ceil(4.0 * LUMEN_SIGMA * scale)) + 1
    return _render_template(lambda d: -lumen(d), reach, scale, None)


def _z(score: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = score[mask]
    centre = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - centre)) + 1e-9
    return (score - centre) / spread


def _local_max(values: np.ndarray, reach: int) -> np.ndarray:
    """Maximum over a square of side ``2 * reach + 1`` (separable; running maxima of doubling width)."""
    out = values
    width = 2 * reach + 1
    for axis in (0, 1):
        padded = np.pad(out, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        span, running = 1, padded
        while span * 2 <= width:  # running[i] = max(padded[i : i + span])
            shifted = np.take(running, range(span, running.shape[axis]), axis=axis)
            running = np.maximum(np.take(running, range(shifted.shape[axis]), axis=axis), shifted)
            span *= 2
        n = values.shape[axis]
        out = np.maximum(
            np.take(running, range(n), axis=axis), np.take(running, range(width - span, width - span + n), axis=axis)
        )
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


def presence_indices(source: PhantomSource, split: str, n: int) -> list[int]:
    """Indices of the first ``n`` presence cases about a focal lesion in ``split``."""
    found, index = [], 0
    while len(found) < n:
        if source.case(split, index).meta["variant"] in ("lung nodule", "brain lesion", "liver lesion"):
            found.append(index)
        index += 1
    return found


def measure_one(source: PhantomSource, split: str, index: int, seed: int) -> dict:
    """Features of the overview and of both drill crops of one presence case."""
    rng = np.random.default_rng([seed, index])
    case, scene = source.case(split, index), source.scene(split, index)
    image = case.load_image()
    size = float(source.config.image_size)
    row = {
        "modality": case.modality,
        "label": case.answer == "yes",
        "small": case.meta["stratum"] in ("small", "none"),
        "overview": features(
            views.overview(image, VIEW), VIEW / image.width, _view_depth(scene, (0.0, 0.0, size, size)), case.modality
        ),
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
    return row


_WORKER: dict = {}


def _work(job: tuple[str, str, int, int]) -> dict:
    preset, split, index, seed = job
    if _WORKER.get("preset") != preset:
        config = PRESETS[preset].model_copy(update={"families": ("presence",), "cache_size": 0})
        _WORKER.update(preset=preset, source=PhantomSource(config))
    return measure_one(_WORKER["source"], split, index, seed)


def measure(preset: str, split: str, n: int, seed: int, jobs: int) -> list[dict]:
    """Features for ``n`` presence cases of ``split``, on ``jobs`` processes."""
    source = PhantomSource(PRESETS[preset].model_copy(update={"families": ("presence",), "cache_size": 0}))
    work = [(preset, split, index, seed) for index in presence_indices(source, split, n)]
    if jobs <= 1:
        return [_work(job) for job in work]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_work, work, chunksize=8)


# ----------------------------------------------------------------------------------------------------------------------
# Fit on train, score on test
# ----------------------------------------------------------------------------------------------------------------------


def _best_threshold(values: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.unique(values)
    candidates = np.concatenate([[order[0] - 1], (order[:-1] + order[1:]) / 2, [order[-1] + 1]])
    accuracies = [((values > t) == labels).mean() for t in candidates]
    best = int(np.argmax(accuracies))
    return float(candidates[best]), float(accuracies[best])


def _logistic(features_: np.ndarray, labels: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Weights (bias last) of an L2-regularised logistic regression, by Newton's method."""
    x = np.hstack([features_, np.ones((len(features_), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        gradient = x.T @ (p - labels) + l2 * np.r_[w[:-1], 0.0]
        hessian = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        w -= np.linalg.solve(hessian, gradient)
    return w


def fit_and_predict(train: list[dict], test: list[dict], view: str) -> np.ndarray:
    """Test predictions for this view of the better of two detectors fitted on train.

    The single best (score, threshold) pair, or a logistic regression on all the
    scores (standardised on train); train accuracy picks between them.
    """
    names = sorted(train[0][view])
    x_train = np.array([[r[view][k] for k in names] for r in train])
    x_test = np.array([[r[view][k] for k in names] for r in test])
    y_train = np.array([r["label"] for r in train], dtype=float)
    best_train, predictions = -1.0, None
    for column in range(len(names)):
        threshold, accuracy = _best_threshold(x_train[:, column], y_train.astype(bool))
        if accuracy > best_train:
            best_train, predictions = accuracy, x_test[:, column] > threshold
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-9
    w = _logistic((x_train - mean) / std, y_train)
    train_logit = np.hstack([(x_train - mean) / std, np.ones((len(x_train), 1))]) @ w
    test_logit = np.hstack([(x_test - mean) / std, np.ones((len(x_test), 1))]) @ w
    threshold, accuracy = _best_threshold(train_logit, y_train.astype(bool))
    if accuracy > best_train:
        predictions = test_logit > threshold
    return predictions


def render_ms(source: PhantomSource, n: int) -> dict[str, tuple[float, float]]:
    """Mean (wall, CPU) milliseconds to render one case (no cache), per modality.

    CPU time (``time.process_time``) is what a render costs; wall time also counts
    waiting for the CPU on a shared machine.
    """
    uncached = PhantomSource(source.config.model_copy(update={"cache_size": 0}))
    uncached.image("validation", 0)  # first-use costs: noise and field banks
    times: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for index in range(1, n + 1):
        case = uncached.case("validation", index)
        wall, cpu = time.perf_counter(), time.process_time()
        uncached.image("validation", index)
        times[case.modality].append(((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000))
    return {m: (float(np.mean([w for w, _ in v])), float(np.mean([c for _, c in v]))) for m, v in sorted(times.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="test presence cases per preset")
    parser.add_argument("--n-train", type=int, default=200, help="train presence cases per preset")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--timing", type=int, default=60, help="cases to time the renderer on (0 to skip)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    args = parser.parse_args()

    views_ = ("overview", "drill_random", "drill_mimic")
    print("Presence accuracy (%, test), detector fitted on train; small = lesion radius <= 10.5 px + normals")
    print(f"{'preset':8} {'modality':8} {'stratum':7} {'n':>4} {'overview':>9} {'drill':>9} {'drill@mimic':>12}")
    for preset in args.presets:
        started = time.perf_counter()
        train = measure(preset, "train", args.n_train, seed=1, jobs=args.jobs)
        test = measure(preset, "test", args.n, seed=2, jobs=args.jobs)
        for stratum in ("all", "small"):
            keep_test = [r for r in test if stratum == "all" or r["small"]]
            keep_train = [r for r in train if stratum == "all" or r["small"]]
            if stratum == "small" and len(keep_test) == len(test):
                continue  # every lesion of this preset is small: the rows would repeat
            correct: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
            for modality in ("xray", "mri", "ct"):  # one detector per modality, as a reader knows the modality
                subset_train = [r for r in keep_train if r["modality"] == modality]
                subset_test = [r for r in keep_test if r["modality"] == modality]
                if not subset_test or len({r["label"] for r in subset_train}) < 2:
                    continue
                labels = np.array([r["label"] for r in subset_test])
                for view in views_:
                    hits = (fit_and_predict(subset_train, subset_test, view) == labels).tolist()
                    correct[modality][view] = hits
                    correct["all"][view] += hits
            for modality in ("all", "xray", "mri", "ct"):
                if modality not in correct:
                    continue
                n = len(correct[modality]["overview"])
                scores = [100 * float(np.mean(correct[modality][view])) for view in views_]
                print(f"{preset:8} {modality:8} {stratum:7} {n:4d} {scores[0]:9.1f} {scores[1]:9.1f} {scores[2]:12.1f}")
        print(f"# {preset}: {time.perf_counter() - started:.0f} s")
    if args.timing:
        source = PhantomSource(PRESETS["medium"])
        timing = render_ms(source, args.timing)
        print(
            "render ms/case, 1024 px, no cache (wall / CPU): "
            + ", ".join(f"{k} {w:.0f} / {c:.0f}" for k, (w, c) in timing.items())
        )
        wall, cpu = np.mean([w for w, _ in timing.values()]), np.mean([c for _, c in timing.values()])
        print(f"mean over modalities: wall {wall:.0f} ms, CPU {cpu:.0f} ms")


if __name__ == "__main__":
    main()
