"""Whole-image checks: flag inputs that are not upright chest radiographs (``not_radiograph``,
``inverted``, ``rotated``), from the pixels alone, before the model runs.

Pure functions on numpy arrays (numpy only: no torch, no files, no logging). Every number
below was measured or fitted on the shared data by ``benchmarks/qa_flags.py``; rerun it to
check or refit them.
"""

from __future__ import annotations

import numpy as np

from mmcli.qa.flags import INVERTED, NOT_RADIOGRAPH, ROTATED

__all__ = ["film_thumbnails", "image_flags", "inversion_features", "radiograph_stats", "rotation_features",
           "thumbnail", "upright_features", "upright_scores"]

MIN_SIDE = 64  # px: below this on either side nothing about the image can be judged
# Limits on statistics of the (at most) 256 x 256 box-averaged thumbnail. Real films of all
# five shared sets (1648) lie well inside them (benchmarks/qa_flags.py prints the ranges).
MIN_STD = 0.06  # real films >= 0.10: constant, near-constant, fine noise averaged away
MIN_LAG1 = 0.9  # correlation of neighbouring pixels; real films >= 0.97, white noise ~0
MIN_ENTROPY = 3.5  # bits, 64-bin histogram; real films >= 4.1: two-tone pages, checkerboards
LAPLACIAN_RANGE = (0.02, 0.5)  # mean |Laplacian| / std; real 0.04..0.23: gradients, smooth blobs / text
# "Upright film" logistic model on the 64 x 64 thumbnail, fitted by benchmarks/qa_flags.py
# (real films against their inversions, turns and inverted turns; pasted from its output).
# An image is flagged when the correction that makes it look most upright (of the ten in
# _CORRECTIONS) beats leaving it as it is by more than UPRIGHT_MARGIN.
UPRIGHT_WEIGHTS = (
    -10.625, -0.85454, 0.67497, 0.45195, -0.43919, 0.01128, -0.34276, -0.87774,
    3.3431, 0.12535, -0.81547, -0.60076, 0.14089, 0.10393, -0.67167, -0.71706,
    0.097358, 0.026472, 0.58161, -0.58537, -0.12215, -0.32819, -0.48757, 0.5458,
    0.10052, -0.060148, 1.1955, -0.51152, -0.1198, -0.41585, -0.65067, 0.57209,
    0.12876, -0.11476, 0.13842, -0.73645, 0.088364, 0.2093, -0.47305, 0.24536,
    -0.11844, -0.22643, -0.74033, -0.33841, 0.49311, 0.62522, 0.10907, -0.81175,
    -0.13965, -0.08614, -0.96869, -0.61955, 1.0971, 1.4634, 0.26814, -1.0727,
    -0.05388, -0.16361, 0.1032, 0.55544, 1.6497, 1.7683, 0.79133, -0.37486,
    -0.18057, -0.61387, 0.40347, 0.63861, 0.53614, 0.51273, 0.49416, 0.36082,
    -0.42739, -0.82368, -0.87774,
)
UPRIGHT_MARGIN = 0.0


