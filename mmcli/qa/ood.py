"""Out-of-distribution detection: how far an image's features lie from the training images'.

The feature of an image is its bottleneck (the encoder's last stage, the classifier's
input) averaged over space: ``(C,)`` per image, 256 numbers for the paper's widths. The
training images' features give a mean and a shrunk covariance; an image's distance is
its squared Mahalanobis distance to them. The threshold is the ``1 - false_alarm``
quantile of the distances of *validation* images (not used for the mean and covariance, and
never trained on), so that about ``false_alarm`` (2 %) of in-distribution images are flagged.

The statistics travel in the checkpoint (tensors ``ood.mean`` and ``ood.precision``,
metadata ``extra["ood"]``), so every command that loads the weights can flag
``out_of_distribution`` images with no extra file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmcli.errors import WeightsError
from mmcli.models.multimix import MultiMix

__all__ = ["OODStats", "bottleneck_features", "fit_ood"]

SHRINKAGE = 0.01
"""Weight of the scaled identity in the covariance: ``(1 - s) S + s tr(S) / C I``.

With about a thousand training images and 256 features the sample covariance is full
rank but its smallest eigenvalues are noisy; a little shrinkage keeps the inverse stable.
Measured on the default weights (``benchmarks/ood_stats.py``, false alarm 2 %): 0.01
flagged 0 % / 2.4 % of unseen in-domain films (JSRT / Kermany), 38 % / 43 % of the adult
cross-domain sets and 98 % of inverted films; 0.1 caught only 20 % / 22 % and 75 %."""
FALSE_ALARM = 0.02
"""Share of in-distribution validation images the threshold flags. 5 % flagged 3-6 % of
unseen in-domain films on its own, too many beside the other quality flags."""


def bottleneck_features(model: MultiMix, images: Tensor) -> Tensor:
    """``(B, C)`` space-averaged bottleneck features of ``images`` ``(B, 1, S, S)`` (no gradient)."""
    with torch.no_grad():
        return model.encode(images).bottleneck.float().mean(dim=(2, 3))


@dataclass(frozen=True)
class OODStats:
    """Feature statistics of a model's training images and the distance that flags an image.

    Attributes:
        mean: ``(C,)`` mean feature. precision: ``(C, C)`` inverse of the shrunk covariance.
        threshold: distances above it are ``out_of_distribution``.
        info: how they were made (counts, false-alarm rate, shrinkage), as JSON values.
    """

    mean: Tensor
    precision: Tensor
    threshold: float
    info: dict[str, Any]

    def distance(self, features: Tensor) -> Tensor:
        """``(B,)`` squared Mahalanobis distances of ``(B, C)`` features."""
        centred = features.float().cpu() - self.mean
        return torch.einsum("bi,ij,bj->b", centred, self.precision, centred)

    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The tensors and the metadata entry that store these statistics in a checkpoint."""
        return {"ood.mean": self.mean, "ood.precision": self.precision}, {"threshold": self.threshold, **self.info}

    def attach(self, ckpt: Any, **notes: str) -> dict[str, Any]:
        """Store these statistics in the :class:`mmcli.weights.Checkpoint` ``ckpt`` (save it after),
        with ``notes`` on where they came from; returns the metadata entry."""
        tensors, meta = self.to_checkpoint()
        meta = {**meta, **notes}
        ckpt.tensors = {**ckpt.tensors, **tensors}
        ckpt.extra = {**ckpt.extra, "ood": meta}
        return meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], extra: dict[str, Any]) -> OODStats | None:
        """The statistics a checkpoint holds, or None (weights made before they existed).

        Raises:
            WeightsError: the statistics are there but malformed.
        """
        meta = extra.get("ood")
        if meta is None and "ood.mean" not in tensors:
            return None
        try:
            mean, precision = tensors["ood.mean"].float(), tensors["ood.precision"].float()
            if not isinstance(meta, dict):
                raise TypeError(f"extra['ood'] is {type(meta).__name__}, not a mapping")
            threshold = float(meta["threshold"])
            ok = mean.ndim == 1 and precision.shape == (mean.numel(), mean.numel()) and math.isfinite(threshold)
        except (KeyError, TypeError, ValueError) as err:
            raise WeightsError(f"out-of-distribution statistics in the checkpoint are incomplete: {err}") from None
        if not ok:
            raise WeightsError("out-of-distribution statistics in the checkpoint have the wrong shape")
        return cls(mean, precision, threshold, {k: v for k, v in meta.items() if k != "threshold"})


def fit_ood(fit: Tensor, calibration: Tensor, *, false_alarm: float = FALSE_ALARM, shrinkage: float = SHRINKAGE,
            ) -> OODStats:
    """Statistics from training features ``fit`` ``(N, C)``; threshold from ``calibration`` ``(M, C)``.

    The threshold is the ``1 - false_alarm`` quantile of the calibration distances.
    """
    if fit.shape[0] < 2 or calibration.shape[0] < 1:
        raise ValueError(f"need at least 2 fitting and 1 calibration images, got {fit.shape[0]} and "
                         f"{calibration.shape[0]}")
    fit = fit.double().cpu()
    mean = fit.mean(dim=0)
    cov = torch.cov(fit.T)
    dim = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / dim * torch.eye(dim, dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    stats = OODStats(mean.float(), precision.float(), math.inf, {})
    distances = stats.distance(calibration)
    threshold = float(torch.quantile(distances.double(), 1 - false_alarm))
    info = {"feature": "bottleneck mean", "false_alarm": false_alarm, "shrinkage": shrinkage,
            "n_fit": int(fit.shape[0]), "n_calibration": int(calibration.shape[0])}
    return OODStats(mean.float(), precision.float(), threshold, info)
