"""Small named building blocks of MultiMix (paper supplement, Tables 1-2).

Every block is resolution-agnostic; the model checks that its input size is
divisible by 16 so that the four poolings and four upsamplings line up.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassifierHead", "DoubleConv", "Down", "Dropout", "InstanceNorm", "MaxPool2x2", "Up", "upsample2x"]


class InstanceNorm(nn.GroupNorm):
    """Affine instance normalisation of (B, C, H, W): one group per channel.

    ``GroupNorm(C, C)`` computes exactly what ``InstanceNorm2d(C, affine=True)`` computes
    (per-sample, per-channel statistics, eps 1e-5, per-channel scale and shift, the same
    ``weight``/``bias`` parameter names), but PyTorch's CPU kernel for it runs about four
    times faster forward and 1.5 times faster forward plus backward.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels, num_channels, eps=1e-5, affine=True)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask is cheaper to draw on the CPU.

    The same distribution (each element zeroed with probability ``p``, the others scaled by
    ``1 / (1 - p)``), the same eval-mode identity, and the same global torch generator, so
    ``torch.manual_seed`` fixes it. On the CPU, when ``256 * p`` is a whole number (the
    paper's 0.25 is), the mask comes from random bytes, eight per 64-bit draw, instead of
    one draw per element: forward plus backward costs about half of ``nn.Dropout``'s.
    Elsewhere it is ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        level = self.p * 256
        if not self.training or self.inplace or x.device.type != "cpu" or not 0 < self.p < 1 or level % 1:
            return super().forward(x)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= int(level)
        return x.mul(keep.to(x.dtype).mul_(1.0 / (1.0 - self.p)))


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` with a faster CPU path: the same values and the same gradients.

    PyTorch's CPU kernel finds an index per output element, one element at a time, whether
    or not a gradient will need it. On the CPU, for a contiguous (B, C, H, W) input with
    even H and W, the maximum is taken as two pairwise maxima instead (left/right columns,
    then top/bottom rows), 2.5-4 times faster on the encoder's maps; when the input
    requires grad, the winners are kept as two boolean maps and turned into PyTorch's
    indices for its own backward kernel. Ties go to the first element in raster order, as
    in PyTorch, so for finite inputs values and gradients are bit for bit those of
    ``nn.MaxPool2d(2)``.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2 or not x.is_contiguous():
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool2x2Function.apply(x)
        return _pairwise_max(x)[0]


def _pairwise_max(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, H, W) -> the 2 x 2 maxima (B, C, H/2, W/2), and which rows and columns won:
    ``right`` (B, C, H, W/2) where the right column beat the left, ``bottom`` (B, C, H/2, W/2)
    where the bottom row's maximum beat the top's (strictly, so ties stay first)."""
    b, c, h, w = x.shape
    cols = x.view(b, c, h, w // 2, 2)
    left, right = cols[..., 0], cols[..., 1]
    rows = torch.maximum(left, right).view(b, c, h // 2, 2, w // 2)
    top, bottom = rows[:, :, :, 0], rows[:, :, :, 1]
    return torch.maximum(top, bottom), left < right, top < bottom


class _MaxPool2x2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out, right, bottom = _pairwise_max(x)
        ctx.save_for_backward(x, right, bottom)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        x, right, bottom = ctx.saved_tensors
        b, c, h2, w2 = grad.shape
        width = 2 * w2
        rights = right.view(b, c, h2, 2, w2)
        # The winning column in the winning row, then the flat index PyTorch's kernel expects.
        col = (rights[:, :, :, 0] & ~bottom) | (rights[:, :, :, 1] & bottom)
        corner = (torch.arange(h2, device=x.device)[:, None] * (2 * width)
                  + torch.arange(w2, device=x.device)[None] * 2)
        index = bottom.to(torch.int64).mul_(width).add_(col).add_(corner)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


def upsample2x(x: Tensor) -> Tensor:
    """Bilinear x2 upsampling of (B, C, h, w) to (B, C, 2h, 2w), ``align_corners=False``.

    What ``F.interpolate(x, scale_factor=2, mode="bilinear")`` computes (to float rounding,
    about 5e-7): with that alignment each output is 3/4 of its nearest input plus 1/4 of the
    next one out, edges repeated. On the CPU, without autograd, it is computed as two
    separable passes written straight into place: about five times faster than PyTorch's
    kernel on the decoder's two small maps, 1-1.4 times on the large ones; elsewhere it is
    ``F.interpolate``.
    """
    if x.device.type != "cpu" or x.ndim != 4 or (torch.is_grad_enabled() and x.requires_grad):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    x = x.contiguous()
    b, c, h, w = x.shape
    wide = torch.empty(b, c, h, w, 2, dtype=x.dtype, device=x.device)
    torch.lerp(x, torch.cat([x[..., :1], x[..., :-1]], dim=-1), 0.25, out=wide[..., 0])
    torch.lerp(x, torch.cat([x[..., 1:], x[..., -1:]], dim=-1), 0.25, out=wide[..., 1])
    wide = wide.view(b, c, h, 2 * w)
    out = torch.empty(b, c, h, 2, 2 * w, dtype=x.dtype, device=x.device)
    torch.lerp(wide, torch.cat([wide[:, :, :1], wide[:, :, :-1]], dim=2), 0.25, out=out[:, :, :, 0])
    torch.lerp(wide, torch.cat([wide[:, :, 1:], wide[:, :, -1:]], dim=2), 0.25, out=out[:, :, :, 1])
    return out.view(b, c, 2 * h, 2 * w)


class DoubleConv(nn.Sequential):
    """Conv3x3 -> InstanceNorm -> LeakyReLU, twice, then Dropout.

    Maps (B, in_ch, H, W) to (B, out_ch, H, W). The convolutions carry no bias:
    the affine InstanceNorm right after each one would cancel it. The LeakyReLU works in
    place on the norm's output, which nothing else keeps (its backward needs only its own
    result): the same values, one tensor fewer to write per layer.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        dropout: float = 0.25,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
            InstanceNorm(out_ch),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False),
            InstanceNorm(out_ch),
            nn.LeakyReLU(negative_slope, inplace=True),
            Dropout(dropout),
        )
        self.in_channels = in_ch
        self.out_channels = out_ch


class Down(nn.Sequential):
    """MaxPool2d(2) then DoubleConv: (B, in_ch, H, W) -> (B, out_ch, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int, **conv: float) -> None:
        """``conv``: ``dropout`` and ``negative_slope`` of the :class:`DoubleConv`."""
        super().__init__(MaxPool2x2(), DoubleConv(in_ch, out_ch, **conv))
        self.in_channels, self.out_channels = in_ch, out_ch


class Up(nn.Module):
    """Bilinear x2 upsampling, concatenation with the skip (and extra maps), DoubleConv.

    The deeper map (B, in_ch, h, w) is upsampled to the skip's size (B, skip_ch, 2h, 2w);
    ``extra`` (B, extra_ch, 2h, 2w), when the block was built with ``extra_ch > 0``,
    is appended after the skip. Output: (B, out_ch, 2h, 2w).
    """

    def __init__(
        self,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        extra_ch: int = 0,
        *,
        dropout: float = 0.25,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        self.extra_channels = extra_ch
        self.conv = DoubleConv(in_ch + skip_ch + extra_ch, out_ch, dropout=dropout, negative_slope=negative_slope)

    def forward(self, x: Tensor, skip: Tensor, extra: Tensor | None = None) -> Tensor:
        """(B, in_ch, h, w), (B, skip_ch, 2h, 2w), extra -> (B, out_ch, 2h, 2w)."""
        if (extra is None) != (self.extra_channels == 0):
            raise ValueError(
                f"Up block built with extra_ch={self.extra_channels} "
                f"got extra={'None' if extra is None else tuple(extra.shape)}"
            )
        if tuple(skip.shape[-2:]) == (2 * x.shape[-2], 2 * x.shape[-1]):
            up = upsample2x(x)
        else:
            up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        parts = [up, skip]
        if extra is not None:
            # The bridge arrives in float32 while autocast may run the decoder in bf16.
            parts.append(extra.to(up.dtype))
        first, *rest = self.conv
        if not isinstance(first, nn.Conv2d):
            raise TypeError(f"Up block: DoubleConv starts with {type(first).__name__}, not a convolution")
        y = _conv_of_concat(first, parts)
        for layer in rest:
            y = layer(y)
        return y


def _conv_of_concat(conv: nn.Conv2d, parts: list[Tensor]) -> Tensor:
    """``conv(torch.cat(parts, dim=1))`` as a sum of convolutions over the parts.

    A convolution is linear in its input channels, so slicing the weight by part gives
    the same result without materialising the concatenation; on CPUs this is markedly
    faster at full resolution (a 48-channel 256 x 256 concatenation costs more than the
    extra additions). The module keeps one weight, so checkpoints are unchanged.
    """
    out: Tensor | None = None
    start = 0
    for part in parts:
        stop = start + part.shape[1]
        y = F.conv2d(part, conv.weight[:, start:stop], None, conv.stride, conv.padding, conv.dilation)
        out = y if out is None else out.add_(y)
        start = stop
    assert out is not None and conv.bias is None  # DoubleConv's convolutions carry no bias
    return out


class ClassifierHead(nn.Sequential):
    """MaxPool2d(2) -> global average pool -> Linear: (B, in_ch, h, w) -> (B, num_classes)."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__(
            MaxPool2x2(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(in_ch, num_classes),
        )
