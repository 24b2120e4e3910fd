"""Temperature scaling of class probabilities, judged by the expected calibration error.

The ECE is :func:`mmcli.metrics.expected_calibration_error`, the same as ``mmcli evaluate`` reports.
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

__all__ = ["calibrate_checkpoint", "fit_temperature"]


def fit_temperature(logits: Tensor, labels: Tensor, *, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)``.

    Optimised over ``log T`` with LBFGS from T = 1, then checked against a coarse grid
    (LBFGS can stall on tiny or separable sets); T is clamped to [0.05, 20].

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
    lo, hi = math.log(0.05), math.log(20.0)
    candidates = [float(log_t.detach().clamp(lo, hi))] + torch.linspace(lo, hi, 61).tolist()
    with torch.no_grad():
        best = min(candidates, key=lambda c: float(nll(torch.tensor(c))))
    return math.exp(best)


def calibrate_checkpoint(
    path: Path, table: ImageTable, val_cls: list[int], pre: PreprocessConfig, *,
    batch_size: int, device: torch.device, precision: str,
) -> tuple[float, float, float]:
    """Fit a temperature on the validation images and store it in the checkpoint at ``path``.

    The ECE before and after go into the checkpoint's ``extra`` too.

    Returns:
        (temperature, ECE before, ECE after).
    """
    ckpt = load_checkpoint(path)
    model = ckpt.build_model().to(device)
    _, logits, labels = evaluate(model, table, [], val_cls, pre, batch_size=batch_size, device=device,
                                 precision=precision)
    t = fit_temperature(logits, labels)
    y = labels.numpy()
    before = M.expected_calibration_error(torch.softmax(logits, 1).numpy(), y)
    after = M.expected_calibration_error(torch.softmax(logits / t, 1).numpy(), y)
    ckpt.temperature = t
    ckpt.extra = {**ckpt.extra, "ece_before": before, "ece_after": after}
    save_checkpoint(ckpt, path)
    return t, before, after


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
                    *, batch_size: int, device: torch.device) -> dict[str, float] | None:
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
    meta = stats.attach(ckpt, fitted_on="training split", threshold_on="validation split")
    save_checkpoint(ckpt, path)
    return meta
