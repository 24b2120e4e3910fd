"""Preprocessing of radiographs for the model, and its inverse for predicted masks.

One function maps native pixels to the model's input and one maps the model's mask
back onto the native pixel grid; every stream (prediction, training, evaluation) uses
these two, with the :class:`~mmcli.config.PreprocessConfig` stored in the checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmcli.config import PreprocessConfig

_EPS = 1e-6


def resize_to_model(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Resize grey images straight to ``size x size``.

    Args:
        pixels: ``(B, 1, H, W)`` or ``(H, W)`` float tensor.

    Returns:
        ``(B, 1, size, size)`` (or ``(size, size)``) float32. Bilinear with an antialiasing
        kernel when shrinking, like Pillow's ``BILINEAR`` that made the training sets.
    """
    squeeze = pixels.dim() == 2
    x = pixels[None, None] if squeeze else pixels
    x = x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0] if squeeze else x


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Apply the intensity normalisation of ``cfg`` to model-sized images.

    Args:
        x: ``(..., H, W)`` float tensor in ``[0, 1]``.

    Raises:
        ValueError: if ``x`` leaves ``[0, 1]`` (a reader or augmentation bug, not data).
    """
    lo, hi = float(x.min()), float(x.max())
    if lo < -_EPS or hi > 1 + _EPS:
        raise ValueError(f"pixels must lie in [0, 1] before normalisation, got [{lo:.4g}, {hi:.4g}]")
    if cfg.intensity == "minmax":
        flat = x.flatten(-2)
        mn = flat.min(-1).values[..., None, None]
        mx = flat.max(-1).values[..., None, None]
        x = (x - mn) / (mx - mn).clamp_min(_EPS)
    return (x - cfg.mean) / cfg.std


def preprocess(pixels: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Turn one reader output into the model's input.

    Args:
        pixels: ``(H, W)`` float array in ``[0, 1]`` (see :func:`mmcli.io.readers.read_radiograph`).

    Returns:
        ``(1, S, S)`` float32 tensor, ``S = cfg.image_size``.
    """
    t = torch.as_tensor(np.asarray(pixels, dtype=np.float32)) if isinstance(pixels, np.ndarray) else pixels
    small = resize_to_model(t, cfg.image_size).clamp_(0.0, 1.0)
    return normalize(small, cfg)[None]


def mask_to_native(mask_logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Map mask logits from the model grid back onto the native pixel grid.

    The forward resize maps the native image onto the model grid edge to edge, so the
    inverse is a bilinear resize of the logits to ``(height, width)`` with the same
    pixel-centre convention (``align_corners=False``), then the decision ``logit >= 0``
    (probability >= 0.5).

    Args:
        mask_logits: ``(S, S)`` or ``(1, S, S)`` logits.

    Returns:
        ``(height, width)`` bool tensor.
    """
    x = mask_logits.reshape(1, 1, *mask_logits.shape[-2:]).float()
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x[0, 0] >= 0
