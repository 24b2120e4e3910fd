"""The paper's metrics on numpy arrays (no torch), with seeded bootstrap intervals.

Classification (binary, positive class 1 = pneumonia): accuracy, F1 of each class,
sensitivity, specificity, ROC AUC and the expected calibration error. Segmentation:
Dice, Jaccard, precision and recall, all from the *same* binarised masks (so that
Jaccard <= Dice always holds, unlike the paper's table: MULTIMIX.md fault 9), SSIM, and
the average and 95th-percentile Hausdorff distances on mask boundaries.

Undefined values are NaN, never an exception: a metric of an empty set, an AUC with one
class only, a distance to an empty mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ECE_BINS = 15
_NAN = float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else _NAN


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    """Binary confusion counts ``(tp, fp, fn, tn)`` for ``(N,)`` arrays of {0, 1} (or bool)."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    if t.shape != p.shape:
        raise ValueError(f"shapes differ: {t.shape} vs {p.shape}")
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(~t & p))
    fn = int(np.count_nonzero(t & ~p))
    return tp, fp, fn, t.size - tp - fp - fn


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of equal labels; ``(N,)`` integer arrays. NaN when N = 0."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return _ratio(int(np.count_nonzero(t == p)), t.size)


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """F1 of each class (one-vs-rest), ``(n_classes,)``.

    F1 = 2 TP / (2 TP + FP + FN); 0 when a class is neither present nor predicted
    (sklearn's ``zero_division=0``), so a constant predictor scores 0 on the other class.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    out = np.zeros(n_classes)
    for c in range(n_classes):
        tp, fp, fn, _ = confusion(t == c, p == c)
        out[c] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return out


def sensitivity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """TP / (TP + FN) for the positive class 1; NaN without positives."""
    tp, _, fn, _ = confusion(y_true, y_pred)
    return _ratio(tp, tp + fn)


def specificity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """TN / (TN + FP); NaN without negatives."""
    _, fp, _, tn = confusion(y_true, y_pred)
    return _ratio(tn, tn + fp)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values, and each run's mean rank
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, by the Mann-Whitney U statistic (ties count one half).

    AUC = (sum of positive ranks - P (P + 1) / 2) / (P N), i.e. the probability that a
    random positive scores above a random negative. NaN when one class is missing.

    Args:
        y_true: ``(N,)`` {0, 1}. scores: ``(N,)`` higher means more likely positive.
    """
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return _NAN
    ranks = _average_ranks(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)``, each ``(K,)``, from (0, 0) to (1, 1), one per distinct score.

    Empty arrays when one class is missing.
    """
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of each run of tied scores
    tps = np.cumsum(t)[last]
    fps = np.cumsum(~t)[last]
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def calibration_bins(
    probabilities: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability table over ``n_bins`` equal-width confidence bins on [0, 1].

    Confidence is the top class probability; bin b holds confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also holds 0).

    Args:
        probabilities: ``(N, C)`` class probabilities. y_true: ``(N,)`` class indices.

    Returns:
        ``(count, confidence, accuracy)``, each ``(n_bins,)``; mean confidence and accuracy
        are NaN in empty bins.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == np.asarray(y_true)).astype(np.float64)
    which = np.clip(np.ceil(conf * n_bins).astype(int), 1, n_bins) - 1
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return count, mean_conf, mean_acc


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)| over :func:`calibration_bins`.

    Args:
        probabilities: ``(N, C)``. y_true: ``(N,)``. NaN when N = 0.
    """
    count, conf, acc = calibration_bins(probabilities, y_true, n_bins)
    total = count.sum()
    if not total:
        return _NAN
    used = count > 0
    return float(np.sum(count[used] / total * np.abs(acc[used] - conf[used])))


