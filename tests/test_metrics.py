"""Metrics against hand-computed values and against scikit-learn / scikit-image."""

import math

import numpy as np
import pytest
from skimage.metrics import hausdorff_distance, structural_similarity
from sklearn import metrics as skm

from mmcli import metrics as M

Y_TRUE = np.array([1, 1, 0, 0, 1])
Y_PRED = np.array([1, 0, 0, 1, 1])  # tp 2, fp 1, fn 1, tn 1


def test_classification_by_hand():
    assert M.confusion(Y_TRUE, Y_PRED) == (2, 1, 1, 1)
    assert M.accuracy(Y_TRUE, Y_PRED) == pytest.approx(3 / 5)
    assert M.f1_per_class(Y_TRUE, Y_PRED) == pytest.approx([2 / 4, 4 / 6])
    assert M.sensitivity(Y_TRUE, Y_PRED) == pytest.approx(2 / 3)
    assert M.specificity(Y_TRUE, Y_PRED) == pytest.approx(1 / 2)
    assert math.isnan(M.sensitivity([0, 0], [0, 1])) and math.isnan(M.accuracy([], []))


def test_classification_matches_sklearn():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert M.accuracy(t, p) == pytest.approx(skm.accuracy_score(t, p))
    assert M.f1_per_class(t, p) == pytest.approx(skm.f1_score(t, p, average=None))
    assert M.sensitivity(t, p) == pytest.approx(skm.recall_score(t, p))
    assert M.specificity(t, p) == pytest.approx(skm.recall_score(1 - t, 1 - p))
    balanced = M.CLASSIFICATION_METRICS["balanced_accuracy"]
    assert balanced(t, p, p) == pytest.approx(skm.balanced_accuracy_score(t, p))
    assert balanced(Y_TRUE, Y_PRED, Y_PRED) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a constant predictor: F1 of the class never predicted is 0, as sklearn with zero_division=0
    const = np.ones_like(t)
    assert M.f1_per_class(t, const) == pytest.approx(skm.f1_score(t, const, average=None, zero_division=0))


def test_roc_auc_by_hand_and_sklearn():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))
    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * t, 1)  # rounding makes many ties
    assert M.roc_auc(t, s) == pytest.approx(skm.roc_auc_score(t, s))
    fpr, tpr = M.roc_curve(t, s)
    sk_fpr, sk_tpr, _ = skm.roc_curve(t, s, drop_intermediate=False)
    assert fpr == pytest.approx(sk_fpr) and tpr == pytest.approx(sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(t, s))


def test_expected_calibration_error_by_hand():
    # confidences 0.85 (wrong), 0.85 (right), 0.75 (right), 0.65 (right), 10 bins:
    # 2/4 * |0.5 - 0.85| + 1/4 * |1 - 0.75| + 1/4 * |1 - 0.65| = 0.325
    p_pos = np.array([0.85, 0.85, 0.25, 0.65])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    y = np.array([0, 1, 0, 1])
    assert M.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.325)
    count, conf, acc = M.calibration_bins(probs, y, n_bins=10)
    assert count.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2, 0]
    assert conf[8] == pytest.approx(0.85) and acc[8] == pytest.approx(0.5) and math.isnan(acc[0])
    perfect = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert M.expected_calibration_error(perfect, np.array([1, 0])) == 0.0


def test_expected_calibration_error_default_bins_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=np.float32)
    labels = np.array([0, 1, 1, 1])
    # 15 bins, each confidence alone in its bin: 0.8 wrong, 0.9, 0.7 and 0.6 right
    want = (abs(0 - 0.8) + abs(1 - 0.9) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert M.expected_calibration_error(probs, labels) == pytest.approx(want, abs=1e-6)
    assert math.isnan(M.expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)))


def test_overlap_by_hand():
    true = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    true[0, :4] = True
    pred[0, 2:] = pred[1, 2:] = pred[2, 3] = True  # 2 shared pixels; 4 true, 5 predicted
    m = M.overlap_metrics(pred, true)
    assert m == pytest.approx({"dice": 4 / 9, "jaccard": 2 / 7, "precision": 2 / 5, "recall": 2 / 4})
    empty = M.overlap_metrics(np.zeros((3, 3)), np.zeros((3, 3)))
    assert empty["dice"] == empty["jaccard"] == 1.0 and math.isnan(empty["precision"])


