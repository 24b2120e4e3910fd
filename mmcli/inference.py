"""The predictor: load a model once, run it on batches of preprocessed images.

:class:`Predictor` knows nothing of files; :mod:`mmcli.predict` drives it over a folder.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from mmcli.errors import UsageError
from mmcli.weights import Checkpoint

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]|mps`` into an available :class:`torch.device`.

    ``auto`` takes CUDA, then Apple MPS, then the CPU.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"Device {device!r} asked for, but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"Device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"Device {device!r} asked for, but MPS is not available here: use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"Unsupported device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix units (AMX) or AVX-512 bf16 instructions."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """``auto`` picks bf16 autocast where the hardware runs it fast, else float32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UsageError(f"Unknown precision {precision!r}: use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


@dataclass(frozen=True)
class BatchPrediction:
    """Model outputs for one batch, on the CPU in float32.

    Attributes:
        probabilities: ``(B, C)`` calibrated class probabilities, or ``None`` without a classifier.
        mask_logits: ``(B, 1, S, S)`` lung-mask logits, or ``None`` without a decoder.
        saliency: ``(B, 1, S, S)`` the bridge's saliency map, or ``None`` without a bridge.
    """

    probabilities: torch.Tensor | None
    mask_logits: torch.Tensor | None
    saliency: torch.Tensor | None


class Predictor:
    """Run a checkpoint's model on preprocessed batches.

    Args:
        checkpoint: a loaded checkpoint (see :func:`mmcli.weights.load_weights`).
        device: ``auto|cpu|cuda[:N]|mps``.
        precision: ``auto|fp32|bf16``; bf16 runs under autocast, outputs stay float32.
    """

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: Precision = "auto") -> None:
        self.checkpoint = checkpoint
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda" and self.precision == "fp32":
            # fp32 means fp32: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by
            # default, which moves probabilities in the third decimal against the CPU.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = checkpoint.build_model().to(self.device).eval()
        self.temperature = float(checkpoint.temperature)
        logger.info("model %s on %s (%s)", checkpoint.model_name, self.device, self.precision)

    @property
    def preprocess(self):  # noqa: ANN201 - PreprocessConfig, re-exported for convenience
        return self.checkpoint.preprocess

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def predict(self, images: torch.Tensor) -> BatchPrediction:
        """Predict a batch.

        Args:
            images: ``(B, 1, S, S)`` preprocessed images (see :func:`mmcli.data.transforms.preprocess`).
        """
        x = images.to(self.device, non_blocking=True)
        with torch.no_grad(), self._autocast():
            out = self.model(x)
        probs = None
        if out.cls_logits is not None:
            probs = torch.softmax(out.cls_logits.float() / self.temperature, dim=1).cpu()
        masks = out.seg_logits.float().cpu() if out.seg_logits is not None else None
        sal = out.saliency.float().cpu() if out.saliency is not None else None
        return BatchPrediction(probabilities=probs, mask_logits=masks, saliency=sal)