def overlap_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Dice, Jaccard, precision and recall of one binary mask pair, all from the same counts.

    Both masks are binarised once (nonzero = lung). Dice = 2TP / (2TP + FP + FN),
    Jaccard = TP / (TP + FP + FN): both 1.0 when both masks are empty (perfect
    agreement). Precision = TP / (TP + FP) is NaN for an empty prediction, recall =
    TP / (TP + FN) NaN for an empty reference.

    Args:
        pred, true: ``(H, W)`` masks of the same shape.
    """
    tp, fp, fn, _ = confusion(np.asarray(true) != 0, np.asarray(pred) != 0)
    dice = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    jaccard = tp / (tp + fp + fn) if (tp + fp + fn) else 1.0
    if jaccard > dice + 1e-12:  # impossible on binary masks: J = D / (2 - D)
        raise ArithmeticError(f"Jaccard {jaccard} > Dice {dice}: the masks were not binarised once")
    return {"dice": dice, "jaccard": jaccard, "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}


def mask_ssim(pred: np.ndarray, true: np.ndarray) -> float:
    """SSIM of two binary masks as float {0, 1} images (``data_range=1``, 7x7 window).

    NaN when a side is shorter than the 7-pixel window.

    Args:
        pred, true: ``(H, W)`` masks of the same shape.
    """
    from skimage.metrics import structural_similarity

    a = (np.asarray(pred) != 0).astype(np.float64)
    b = (np.asarray(true) != 0).astype(np.float64)
    if min(a.shape) < 7:
        return _NAN
    return float(structural_similarity(a, b, data_range=1.0))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask: foreground pixels with a 4-connected background
    neighbour (the image border counts as background). ``(H, W)`` bool."""
    m = np.asarray(mask) != 0
    padded = np.pad(m, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~interior


def _directed_distances(src: np.ndarray, dst: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """Distance from each ``True`` pixel of ``src`` to the nearest ``True`` pixel of ``dst``, ``(K,)``."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~dst, sampling=sampling)[src]


def hausdorff_distances(
    pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """Average and 95th-percentile Hausdorff distances between the masks' boundaries.

    Both are symmetric and computed on boundary pixels (:func:`boundary`), with exact
    Euclidean distances between pixel centres:

    * ``ahd`` (average Hausdorff, Dubuisson and Jain's modified Hausdorff, as
      ``skimage.metrics.hausdorff_distance(method="modified")``):
      ``max(mean_a d(a, B), mean_b d(b, A))``;
    * ``hd95``: the 95th percentile of the distances of both directions pooled (as MedPy).

    Both NaN when either mask is empty. With ``spacing`` (row, col mm per pixel) the
    same distances are also given in mm as ``ahd_mm`` and ``hd95_mm`` (NaN without).

    Args:
        pred, true: ``(H, W)`` masks of the same shape.
    """
    a, b = boundary(pred), boundary(true)
    out = {"ahd": _NAN, "hd95": _NAN, "ahd_mm": _NAN, "hd95_mm": _NAN}
    if not a.any() or not b.any():
        return out
    units = [("", (1.0, 1.0))] + ([("_mm", tuple(float(s) for s in spacing))] if spacing else [])
    for suffix, sampling in units:
        d_ab = _directed_distances(a, b, sampling)
        d_ba = _directed_distances(b, a, sampling)
        out["ahd" + suffix] = float(max(d_ab.mean(), d_ba.mean()))
        out["hd95" + suffix] = float(np.percentile(np.concatenate([d_ab, d_ba]), 95))
    return out


def segmentation_metrics(
    pred: np.ndarray, true: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """Every segmentation metric of one case: overlap, SSIM, Hausdorff (see above).

    Args:
        pred, true: ``(H, W)`` masks of the same shape. spacing: (row, col) mm or None.
    """
    if np.shape(pred) != np.shape(true):
        raise ValueError(f"mask shapes differ: predicted {np.shape(pred)}, reference {np.shape(true)}")
    return {**overlap_metrics(pred, true), "ssim": mask_ssim(pred, true), **hausdorff_distances(pred, true, spacing)}


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)`` resampling cases with replacement.

    The same case indices are drawn for every array (they hold one row per case, ``(N, ...)``).
    Resamples where the statistic is NaN (e.g. an AUC with one class drawn) are dropped;
    ``(nan, nan)`` when none is left or N = 0. Seeded: the same inputs give the same interval.
    """
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return _NAN, _NAN
    rng = np.random.default_rng(seed)
    values = np.array([statistic(*(a[idx] for a in arrays)) for idx in rng.integers(0, n, size=(n_resamples, n))])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return _NAN, _NAN
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def nanmean(values: np.ndarray) -> float:
    """Mean of the finite values of ``(N,)``; NaN when there are none (without a warning)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else _NAN


def _two_column(p_pos: np.ndarray) -> np.ndarray:
    return np.stack([1 - p_pos, p_pos], axis=1)


CLASSIFICATION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, yhat, p: accuracy(y, yhat),
    "f1_normal": lambda y, yhat, p: float(f1_per_class(y, yhat)[0]),
    "f1_pneumonia": lambda y, yhat, p: float(f1_per_class(y, yhat)[1]),
    "sensitivity": lambda y, yhat, p: sensitivity(y, yhat),
    "specificity": lambda y, yhat, p: specificity(y, yhat),
    "balanced_accuracy": lambda y, yhat, p: (sensitivity(y, yhat) + specificity(y, yhat)) / 2,
    "roc_auc": lambda y, yhat, p: roc_auc(y, p),
    "ece": lambda y, yhat, p: expected_calibration_error(_two_column(p), y),
}


def classification_summary(
    y_true: np.ndarray, y_pred: np.ndarray, p_pos: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Every classification metric with its bootstrap interval and the majority-class baseline.

    The baseline predicts the majority class of ``y_true`` (normal on a tie) for every
    case, with the constant probability of the positive class equal to the prevalence:
    its accuracy is the majority share, its AUC 0.5 and its ECE 0 (a constant at the
    base rate is perfectly calibrated, so a low ECE alone means little).

    Args:
        y_true, y_pred: ``(N,)`` {0, 1}. p_pos: ``(N,)`` probability of class 1.

    Returns:
        ``{metric: {"value", "ci_low", "ci_high", "baseline"}}`` for CLASSIFICATION_METRICS.
    """
    y, yhat, p = (np.asarray(a) for a in (y_true, y_pred, p_pos))
    prevalence = float(y.mean()) if y.size else _NAN
    majority = np.full(y.shape, int(prevalence > 0.5))
    constant = np.full(y.shape, prevalence)
    out = {}
    for name, fn in CLASSIFICATION_METRICS.items():
        low, high = bootstrap_ci(fn, y, yhat, p, n_resamples=n_bootstrap, seed=seed) if n_bootstrap else (_NAN,) * 2
        out[name] = {"value": fn(y, yhat, p), "ci_low": low, "ci_high": high, "baseline": fn(y, majority, constant)}
    return out


def mean_summary(values: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of the finite values of ``(N,)`` with its bootstrap interval, the median and the count."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    low, high = bootstrap_ci(nanmean, v, n_resamples=n_bootstrap, seed=seed) if n_bootstrap else (_NAN,) * 2
    median = float(np.median(v)) if v.size else _NAN
    return {"value": nanmean(v), "ci_low": low, "ci_high": high, "median": median, "n": int(v.size)}