def _shrink(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Box-average (or repeat, when growing) ``axis`` of ``x`` to length ``n``."""
    size = x.shape[axis]
    if size <= n:
        return np.take(x, ((np.arange(n) + 0.5) * size / n).astype(np.intp), axis=axis)
    k = size // n  # first an integer block sum over all but < k trailing lines: fast
    m = size // k
    x = np.take(x, np.arange(m * k), axis=axis) if m * k != size else x
    shape = x.shape[:axis] + (m, k) + x.shape[axis + 1:]
    if axis == 0:  # k whole rows at a time, in float64: numpy's own order, a quarter of its time
        blocks = x.reshape(shape)
        total = blocks[:, 0].astype(np.float64)
        for i in range(1, k):
            total += blocks[:, i]
        x = total / k
    else:
        x = x.reshape(shape).sum(axis=axis + 1, dtype=np.float64) / k
    if m == n:  # one block per output line already (a size divisible by n)
        return x
    edges = (np.arange(n + 1) * m) // n
    return np.add.reduceat(x, edges[:-1], axis=axis) / np.expand_dims(np.diff(edges), 1 - axis)


def thumbnail(pixels: np.ndarray, n: int) -> np.ndarray:
    """(H, W) -> (n, n) float64 box average (aspect not kept, as the shared sets were made)."""
    return _shrink(_shrink(np.asarray(pixels), n, 0), n, 1)


def film_thumbnails(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (n, n) thumbnail, n = min(256, H, W), and the (64, 64) one that flags are judged on."""
    t = thumbnail(pixels, min(256, *np.shape(pixels)))
    return t, thumbnail(t, 64)


def _zscore(t: np.ndarray) -> np.ndarray:
    """z-scores of each (n, n) image in ``t`` (..., n, n)."""
    mean = t.mean(axis=(-2, -1), keepdims=True)
    return (t - mean) / np.maximum(t.std(axis=(-2, -1), keepdims=True), 1e-6)


def _corrs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of images in ``a``, ``b`` (..., h, w); 1 where one is constant."""
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    den = np.sqrt((a * a).sum(axis=(-2, -1)) * (b * b).sum(axis=(-2, -1)))
    return np.where(den > 0, (a * b).sum(axis=(-2, -1)) / np.where(den > 0, den, 1.0), 1.0)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(_corrs(a, b))


def _means(q: np.ndarray) -> np.ndarray:
    return q.mean(axis=(-2, -1))


def radiograph_stats(t: np.ndarray) -> dict[str, float]:
    """Statistics of a thumbnail ``t`` (n, n) that separate films from other images."""
    std = float(t.std())
    lag1 = 0.5 * (_corr(t[:, 1:], t[:, :-1]) + _corr(t[1:], t[:-1]))
    hist = np.bincount(np.clip((t * 64).astype(np.intp), 0, 63).ravel(), minlength=64) / t.size
    hist = hist[hist > 0]
    lap = 4 * t[1:-1, 1:-1] - t[:-2, 1:-1] - t[2:, 1:-1] - t[1:-1, :-2] - t[1:-1, 2:]
    return {
        "std": std, "lag1": lag1, "entropy": float(-(hist * np.log2(hist)).sum()),
        "laplacian": float(np.abs(lap).mean()) / max(std, 1e-6),
    }


def inversion_features(x64: np.ndarray) -> np.ndarray:
    """8 features of a (64, 64) thumbnail; each changes sign when the film is inverted.

    Mean z-score of the lung fields, the mediastinum, the bottom band (abdomen), the top
    band, the top corners and the outer columns; the skewness and the median z-score.
    A stack (..., 64, 64) of thumbnails gives (..., 8).
    """
    q = _zscore(np.asarray(x64))
    return np.stack([
        0.5 * (_means(q[..., 16:44, 8:26]) + _means(q[..., 16:44, 38:56])), _means(q[..., 12:48, 28:36]),
        _means(q[..., 54:, :]), _means(q[..., :8, :]), 0.5 * (_means(q[..., :10, :10]) + _means(q[..., :10, -10:])),
        0.5 * (_means(q[..., :, :4]) + _means(q[..., :, -4:])), _means(q**3),
        np.median(q.reshape(*q.shape[:-2], -1), axis=-1),
    ], axis=-1)


def rotation_features(x64: np.ndarray) -> np.ndarray:
    """66 features of a (64, 64) thumbnail: the 8 x 8 block means of its z-scores (a
    template of the upright film), left-right minus top-bottom mirror correlation, skewness.
    A stack (..., 64, 64) of thumbnails gives (..., 66)."""
    q = _zscore(np.asarray(x64))
    lead = q.shape[:-2]
    blocks = q.reshape(*lead, 8, 8, 8, 8).mean(axis=(-3, -1)).reshape(*lead, 64)
    mirror = _corrs(q, q[..., :, ::-1]) - _corrs(q, q[..., ::-1, :])
    return np.concatenate([blocks, mirror[..., None], _means(q**3)[..., None]], axis=-1)


def upright_features(x64: np.ndarray) -> np.ndarray:
    """The 74 features of the upright-film model: inversion and rotation features
    ((74,) for a (64, 64) thumbnail, (..., 74) for a stack of them)."""
    return np.concatenate([inversion_features(x64), rotation_features(x64)], axis=-1)


_TURNS = (
    ((), lambda q: q), ((ROTATED,), lambda q: np.rot90(q, 1)), ((ROTATED,), lambda q: np.rot90(q, -1)),
    ((ROTATED,), lambda q: np.rot90(q, 2)), ((ROTATED,), lambda q: q[::-1]),
)
# (flags it implies, correction): every turn, with and without undoing an inversion.
_CORRECTIONS = tuple((f, t) for f, t in _TURNS) + tuple(((INVERTED, *f), t) for f, t in _TURNS)


def upright_scores(x64: np.ndarray, weights: tuple[float, ...] | None = None) -> np.ndarray:
    """(10,) upright-film score of each correction of ``x64`` in ``_CORRECTIONS`` order."""
    w = np.asarray(UPRIGHT_WEIGHTS if weights is None else weights)
    corrected = np.stack([t(1.0 - x64 if INVERTED in f else x64) for f, t in _CORRECTIONS])
    return w[0] + upright_features(corrected) @ w[1:]


def image_flags(pixels: np.ndarray, *, height: int, width: int, colour: bool = False) -> list[str]:
    """Quality flags for one image as read: a subset of ``not_radiograph``, ``inverted``, ``rotated``.

    ``not_radiograph`` (then alone): ``min(height, width) < 64``; ``colour`` (the source
    had chroma: the reader folds it to grey, so the caller must say); or a thumbnail
    statistic outside the limits above (constant, noise, two-tone, gradient or text).
    ``inverted``: a negative film; ``rotated``: turned by 90/180 degrees or upside down;
    both when the image looks most like an upright film after undoing both.

    Args:
        pixels: (H, W) float32 in [0, 1], 1 = bright, at any resolution.
        height, width: the source image's size in pixels (may differ from ``pixels``).
        colour: whether the source image had colour (chroma).

    Raises:
        ValueError: ``pixels`` is not 2-D or holds values outside [0, 1] (or NaN).
    """
    x = np.asarray(pixels)
    if x.ndim != 2:
        raise ValueError(f"pixels must be 2-D (H, W), not of shape {x.shape}")
    if min(height, width, *x.shape) < MIN_SIDE:
        return [NOT_RADIOGRAPH]
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(f"pixels must lie in [0, 1], found {lo:g}..{hi:g}")
    t, x64 = film_thumbnails(x)
    s = radiograph_stats(t)
    if (
        colour or s["std"] < MIN_STD or s["lag1"] < MIN_LAG1 or s["entropy"] < MIN_ENTROPY
        or not LAPLACIAN_RANGE[0] <= s["laplacian"] <= LAPLACIAN_RANGE[1]
    ):
        return [NOT_RADIOGRAPH]
    scores = upright_scores(x64)
    best = int(np.argmax(scores))
    return list(_CORRECTIONS[best][0]) if scores[best] - scores[0] > UPRIGHT_MARGIN else []
