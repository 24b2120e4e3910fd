"""MultiMix: a U-Net with a classification head and a saliency bridge between them.

The diagram (default widths, input 1 x 256 x 256)::

    x ─ encode ─┬─ skips 16@256, 32@128, 64@64, 128@32 ───────────────┐
                └─ bottleneck 256@16 ─ classify ─ cls_logits        │
                                          │                         │
                       saliency |d max logit / d x| (detached)      │
                                          │                         │
              bridge_input: [x, saliency] downsampled to 32 x 32    │
                                          │                         │
    bottleneck ─ decode (first stage also takes the bridge) ────────┴─ seg_logits

The saliency is computed with ``torch.autograd.grad`` on the same encoder pass that
produces the features, so the bridge costs one partial backward to the input and no
second encoder pass; the model never sees an optimizer and respects ``model.eval()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcli.models.blocks import ClassifierHead, DoubleConv, Down, Up

__all__ = ["EncoderFeatures", "MultiMix", "MultiMixOutput"]

SALIENCY_NORMS = ("max", "none")
MAX_WIDTH = 1024
"""Most channels a stage may have (the paper's widest is 256): a checkpoint cannot ask for more."""
MAX_IN_CHANS = 4
_NUM_STAGES = 5
_DIVISOR = 2 ** (_NUM_STAGES - 1)
# Floor of the per-image maximum in "max" normalisation: an all-zero saliency
# (e.g. a dead classifier) stays zero instead of becoming NaN.
_EPS = 1e-12


class EncoderFeatures(NamedTuple):
    """Encoder outputs for an input (B, C, H, W) and widths w0..w4.

    skips: (B, w0, H, W), (B, w1, H/2, W/2), (B, w2, H/4, W/4), (B, w3, H/8, W/8).
    bottleneck: (B, w4, H/16, W/16).
    """

    skips: tuple[Tensor, ...]
    bottleneck: Tensor

    def detach(self) -> EncoderFeatures:
        """The same features cut from the autograd graph."""
        return EncoderFeatures(tuple(s.detach() for s in self.skips), self.bottleneck.detach())


class MultiMixOutput(NamedTuple):
    """What ``MultiMix.forward`` returns; a field is None when its head or bridge is absent.

    cls_logits: (B, num_classes). seg_logits: (B, 1, H, W) mask logits (sigmoid gives
    the lung probability). saliency: (B, 1, H, W), detached, in [0, 1] with "max" norm.
    """

    cls_logits: Tensor | None
    seg_logits: Tensor | None
    saliency: Tensor | None


class MultiMix(nn.Module):
    """Joint pneumonia classification and lung segmentation with a saliency bridge.

    All constructor arguments are JSON-serialisable and recorded in ``init_kwargs`` so
    a checkpoint can rebuild the model. ``seg_head=False`` gives the encoder plus
    classifier (ablation ``enc``), ``cls_head=False`` a plain U-Net (``unet``).
    ``bridge=True`` needs both heads.

    Under ``torch.no_grad()`` the bridge still works: the encoder and classifier run
    with gradients enabled just long enough to get the saliency, then the graph is
    dropped and the decoder runs without one. ``torch.inference_mode()`` cannot be
    used with the bridge, because the saliency is a gradient.
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 2,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: float = 0.25,
        negative_slope: float = 0.2,
        seg_head: bool = True,
        cls_head: bool = True,
        bridge: bool = True,
        saliency_norm: str = "max",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        _check_config(in_chans, num_classes, widths, dropout, seg_head, cls_head, bridge)
        if saliency_norm not in SALIENCY_NORMS:
            raise ValueError(f"saliency_norm must be one of {SALIENCY_NORMS}, got {saliency_norm!r}")
        self.init_kwargs: dict[str, Any] = {
            "in_chans": in_chans,
            "num_classes": num_classes,
            "widths": widths,
            "dropout": dropout,
            "negative_slope": negative_slope,
            "seg_head": seg_head,
            "cls_head": cls_head,
            "bridge": bridge,
            "saliency_norm": saliency_norm,
        }
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.seg_head = seg_head
        self.cls_head = cls_head
        self.bridge = bridge
        self.saliency_norm = saliency_norm

        opts: dict[str, float] = {"dropout": dropout, "negative_slope": negative_slope}
        self.encoder = nn.ModuleList(
            [DoubleConv(in_chans, widths[0], **opts)]
            + [Down(widths[i - 1], widths[i], **opts) for i in range(1, _NUM_STAGES)]
        )
        self.classifier = ClassifierHead(widths[-1], num_classes) if cls_head else None
        if seg_head:
            # The bridge carries the input image plus one saliency channel.
            extra = in_chans + 1 if bridge else 0
            self.decoder: nn.ModuleList | None = nn.ModuleList(
                Up(widths[i + 1], widths[i], widths[i], extra if i == 3 else 0, **opts)
                for i in reversed(range(_NUM_STAGES - 1))
            )
            self.seg_out: nn.Conv2d | None = nn.Conv2d(widths[0], 1, kernel_size=1)
        else:
            self.decoder = None
            self.seg_out = None

    def forward(self, x: Tensor, *, decoder_dtype: torch.dtype | None = None) -> MultiMixOutput:
        """(B, in_chans, H, W) with H, W divisible by 16 -> MultiMixOutput.

        ``decoder_dtype`` (e.g. ``torch.bfloat16``) runs only the segmentation decoder under
        autocast to that type: the encoder, the classifier and the saliency bridge keep the
        caller's precision, so probabilities and saliency are those of a float32 pass, and
        the mask logits come back as float32.
        """
        if not self.bridge:
            features = self.encode(x)
            cls_logits = self.classify(features.bottleneck) if self.cls_head else None
            seg_logits = self._decode(features, None, decoder_dtype) if self.seg_head else None
            return MultiMixOutput(cls_logits, seg_logits, None)
        if not torch.compiler.is_compiling():  # under torch.compile the caller's input decides (see _saliency_leaf)
            _require_autograd()
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = _saliency_leaf(x)
            features = self.encode(x_in)
            cls_logits = self.classify(features.bottleneck)
            saliency = self.saliency(x_in, cls_logits, retain_graph=keep_graph)
        if not keep_graph:
            features, cls_logits = features.detach(), cls_logits.detach()
        bridge = self.bridge_input(x, saliency, size=features.skips[-1].shape[-2:])
        seg_logits = self._decode(features, bridge, decoder_dtype)
        return MultiMixOutput(cls_logits, seg_logits, saliency)

    def _decode(self, features: EncoderFeatures, bridge: Tensor | None, dtype: torch.dtype | None) -> Tensor:
        if dtype is None:
            return self.decode(features, bridge)
        with torch.autocast(features.bottleneck.device.type, dtype=dtype):
            return self.decode(features, bridge).float()

    def encode(self, x: Tensor) -> EncoderFeatures:
        """(B, in_chans, H, W) -> skips at H, H/2, H/4, H/8 and the bottleneck at H/16."""
        self._check_input(x)
        outputs = []
        for stage in self.encoder:
            x = stage(x)
            outputs.append(x)
        return EncoderFeatures(tuple(outputs[:-1]), outputs[-1])

    def classify(self, bottleneck: Tensor) -> Tensor:
        """(B, w4, H/16, W/16) -> (B, num_classes) logits."""
        if self.classifier is None:
            raise RuntimeError("this MultiMix was built with cls_head=False: it has no classifier")
        return self.classifier(bottleneck)

    def saliency(self, x: Tensor, logits: Tensor, *, retain_graph: bool) -> Tensor:
        """Vanilla-gradient saliency |d max-class logit / d x|: (B, 1, H, W), detached.

        ``x`` (B, C, H, W) must be the tensor (requiring grad) that produced ``logits``
        (B, num_classes). Summing the per-sample maxima gives per-sample gradients
        because samples do not interact (InstanceNorm is per sample). Only the
        gradient to ``x`` is computed; parameters' ``.grad`` are left untouched.
        With C > 1 channels the map is the maximum over channels.

        With ``saliency_norm="max"`` each map is divided by its own maximum, so it lies
        in [0, 1]: the raw gradient's scale depends on the weights and drifts during
        training, while the decoder needs an input of stable scale. "none" keeps the
        raw gradient magnitudes.
        """
        target = logits.max(dim=1).values.sum()
        (grad,) = torch.autograd.grad(target, x, retain_graph=retain_graph)
        saliency = grad.detach().abs().amax(dim=1, keepdim=True)
        if self.saliency_norm == "max":
            peak = saliency.amax(dim=(2, 3), keepdim=True).clamp_min(_EPS)
            saliency = saliency / peak
        return saliency

    def bridge_input(self, x: Tensor, saliency: Tensor, size: Sequence[int]) -> Tensor:
        """[x (B, C, H, W), saliency (B, 1, H, W)] -> (B, C + 1, h, w) with (h, w) = size.

        Downsampling is bilinear with antialiasing: plain bilinear at a factor of 8
        would read 4 of every 64 pixels of a spiky saliency map.
        """
        maps = torch.cat([x, saliency.to(x.dtype)], dim=1)
        return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)

    def decode(self, features: EncoderFeatures, bridge: Tensor | None = None) -> Tensor:
        """Features (see EncoderFeatures), bridge (B, C + 1, H/8, W/8) -> (B, 1, H, W) logits."""
        if self.decoder is None or self.seg_out is None:
            raise RuntimeError("this MultiMix was built with seg_head=False: it has no decoder")
        y = features.bottleneck
        for i, (up, skip) in enumerate(zip(self.decoder, reversed(features.skips), strict=True)):
            y = up(y, skip, bridge if i == 0 else None)
        return self.seg_out(y)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % _DIVISOR or width % _DIVISOR:
            raise ValueError(f"input height and width must be divisible by {_DIVISOR}, got {height}x{width}")


def _check_config(
    in_chans: int,
    num_classes: int,
    widths: tuple[int, ...],
    dropout: float,
    seg_head: bool,
    cls_head: bool,
    bridge: bool,
) -> None:
    if len(widths) != _NUM_STAGES or not all(1 <= w <= MAX_WIDTH for w in widths):
        raise ValueError(f"widths must be {_NUM_STAGES} integers in 1..{MAX_WIDTH}, got {widths}")
    if not 1 <= in_chans <= MAX_IN_CHANS or not 1 <= num_classes <= MAX_WIDTH:
        raise ValueError(f"in_chans must be in 1..{MAX_IN_CHANS} and num_classes in 1..{MAX_WIDTH}, "
                         f"got {in_chans}, {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not (seg_head or cls_head):
        raise ValueError("at least one of seg_head and cls_head must be True")
    if bridge and not (seg_head and cls_head):
        raise ValueError("bridge=True needs both heads (seg_head=True and cls_head=True)")


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "the saliency bridge needs autograd: run MultiMix under torch.no_grad(), not torch.inference_mode()"
        )


def _saliency_leaf(x: Tensor) -> Tensor:
    """The tensor the saliency is taken against: x itself if it already requires grad,
    else a detached copy that does (weights still get gradients from the losses).

    A compiled model is best given an input that already requires grad
    (``x.detach().requires_grad_()``): ``torch.compile`` then traces the bridge, saliency
    gradient included, without a graph break.
    """
    if x.requires_grad:
        return x
    leaf = x.detach()
    if leaf.is_inference():
        # Inference tensors cannot join an autograd graph; a clone is an ordinary tensor.
        leaf = leaf.clone()
    return leaf.requires_grad_(True)
