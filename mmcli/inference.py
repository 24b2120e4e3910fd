"""The predictor: load a model once, run it on batches of preprocessed images.

:class:`Predictor` knows nothing of files; :mod:`mmcli.batch` drives it over a folder for
``predict``, ``explain`` and ``evaluate``. :meth:`Predictor.predict` gives probabilities,
mask logits and the bridge's saliency; :meth:`Predictor.explain` adds Grad-CAM from the
same forward pass (Selvaraju et al. 2017: ReLU of the bottleneck feature maps weighted by
their spatially averaged gradients of one class's logit, each weighted map taken relative to a
uniform image both with and without the padding's effect, keeping the smaller credit;
upsampled bilinearly to the model grid and divided by its maximum).

A case whose probabilities or mask logits are not finite (NaN or infinite: weights that
overflow on an unusual input, a broken device) has no answer: :meth:`BatchPrediction.failure`
says so, and the engines turn it into that case's ``error`` row, never a label.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmcli.config import PreprocessConfig
from mmcli.data.transforms import mask_to_native
from mmcli.errors import UsageError
from mmcli.models.multimix import MultiMixOutput
from mmcli.qa.ood import OODStats
from mmcli.runtime import Precision, apply_precision_policy, autocast, decoder_dtype, resolve_device, resolve_precision
from mmcli.weights import Checkpoint

logger = logging.getLogger(__name__)

__all__ = ["NONFINITE_REASON", "BatchPrediction", "Precision", "Predictor"]

_EPS = 1e-12
NONFINITE_REASON = "the model's output is not finite"


@dataclass(frozen=True)
class BatchPrediction:
    """Model outputs for one batch of B images on the model grid S x S, on the CPU in float32.

    Attributes:
        probabilities: ``(B, C)`` calibrated class probabilities, or ``None`` without a classifier.
        mask_logits: ``(B, 1, S, S)`` lung-mask logits, or ``None`` without a decoder.
        saliency: ``(B, 1, S, S)`` the bridge's saliency map, or ``None`` without a bridge.
        gradcam: ``(B, 1, S, S)`` Grad-CAM in [0, 1] (only from :meth:`Predictor.explain`).
        ood_distance: ``(B,)`` distance of each image's features from the training images'
            (see :mod:`mmcli.qa.ood`), or ``None`` when the weights carry no statistics.
        ood_threshold: the distance above which an image is out of distribution.
        native_masks: per image, its mask at native size as packed bits (``np.packbits`` of
            the row-major ``(H, W)`` mask), made on the device by :meth:`Predictor.predict`
            when it was given the native sizes; read one with :meth:`native_mask`.
    """

    probabilities: torch.Tensor | None
    mask_logits: torch.Tensor | None
    saliency: torch.Tensor | None
    gradcam: torch.Tensor | None = None
    ood_distance: torch.Tensor | None = None
    ood_threshold: float | None = None
    native_masks: list[tuple[np.ndarray, int, int]] | None = None

    def native_mask(self, k: int) -> np.ndarray | None:
        """Image ``k``'s ``(H, W)`` bool mask at native size, if the device made it (else None)."""
        if self.native_masks is None:
            return None
        bits, height, width = self.native_masks[k]
        return np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)

    def mask_at(self, k: int, height: int, width: int) -> np.ndarray:
        """Image ``k``'s ``(height, width)`` bool mask at native size: the one the device brought back
        (:meth:`native_mask`), else its ``(1, S, S)`` logits resized here."""
        native = self.native_mask(k)
        if native is not None:
            assert native.shape == (height, width), f"mask of {native.shape}, image of {(height, width)}"
            return native
        assert self.mask_logits is not None, "a mask needs a segmentation head"
        return mask_to_native(self.mask_logits[k], height, width).numpy()

    def failure(self, k: int) -> str | None:
        """Why image ``k`` has no answer (:data:`NONFINITE_REASON`: a probability or a mask logit
        is NaN or infinite), or None."""
        for t in (self.probabilities, self.mask_logits):
            if t is not None and not bool(torch.isfinite(t[k]).all()):
                return NONFINITE_REASON
        return None

    def case(self, k: int) -> BatchPrediction:
        """The outputs of image ``k`` alone, as a batch of one (small enough to send to another process)."""
        def one(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[k : k + 1].clone()

        return BatchPrediction(one(self.probabilities), one(self.mask_logits), one(self.saliency), one(self.gradcam),
                               one(self.ood_distance), self.ood_threshold,
                               None if self.native_masks is None else [self.native_masks[k]])


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def _packed_native(mask_logits: torch.Tensor, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """``mask_to_native`` on the logits' device, packed there into bits (``np.packbits`` order), then copied."""
    flat = mask_to_native(mask_logits, height, width).flatten()
    flat = F.pad(flat.to(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat * weights).sum(dim=1, dtype=torch.uint8).cpu().numpy(), height, width


class Predictor:
    """Run a checkpoint's model on preprocessed batches.

    Args:
        checkpoint: a loaded checkpoint (see :func:`mmcli.weights.load_weights`).
        device: ``auto|cpu|cuda[:N]|mps``.
        precision: ``auto|fp32|mixed|bf16`` (see :mod:`mmcli.runtime`); outputs stay float32.
    """

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: Precision = "auto") -> None:
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        apply_precision_policy(self.device, self.precision)
        self.model = checkpoint.build_model().to(self.device).eval()
        self.temperature = float(checkpoint.temperature)
        self.ood = OODStats.from_checkpoint(checkpoint.tensors, checkpoint.extra)
        # Grad-CAM's reference bottleneck per size, with and without the padding's effect
        self._references: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        logger.info("model %s on %s (%s)", checkpoint.model_name, self.device, self.precision)

    @property
    def preprocess(self) -> PreprocessConfig:
        """The checkpoint's preprocessing (image size, normalisation)."""
        return self.checkpoint.preprocess

    @property
    def has_bridge(self) -> bool:
        """Whether the model has the saliency bridge (and so can be explained)."""
        return bool(getattr(self.model, "bridge", False))

    def require_bridge(self) -> None:
        """Raises: UsageError: the model has no saliency bridge (nothing to explain)."""
        if not self.has_bridge:
            raise UsageError(f"explain needs a model with the saliency bridge; {self.checkpoint.model_name} "
                             f"({self.checkpoint.path}) has none: use weights of a multimix or umtls model")

    def _probabilities(self, cls_logits: torch.Tensor | None) -> torch.Tensor | None:
        if cls_logits is None:
            return None
        return torch.softmax(cls_logits.detach().float() / self.temperature, dim=1).cpu()

    def predict(self, images: torch.Tensor, native_sizes: Sequence[tuple[int, int]] | None = None,
                ) -> BatchPrediction:
        """Predict a batch.

        Args:
            images: ``(B, 1, S, S)`` preprocessed images (see :func:`mmcli.data.transforms.preprocess`).
            native_sizes: ``(height, width)`` of each image: the masks are then also brought back
                to native size here, on the device (:func:`mmcli.data.transforms.mask_to_native`),
                and copied back as packed bits (``native_masks``): 32 times less to copy than
                float logits at native size, and no upsampling left for the CPU.
        """
        x = images.to(self.device, non_blocking=True)
        with self._bottleneck(self.ood is not None) as captured, torch.no_grad(), autocast(self.device, self.precision):
            out = self._forward(x)
        native = None
        if native_sizes is not None and out.seg_logits is not None:
            native = [_packed_native(out.seg_logits[k].float(), h, w) for k, (h, w) in enumerate(native_sizes)]
        masks = out.seg_logits.float().cpu() if out.seg_logits is not None else None
        sal = out.saliency.float().cpu() if out.saliency is not None else None
        return BatchPrediction(self._probabilities(out.cls_logits), masks, sal, **self._ood(captured),
                               native_masks=native)

    def _forward(self, x: torch.Tensor) -> MultiMixOutput:
        return self.model(x, decoder_dtype=decoder_dtype(self.precision))

    @contextlib.contextmanager
    def _bottleneck(self, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
        """Capture the bottleneck of the forward pass (the classifier's input): ``(B, w4, S/16, S/16)``,
        still in the graph when it has one (Grad-CAM, the OOD distance). Nothing when not ``enabled``."""
        captured: list[torch.Tensor] = []
        if not enabled:
            yield captured
            return
        hook = self.model.encoder[-1].register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            yield captured
        finally:
            hook.remove()

    def _reference_bottleneck(self, size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Bottleneck of a uniform image of 0 (the padding's value) of ``size``, float32: ``(1, w4, S/16, S/16)``,
        and ``(1, w4, 1, 1)``, its value at the centre, where the padding has no effect (on a large enough grid)."""
        key = tuple(size)
        if key not in self._references:
            blank = torch.zeros(1, self.model.in_chans, *key, device=self.device)
            with torch.no_grad(), autocast(self.device, self.precision):
                reference = self.model.encode(blank).bottleneck.float()
            h, w = reference.shape[-2:]
            self._references[key] = reference, reference[..., h // 2 : h // 2 + 1, w // 2 : w // 2 + 1]
        return self._references[key]

    def _ood(self, captured: list[torch.Tensor]) -> dict[str, Any]:
        if self.ood is None or not captured:
            return {}
        features = captured[-1].detach().float().mean(dim=(2, 3))
        return {"ood_distance": self.ood.distance(features), "ood_threshold": self.ood.threshold}

    def explain(self, images: torch.Tensor, target: int | None = None) -> BatchPrediction:
        """Predict a batch and add Grad-CAM on the last encoder stage, from one forward pass.

        The saliency is the forward pass's own bridge map, the exact tensor the decoder
        receives. Grad-CAM is taken for class ``target`` (an index into the class names),
        or for the predicted class (the largest logit, as the bridge) when it is None.

        Each feature map, weighted by its gradient, is credited with what it adds over a
        uniform image of the padding's value (:meth:`_reference_bottleneck`) twice: over that
        image's map at the same position (with what the zero padding makes near the edges)
        and over its value at the centre (without); the smaller credit counts. Near the edges
        the padding then neither adds credit (bright bands for a class whose weights favour
        the padding's features) nor lends it (bands for the other class, where the film's
        features fall below the padded reference); away from the edges both are the same.
        A uniform image gets an all-zero map.

        Raises:
            UsageError: the model has no saliency bridge.
        """
        self.require_bridge()
        x = images.to(self.device, non_blocking=True)
        with self._bottleneck() as captured, torch.enable_grad(), autocast(self.device, self.precision):
            logits, seg_logits, saliency = self._forward(x)
            if logits is None or seg_logits is None or saliency is None:  # require_bridge rules this out
                raise UsageError(f"{self.checkpoint.model_name}: the model gave no saliency to explain")
            features = captured[-1]
            chosen = logits.max(dim=1).values if target is None else logits[:, target]
            (grad,) = torch.autograd.grad(chosen.sum(), features)
        ood = self._ood(captured)
        weights, features = grad.float().mean(dim=(2, 3), keepdim=True), features.detach().float()
        padded, centre = self._reference_bottleneck(x.shape[-2:])
        credit = torch.minimum(weights * (features - padded), weights * (features - centre))
        cam = F.relu(credit.sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(_EPS)
        return BatchPrediction(
            self._probabilities(logits), seg_logits.detach().float().cpu(),
            saliency.float().cpu(), cam.cpu(), **ood,
        )