def test_overlap_matches_sklearn_and_jaccard_below_dice():
    rng = np.random.default_rng(3)
    for _ in range(20):
        pred, true = rng.random((16, 16)) < rng.random(), rng.random((16, 16)) < rng.random()
        m = M.overlap_metrics(pred.astype(np.uint8) * 255, true)  # any nonzero value is lung
        t, p = true.ravel(), pred.ravel()
        assert m["dice"] == pytest.approx(skm.f1_score(t, p, zero_division=1.0))
        assert m["jaccard"] == pytest.approx(skm.jaccard_score(t, p, zero_division=1.0))
        if p.any():
            assert m["precision"] == pytest.approx(skm.precision_score(t, p))
        if t.any():
            assert m["recall"] == pytest.approx(skm.recall_score(t, p))
        assert m["jaccard"] <= m["dice"]
        assert m["jaccard"] == pytest.approx(m["dice"] / (2 - m["dice"]))


def test_ssim_matches_skimage():
    rng = np.random.default_rng(4)
    a, b = rng.random((32, 32)) > 0.5, rng.random((32, 32)) > 0.5
    assert M.mask_ssim(a, a) == pytest.approx(1.0)
    expected = structural_similarity(a.astype(float), b.astype(float), data_range=1.0)
    assert M.mask_ssim(a, b) == pytest.approx(expected)
    assert math.isnan(M.mask_ssim(a[:5, :5], b[:5, :5]))


def test_hausdorff_by_hand():
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[2, 2], b[2, 5] = True, True
    h = M.hausdorff_distances(a, b, spacing=(0.5, 2.0))
    assert h == pytest.approx({"ahd": 3.0, "hd95": 3.0, "ahd_mm": 6.0, "hd95_mm": 6.0})
    # a 4x4 square and the same square 1 column right: of the 12 boundary pixels of
    # each, the 6 in the first and last columns are 1 away from the other boundary
    sq1, sq2 = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    sq1[2:6, 2:6], sq2[2:6, 3:7] = True, True
    assert M.boundary(sq1).sum() == 12
    h = M.hausdorff_distances(sq1, sq2)
    assert h["ahd"] == pytest.approx(6 / 12) and h["hd95"] == pytest.approx(1.0)
    assert math.isnan(h["ahd_mm"])
    h = M.hausdorff_distances(a, np.zeros((8, 8), bool))
    assert all(math.isnan(v) for v in h.values())


def test_hausdorff_matches_skimage_on_boundaries():
    from skimage.draw import ellipse

    a, b = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    a[ellipse(30, 25, 20, 10)] = True
    b[ellipse(34, 28, 18, 13)] = True
    h = M.hausdorff_distances(a, b)
    ba, bb = M.boundary(a), M.boundary(b)
    assert h["ahd"] == pytest.approx(hausdorff_distance(ba, bb, method="modified"))
    assert 0 < h["ahd"] <= h["hd95"] <= hausdorff_distance(ba, bb)


def test_segmentation_metrics_rejects_other_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        M.segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    x = np.random.default_rng(5).normal(size=100)
    lo, hi = M.bootstrap_ci(np.mean, x, seed=7, n_resamples=500)
    assert lo < x.mean() < hi
    assert (lo, hi) == M.bootstrap_ci(np.mean, x, seed=7, n_resamples=500)
    assert M.bootstrap_ci(np.mean, np.full(10, 2.0), n_resamples=50) == (2.0, 2.0)
    assert all(math.isnan(v) for v in M.bootstrap_ci(np.mean, np.zeros(0)))
    # resamples with one class only give a NaN AUC and are dropped
    lo, hi = M.bootstrap_ci(M.roc_auc, np.array([0, 1, 1]), np.array([0.1, 0.9, 0.8]), n_resamples=100)
    assert lo == hi == 1.0


def test_metrics_and_plots_do_not_import_torch():
    from pathlib import Path

    for name in ("metrics.py", "plots.py"):
        text = (Path(M.__file__).parent / name).read_text()
        assert "import torch" not in text and "from torch" not in text, name
