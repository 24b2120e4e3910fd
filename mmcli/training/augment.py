"""Weak and strong augmentations as seeded tensor ops on images in [0, 1].

All functions take a batch ``(B, 1, H, W)`` of model-sized images in ``[0, 1]`` (before
normalisation; :func:`mmcli.data.transforms.normalize` comes after) and, for segmentation
streams, the masks ``(B, 1, H, W)`` in {0, 1}, which get the same geometric ops. Every
random draw comes from the ``torch.Generator`` passed in (a CPU generator), so a seed
fixes the augmentation exactly, whatever the device of the images.

Weak: optional horizontal flip (off by default: a flip swaps left and right lungs, and
radiographs carry laterality markers; turn it on knowingly), then a random crop of the
image padded by reflection of 1/8 of its size on each side (a translation of up to 1/8).

Strong (RandAugment-style, MULTIMIX.md): two ops drawn uniformly per image from
:data:`STRONG_OPS`, each applied with probability 0.5 at a random magnitude. Geometric
ops fill with black (0) and are applied to masks with nearest-neighbour sampling.

Site shift (:data:`SITE_OPS`, opt-in with ``mmcli train --site-aug``): what differs
between hospitals' films: windowing, gamma, edge enhancement, blur, detector noise, small
rotations and magnification. Each op named is applied to each image on its own with its
probability, at a value drawn uniformly from its range. Linear brightness and contrast
are not among them: the per-image min..max normalisation undoes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcli.training.config import SITE_OPS

__all__ = ["STRONG_OPS", "site_augment", "strong_augment", "weak_augment"]

_SHARPEN = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def _rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(shape, generator=gen)


def weak_augment(
    images: Tensor,
    gen: torch.Generator,
    *,
    masks: Tensor | None = None,
    hflip: bool = False,
    pad_fraction: float = 0.125,
) -> tuple[Tensor, Tensor | None]:
    """Optional horizontal flip, then a reflect-padded random crop of the original size.

    Args:
        images: (B, 1, H, W) in [0, 1].
        gen: CPU generator that supplies every random draw.
        masks: (B, 1, H, W) or None; cropped and flipped like the images.
        hflip: flip each image with probability 0.5.
        pad_fraction: padding (and so the largest shift) as a fraction of H and W.

    Returns:
        The augmented images and masks (same shapes).
    """
    b, _, h, w = images.shape
    flips = _rand(gen, b) < 0.5
    ph, pw = max(1, round(h * pad_fraction)), max(1, round(w * pad_fraction))
    dy = torch.randint(0, 2 * ph + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pw + 1, (b,), generator=gen).tolist()
    if hflip and bool(flips.any()):
        sel = flips.to(images.device)[:, None, None, None]
        images = torch.where(sel, images.flip(-1), images)
        if masks is not None:
            masks = torch.where(sel, masks.flip(-1), masks)
    pad = (pw, pw, ph, ph)
    padded = F.pad(images, pad, mode="reflect")
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if masks is not None:
        pm = F.pad(masks, pad, mode="reflect")
        masks = torch.stack([pm[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return out, masks


# ---- photometric ops: (1, 1, H, W) in [0, 1], magnitude m in [0, 1], sign s in {-1, 1} ----


def _identity(x: Tensor, m: float, s: float) -> Tensor:
    return x


def _autocontrast(x: Tensor, m: float, s: float) -> Tensor:
    lo, hi = x.amin(), x.amax()
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def _brightness(x: Tensor, m: float, s: float) -> Tensor:
    return x * (1 + 0.9 * m * s)


def _contrast(x: Tensor, m: float, s: float) -> Tensor:
    mean = x.mean()
    return mean + (1 + 0.9 * m * s) * (x - mean)


def _equalize(x: Tensor, m: float, s: float) -> Tensor:
    q = (x * 255).round().long().clamp(0, 255)
    cdf = torch.bincount(q.flatten(), minlength=256).cumsum(0).to(x.dtype)
    lo = cdf[cdf > 0][0]
    lut = (cdf - lo) / (cdf[-1] - lo).clamp_min(1.0)
    return lut[q].clamp(0, 1)


def _posterize(x: Tensor, m: float, s: float) -> Tensor:
    step = 2 ** (4 - round(4 * m))  # keep 4..8 bits
    return torch.floor(x * 255 / step) * step / 255


def _sharpness(x: Tensor, m: float, s: float) -> Tensor:
    kernel = _SHARPEN.to(x)[None, None]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    return smooth + (1 + 0.9 * m * s) * (x - smooth)


def _solarize(x: Tensor, m: float, s: float) -> Tensor:
    threshold = 1.0 - m
    return torch.where(x >= threshold, 1.0 - x, x)


# ---- geometric ops: an affine matrix (2, 3) in normalised coordinates ----


def _rotate(m: float, s: float) -> list[list[float]]:
    a = math.radians(30.0 * m * s)
    return [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]


def _shear_x(m: float, s: float) -> list[list[float]]:
    return [[1.0, 0.3 * m * s, 0.0], [0.0, 1.0, 0.0]]


def _shear_y(m: float, s: float) -> list[list[float]]:
    return [[1.0, 0.0, 0.0], [0.3 * m * s, 1.0, 0.0]]


def _translate_x(m: float, s: float) -> list[list[float]]:
    return [[1.0, 0.0, 2 * 0.3 * m * s], [0.0, 1.0, 0.0]]


def _translate_y(m: float, s: float) -> list[list[float]]:
    return [[1.0, 0.0, 0.0], [0.0, 1.0, 2 * 0.3 * m * s]]


PhotoOp = Callable[[Tensor, float, float], Tensor]
GeoOp = Callable[[float, float], list[list[float]]]
_PHOTOMETRIC: dict[str, PhotoOp] = {
    "autocontrast": _autocontrast, "brightness": _brightness, "contrast": _contrast, "equalize": _equalize,
    "identity": _identity, "posterize": _posterize, "sharpness": _sharpness, "solarize": _solarize,
}
_GEOMETRIC: dict[str, GeoOp] = {
    "rotate": _rotate, "shear_x": _shear_x, "shear_y": _shear_y, "translate_x": _translate_x,
    "translate_y": _translate_y,
}
STRONG_OPS: dict[str, PhotoOp | GeoOp] = {name: (_PHOTOMETRIC | _GEOMETRIC)[name]
                                          for name in sorted([*_PHOTOMETRIC, *_GEOMETRIC])}
"""The RandAugment pool of MULTIMIX.md (ShearX/Y and TranslateX/Y as separate ops), by name: the
order in which a random pick names them."""
_NAMES = tuple(STRONG_OPS)


def _warp(x: Tensor, theta: list[list[float]], mode: str) -> Tensor:
    grid = F.affine_grid(torch.tensor([theta], dtype=x.dtype, device=x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def strong_augment(
    images: Tensor,
    gen: torch.Generator,
    *,
    masks: Tensor | None = None,
    num_ops: int = 2,
    prob: float = 0.5,
) -> tuple[Tensor, Tensor | None]:
    """RandAugment-style strong augmentation (apply after :func:`weak_augment`).

    Args:
        images: (B, 1, H, W) in [0, 1].
        gen: CPU generator that supplies every random draw.
        masks: (B, 1, H, W) or None; geometric ops are applied to them too.
        num_ops: ops drawn (with replacement) per image.
        prob: probability that each drawn op is applied.

    Returns:
        Images (B, 1, H, W) clamped to [0, 1], and the masks.
    """
    b = images.shape[0]
    picks = torch.randint(0, len(_NAMES), (b, num_ops), generator=gen).tolist()
    apply = (_rand(gen, b, num_ops) < prob).tolist()
    mags = _rand(gen, b, num_ops).tolist()
    signs = torch.where(_rand(gen, b, num_ops) < 0.5, -1.0, 1.0).tolist()
    out_images, out_masks = [], []
    for i in range(b):
        x = images[i : i + 1]
        y = masks[i : i + 1] if masks is not None else None
        for k in range(num_ops):
            if not apply[i][k]:
                continue
            name = _NAMES[picks[i][k]]
            if name in _GEOMETRIC:
                theta = _GEOMETRIC[name](mags[i][k], signs[i][k])
                x = _warp(x, theta, "bilinear")
                y = _warp(y, theta, "nearest") if y is not None else None
            else:
                x = _PHOTOMETRIC[name](x, mags[i][k], signs[i][k]).clamp(0, 1)
        out_images.append(x.clamp(0, 1))
        if y is not None:
            out_masks.append(y)
    return torch.cat(out_images), (torch.cat(out_masks) if masks is not None else None)


# ---- site shift: (1, 1, H, W) in [0, 1] and a value v from the op's range ----


def _window(x: Tensor, v: float, split: float) -> Tensor:
    """Clip a share ``v`` (< 1) of the intensity range, a share ``split`` of it at the dark end, and rescale."""
    lo, hi = x.amin(), x.amax()
    unit = (x - lo) / (hi - lo).clamp_min(1e-6)
    return ((unit - v * split) / (1 - v)).clamp(0, 1)


def _gamma(x: Tensor, v: float) -> Tensor:
    return x.clamp_min(0).pow(math.exp(v))


def _blur_kernel(sigma: float, like: Tensor) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    k = _blur_kernel(sigma, x)
    r = (k.numel() - 1) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _blur(x: Tensor, v: float) -> Tensor:
    return _gaussian_blur(x, v * x.shape[-1] / 256)


def _edge_enhance(x: Tensor, v: float) -> Tensor:
    """Unsharp masking (large radius), the processing many radiography systems apply."""
    smooth = _gaussian_blur(x, 8.0 * x.shape[-1] / 256)
    return x + v * (x - smooth)


_SITE_PHOTO: dict[str, Callable[[Tensor, float], Tensor]] = {"gamma": _gamma, "edges": _edge_enhance,
                                                               "blur": _blur}


def site_augment(
    images: Tensor, gen: torch.Generator, ops: Sequence[str], *, masks: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Site-shift augmentation: each op of ``ops`` (names of :data:`SITE_OPS`) on each image with its probability.

    Args:
        images: (B, 1, H, W) in [0, 1].
        gen: CPU generator that supplies every random draw.
        ops: the ops to use; none gives the inputs back unchanged.
        masks: (B, 1, H, W) or None; rotations and scale changes move them too (nearest neighbour).

    Returns:
        Images (B, 1, H, W) in [0, 1], and the masks.
    """
    unknown = [o for o in ops if o not in SITE_OPS]
    if unknown:
        raise ValueError(f"unknown site augmentation(s) {unknown}: use {', '.join(SITE_OPS)}")
    if not ops:
        return images, masks
    b = images.shape[0]
    names = [n for n in SITE_OPS if n in ops]
    # One draw per image and op, used or not, so each op's randomness does not depend on the others.
    hit = _rand(gen, b, len(names), 2).tolist()
    out_images, out_masks = [], []
    for i in range(b):
        x = images[i : i + 1]
        y = masks[i : i + 1] if masks is not None else None
        angle, zoom = 0.0, 1.0
        for k, name in enumerate(names):
            op = SITE_OPS[name]
            if hit[i][k][0] >= op.p:
                continue
            v = op.low + (op.high - op.low) * hit[i][k][1]
            if name == "rotate":
                angle = v
            elif name == "scale":
                zoom = v
            elif name == "noise":
                x = x + v * torch.randn(x.shape, generator=gen).to(x)
            elif name == "window":  # given a hit, draw / p is uniform in [0, 1): the split between the ends
                x = _window(x, v, hit[i][k][0] / op.p)
            else:
                x = _SITE_PHOTO[name](x, v)
            x = x.clamp(0, 1)
        if angle or zoom != 1.0:
            a = math.radians(angle)
            theta = [[math.cos(a) / zoom, -math.sin(a) / zoom, 0.0], [math.sin(a) / zoom, math.cos(a) / zoom, 0.0]]
            x = _warp(x, theta, "bilinear")
            y = _warp(y, theta, "nearest") if y is not None else None
        out_images.append(x.clamp(0, 1))
        if y is not None:
            out_masks.append(y)
    return torch.cat(out_images), (torch.cat(out_masks) if masks is not None else None)
