"""Temperature scaling of class probabilities, judged by the expected calibration error.

The ECE is :func:`mmcli.metrics.expected_calibration_error`, the same as ``mmcli evaluate`` reports.
Calibration cannot make things worse: the temperature stays 1 when the validation split is
too small to fit one (under :data:`MIN_CASES` images or under :data:`MIN_PER_CLASS` of a
class) or when the fitted temperature does not lower the validation ECE, and a fitted
temperature lies in :data:`T_RANGE`. The checkpoint and run.json say which happened.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcli import metrics as M
from mmcli.config import PreprocessConfig
from mmcli.data.transforms import normalize
from mmcli.ood import bottleneck_features, fit_ood
from mmcli.training.datasets import ImageTable
from mmcli.training.step import evaluate
from mmcli.weights import load_checkpoint, save_checkpoint

__all__ = ["MIN_CASES", "MIN_PER_CLASS", "T_RANGE", "calibrate_checkpoint", "choose_temperature", "fit_temperature",
           "too_small"]

MIN_CASES = 30
"""Fewest validation images a temperature is fitted on."""
MIN_PER_CLASS = 5
"""Fewest validation images of each class a temperature is fitted on."""
T_RANGE = (0.2, 5.0)
"""The temperatures a fit may return."""


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The temperature T in :data:`T_RANGE` that minimises the NLL of ``softmax(logits / T)``.

    Optimised over ``log T`` with LBFGS from T = 1, then checked against a coarse grid
    (LBFGS can stall on tiny or separable sets).

    Args:
        logits: (N, C) validation logits. labels: (N,) class indices.
    """
    logits, labels = logits.detach().float(), labels.long()
    if logits.shape[0] == 0:
        return 1.0

    def nll(log_t: Tensor) -> Tensor:
        return F.cross_entropy(logits / log_t.exp(), labels)

    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nll(log_t)
        loss.backward()
        return loss

    opt.step(closure)
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    candidates = [float(log_t.detach().clamp(lo, hi))] + torch.linspace(lo, hi, 61).tolist()
    with torch.no_grad():
        best = min(candidates, key=lambda c: float(nll(torch.tensor(c))))
    return math.exp(best)


def too_small(labels: Tensor, num_classes: int, *, min_cases: int = MIN_CASES,
              min_per_class: int = MIN_PER_CLASS) -> str | None:
    """Why a validation split with these labels is too small to fit a temperature on, or None."""
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    if len(labels) < min_cases:
        return f"validation split too small to fit a temperature ({len(labels)} images, fewer than {min_cases})"
    if min(counts) < min_per_class:
        return (f"validation split too small to fit a temperature ({min(counts)} images of a class, "
                f"fewer than {min_per_class})")
    return None


def choose_temperature(logits: Tensor, labels: Tensor, *, min_cases: int = MIN_CASES,
                       min_per_class: int = MIN_PER_CLASS) -> tuple[float, float, float, str | None]:
    """The temperature for these validation logits, and the ECE before and after it.

    It stays 1 when the split is too small (see :func:`too_small`) or when the fitted one
    (:func:`fit_temperature`) does not lower the ECE.

    Returns:
        (temperature, ECE before, ECE after, why the temperature stayed 1 or None).
    """
    y = labels.numpy()
    before = M.expected_calibration_error(torch.softmax(logits, 1).numpy(), y)
    kept = too_small(labels, logits.shape[1], min_cases=min_cases, min_per_class=min_per_class)
    if kept:
        return 1.0, before, before, kept
    t = fit_temperature(logits, labels)
    after = M.expected_calibration_error(torch.softmax(logits / t, 1).numpy(), y)
    if after >= before:
        return 1.0, before, before, (f"the fitted temperature {t:.3f} did not lower the validation ECE "
                                     f"({before:.4f} -> {after:.4f})")
    return t, before, after, None


def calibrate_checkpoint(
    path: Path, table: ImageTable, val_cls: list[int], pre: PreprocessConfig, *,
    batch_size: int, device: torch.device, precision: str, min_cases: int = MIN_CASES,
    min_per_class: int = MIN_PER_CLASS,
) -> tuple[float, float, float, str | None]:
    """Choose a temperature on the validation images (:func:`choose_temperature`) and store it
    in the checkpoint at ``path``, with the ECE before and after and why it stayed 1
    (``calibration_kept``) in its ``extra``.

    Returns:
        (temperature, ECE before, ECE after, why the temperature stayed 1 or None).
    """
    ckpt = load_checkpoint(path)
    model = ckpt.build_model().to(device)
    _, logits, labels = evaluate(model, table, [], val_cls, pre, batch_size=batch_size, device=device,
                                 precision=precision)
    t, before, after, kept = choose_temperature(logits, labels, min_cases=min_cases, min_per_class=min_per_class)
    ckpt.temperature = t
    ckpt.extra = {**ckpt.extra, "ece_before": before, "ece_after": after, "calibration_kept": kept}
    save_checkpoint(ckpt, path)
    return t, before, after, kept


def table_features(model: torch.nn.Module, table: ImageTable, positions: list[int], pre: PreprocessConfig, *,
                   batch_size: int, device: torch.device) -> Tensor:
    """``(N, C)`` bottleneck features (see :mod:`mmcli.ood`) of the table's images at ``positions``."""
    model.eval()
    chunks = []
    for start in range(0, len(positions), batch_size):
        idx = torch.as_tensor(positions[start : start + batch_size])
        chunks.append(bottleneck_features(model, normalize(table.images[idx], pre).to(device)).cpu())
    return torch.cat(chunks)


def store_ood_stats(path: Path, table: ImageTable, fit: list[int], validation: list[int], pre: PreprocessConfig,
                    *, batch_size: int, device: torch.device, which: str = "all images") -> dict[str, float] | None:
    """Fit out-of-distribution statistics on the training images ``fit`` and their threshold on the
    ``validation`` images (never trained on), and store them in the checkpoint at ``path``.

    Returns the stored metadata, or None when there are too few images (then nothing is stored).
    """
    if len(fit) < 2 or not validation:
        return None
    ckpt = load_checkpoint(path)
    model = ckpt.build_model().to(device)
    opts = {"batch_size": batch_size, "device": device}
    stats = fit_ood(table_features(model, table, fit, pre, **opts), table_features(model, table, validation, pre,
                                                                                   **opts))
    meta = stats.attach(ckpt, fitted_on=f"training split ({which})", threshold_on="validation split")
    save_checkpoint(ckpt, path)
    return meta
