"""Temperature scaling of class probabilities, judged by the expected calibration error.

The ECE is :func:`mmcli.metrics.expected_calibration_error`, the same as ``mmcli evaluate`` reports.
Calibration cannot make things worse: the temperature stays 1 when the validation split is
too small to fit one (under :data:`MIN_CASES` images or under :data:`MIN_PER_CLASS` of a
class) or when the fitted temperature does not lower the validation ECE, and a fitted
temperature lies in :data:`T_RANGE`. The checkpoint and run.json say which happened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcli import metrics as M
from mmcli.config import PreprocessConfig
from mmcli.data.transforms import normalize
from mmcli.models import MultiMix
from mmcli.qa.ood import bottleneck_features, fit_ood
from mmcli.training.datasets import ImageTable
from mmcli.training.step import evaluate
from mmcli.weights import Checkpoint, load_checkpoint, save_checkpoint

__all__ = ["MIN_CASES", "MIN_PER_CLASS", "T_RANGE", "calibrate_checkpoint", "choose_temperature", "finish_checkpoints",
           "fit_temperature", "too_small"]

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
    (done,) = finish_checkpoints([path], table, pre, val_cls=val_cls, batch_size=batch_size, device=device,
                                 precision=precision, min_cases=min_cases, min_per_class=min_per_class)
    return done["calibration"]


def finish_checkpoints(
    paths: Sequence[Path], table: ImageTable, pre: PreprocessConfig, *, val_cls: list[int] | None = None,
    temperature: float | None = None, ood: tuple[list[int], list[int], str] | None = None,
    batch_size: int, device: torch.device,
    precision: str = "fp32", min_cases: int = MIN_CASES, min_per_class: int = MIN_PER_CLASS,
) -> list[dict[str, Any]]:
    """Calibrate the checkpoints at ``paths`` on ``val_cls`` and store out-of-distribution statistics
    in them (``ood``: the images that fit them, those that set the threshold, and which they are).

    ``temperature``, when given, is stored as it is instead of a fitted one (``val_cls`` is
    then ignored) and marked ``temperature_from_init`` in the checkpoint's ``extra``. Each
    file is read and written once, and checkpoints with the same weights (best and last when
    the best epoch is the last) are computed once. Either step is skipped when its argument
    is None; the OOD statistics also when there are under 2 images to fit them or no
    validation image.

    Returns:
        For each path, ``{"calibration": (temperature, ECE before, ECE after, why it stayed 1) | None,
        "ood": the stored OOD metadata | None}``.
    """
    computed: list[tuple[Checkpoint, dict[str, Any]]] = []
    results = []
    for path in paths:
        ckpt = load_checkpoint(path)
        result = next((r for other, r in computed if _same_weights(other, ckpt)), None)
        if result is None:
            model = ckpt.build_model().to(device)
            result = {"calibration": None, "stats": None}
            if val_cls is not None and temperature is None:
                _, logits, labels = evaluate(model, table, [], val_cls, pre, batch_size=batch_size, device=device,
                                             precision=precision)
                result["calibration"] = choose_temperature(logits, labels, min_cases=min_cases,
                                                           min_per_class=min_per_class)
            if ood is not None and len(ood[0]) >= 2 and ood[1]:
                fit, val = (table_features(model, table, part, pre, batch_size=batch_size, device=device)
                            for part in ood[:2])
                result["stats"] = fit_ood(fit, val)
            computed.append((ckpt, result))
        if result["calibration"] is not None:
            t, before, after, kept = result["calibration"]
            ckpt.temperature = t
            ckpt.extra = {**_without(ckpt.extra, "temperature_from_init"), "ece_before": before, "ece_after": after,
                          "calibration_kept": kept}
        if temperature is not None:
            ckpt.temperature = temperature
            extra = _without(ckpt.extra, "ece_before", "ece_after", "calibration_kept")
            ckpt.extra = {**extra, "temperature_from_init": True}
        meta = None
        if result["stats"] is not None and ood is not None:
            meta = result["stats"].attach(ckpt, fitted_on=f"training split ({ood[2]})", threshold_on="validation split")
        save_checkpoint(ckpt, path)
        results.append({"calibration": result["calibration"], "ood": meta})
    return results


def _without(extra: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in keys}


def _same_weights(a: Checkpoint, b: Checkpoint) -> bool:
    same_model = (a.model_name, a.model_kwargs, a.preprocess) == (b.model_name, b.model_kwargs, b.preprocess)
    return same_model and a.state_dict.keys() == b.state_dict.keys() and all(
        torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def table_features(model: MultiMix, table: ImageTable, positions: list[int], pre: PreprocessConfig, *,
                   batch_size: int, device: torch.device) -> Tensor:
    """``(N, C)`` bottleneck features (see :mod:`mmcli.qa.ood`) of the table's images at ``positions``."""
    model.eval()
    chunks = []
    for start in range(0, len(positions), batch_size):
        idx = torch.as_tensor(positions[start : start + batch_size])
        chunks.append(bottleneck_features(model, normalize(table.images[idx], pre).to(device)).cpu())
    return torch.cat(chunks)
