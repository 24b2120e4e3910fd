"""Small named building blocks of MultiMix (paper supplement, Tables 1-2).

Every block is resolution-agnostic; the model checks that its input size is
divisible by 16 so that the four poolings and four upsamplings line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassifierHead", "DoubleConv", "Down", "Dropout", "InstanceNorm", "Up"]


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


class DoubleConv(nn.Sequential):
    """Conv3x3 -> InstanceNorm -> LeakyReLU, twice, then Dropout.

    Maps (B, in_ch, H, W) to (B, out_ch, H, W). The convolutions carry no bias:
    the affine InstanceNorm right after each one would cancel it.
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
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1, bias=False),
            InstanceNorm(out_ch),
            nn.LeakyReLU(negative_slope),
            Dropout(dropout),
        )
        self.in_channels = in_ch
        self.out_channels = out_ch


class Down(nn.Sequential):
    """MaxPool2d(2) then DoubleConv: (B, in_ch, H, W) -> (B, out_ch, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int, **conv: float) -> None:
        """``conv``: ``dropout`` and ``negative_slope`` of the :class:`DoubleConv`."""
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch, **conv))
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
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        parts = [up, skip]
        if extra is not None:
            # The bridge arrives in float32 while autocast may run the decoder in bf16.
            parts.append(extra.to(up.dtype))
        first, *rest = self.conv
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
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(in_ch, num_classes),
        )
