"""A small Python API for notebooks and scripts: load the weights once, predict one image at a time.

    >>> import mmcli
    >>> model = mmcli.load()                      # the default weights, on the best device
    >>> result = model.predict("scans/a.png")     # a path (PNG, JPEG, DICOM) or an (H, W) array
    >>> result.p_pneumonia, result.label, result.flags, result.mask.shape

A result is the row ``mmcli predict`` writes for the same file with the same settings, made
by the same function (:func:`mmcli.outcome.case_outcome`): the same probability (rounded to 6
places, as the report holds it), label, quality-control flags, lung fractions and areas (both
lungs, and the patient's right and left lung), and lung mask at native size (the model runs
on one image here, so masks may differ from a batched run by a few boundary pixels where
``--precision`` is not fp32). A file that cannot be read raises :class:`mmcli.errors.CaseError`
naming it and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcli.config import DEFAULT_MAX_PIXELS, QA_POLICIES, ReadOptions
from mmcli.data.datasets import load_case
from mmcli.data.transforms import preprocess
from mmcli.errors import CaseError, UsageError
from mmcli.inference import Precision, Predictor
from mmcli.io.discover import InputFile
from mmcli.io.image import ImageFacts
from mmcli.outcome import case_outcome
from mmcli.qa.image import image_flags
from mmcli.status import Status
from mmcli.weights import load_weights

__all__ = ["Model", "Result", "load"]


@dataclass(frozen=True)
class Result:
    """What the model says about one image.

    Each value is the report cell of the same name, rounded as the report rounds it.

    Attributes:
        p_pneumonia: calibrated probability of pneumonia, rounded to 6 places (the label is
            decided on the unrounded value, as ``predict`` decides it).
        label: ``normal``, ``pneumonia``, or ``uncertain`` when a quality-control flag means
            the model has no grounds for a label (see the README's quality control).
        flags: the quality-control flags, empty when none fired (or with ``qa="off"``).
        mask: ``(H, W)`` bool lung mask at the image's native size.
        lung_fraction: share of the image's pixels inside the mask (6 places).
        lung_area_mm2: lung area in mm² (2 places), where the file gives its pixel spacing (DICOM), else None.
        right_lung_fraction, left_lung_fraction: the same share for the patient's right and left lung
            (:func:`mmcli.qa.mask.lung_sides`).
        right_lung_area_mm2, left_lung_area_mm2: their areas in mm², or None as ``lung_area_mm2``.
        height, width: the image's native size.
    """

    p_pneumonia: float
    label: str
    flags: tuple[str, ...]
    mask: np.ndarray
    lung_fraction: float
    lung_area_mm2: float | None
    height: int
    width: int
    right_lung_fraction: float
    left_lung_fraction: float
    right_lung_area_mm2: float | None
    left_lung_area_mm2: float | None


class Model:
    """Loaded weights, ready to predict; see :func:`load`."""

    def __init__(self, predictor: Predictor, *, threshold: float, qa: str, raw_masks: bool, voi_lut: bool,
                 max_pixels: int | None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be in [0, 1], got {threshold}")
        if qa not in QA_POLICIES:
            raise UsageError(f"qa must be one of {', '.join(QA_POLICIES)}, got {qa!r}")
        self.predictor = predictor
        self.threshold, self.qa, self.raw_masks = threshold, qa, raw_masks
        self.read = ReadOptions(voi_lut=voi_lut, max_pixels=max_pixels, image_qa=qa != "off")

    def __repr__(self) -> str:
        ckpt = self.predictor.checkpoint
        return (f"mmcli.Model({ckpt.path.name if ckpt.path else ckpt.model_name!r}, "
                f"device={self.predictor.device}, "
                f"precision={self.predictor.precision!r}, threshold={self.threshold}, qa={self.qa!r})")

    def predict(self, image: str | os.PathLike[str] | np.ndarray) -> Result:
        """Predict one image: a file (PNG, JPEG, DICOM...) or an ``(H, W)`` grey array.

        An array is taken as the reader's output: floats in [0, 1], or unsigned integers
        scaled by their type's maximum (uint8 / 255, uint16 / 65535).

        Raises:
            CaseError: the file cannot be read, or the model's output is not finite.
            UsageError: an array of another shape or range.
        """
        if isinstance(image, np.ndarray):
            pixels = _as_pixels(image)
            height, width = pixels.shape
            flags = tuple(image_flags(pixels, height=height, width=width)) if self.read.image_qa else ()
            facts = ImageFacts(height, width, None, "array", flags)
            x = preprocess(pixels, self.predictor.preprocess)
            source = "the array"
        else:
            path = Path(image).expanduser().resolve()
            case = load_case(InputFile(path, path.stem), self.predictor.preprocess, self.read)
            if case.error is not None or case.image is None or case.facts is None:
                raise CaseError(path, case.error or "not read")
            facts, x, source = case.facts, case.image, str(path)
        pred = self.predictor.predict(x[None], [(facts.height, facts.width)])
        failure = pred.failure(0)
        if failure is not None or pred.probabilities is None:
            raise CaseError(source, failure or "these weights give no probability")
        outcome = case_outcome(pred, 0, facts, threshold=self.threshold, qa=self.qa, raw_masks=self.raw_masks,
                               class_names=self.predictor.checkpoint.class_names)
        if outcome.mask is None:
            raise UsageError("these weights give no lung mask")
        if outcome.cells["status"] != Status.OK:
            raise CaseError(source, outcome.cells["error"])
        return Result(mask=outcome.mask, flags=outcome.flags, **{f: outcome.cells[f] for f in _CELLS})


_CELLS = ("p_pneumonia", "label", "lung_fraction", "lung_area_mm2", "height", "width", "right_lung_fraction",
          "left_lung_fraction", "right_lung_area_mm2", "left_lung_area_mm2")
"""The fields of :class:`Result` that are report cells of the same name."""


def _as_pixels(image: np.ndarray) -> np.ndarray:
    if image.ndim != 2:
        raise UsageError(f"an image array must be (H, W) grey, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.unsignedinteger):
        return (image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max))
    pixels = image.astype(np.float32)
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise UsageError("a float image array must hold finite values in [0, 1]")
    return pixels


def load(weights: str | os.PathLike[str] | None = None, *, device: str = "auto", precision: Precision = "auto",
         threshold: float = 0.5, qa: str = "warn", raw_masks: bool = False, voi_lut: bool = False,
         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Model:
    """Load weights (a registered name such as ``multimix-cxr-v2``, a file, or None for the
    default) with the settings ``mmcli predict`` takes as options of the same names.

    Raises:
        WeightsError: the weights cannot be found, verified or loaded.
    """
    predictor = Predictor(load_weights(weights), device=device, precision=precision)
    return Model(predictor, threshold=threshold, qa=qa, raw_masks=raw_masks, voi_lut=voi_lut, max_pixels=max_pixels)
