"""What every reader returns, and the limits every reader applies: the decoded radiograph,
the pixel budget checked from a header, and row-block arithmetic that bounds memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcli.config import DEFAULT_MAX_PIXELS
from mmcli.errors import ReadError

__all__ = ["DEFAULT_MAX_PIXELS", "NOT_AN_IMAGE", "NO_MEMORY", "ImageFacts", "Radiograph", "check_budget", "chunked"]

NO_MEMORY = "not enough memory to decode the image"
NOT_AN_IMAGE = "not an image or DICOM file (cannot identify image format)"
_CHUNK_PIXELS = 1 << 21  # float64 intermediates are made a block of rows this big at a time


@dataclass(frozen=True)
class ImageFacts:
    """What a case's result needs to know of its image, beside its pixels.

    Attributes:
        height, width: the native size (what a lung mask is written at).
        pixel_spacing: (row, col) in mm, or None (no DICOM, or no spacing in it).
        format: the reader's format name (``dicom``, ``png``, ``jpeg``, ..., ``array`` for the API).
        image_flags: the image's quality-control flags (:func:`mmcli.qa.image.image_flags`), if computed.
    """

    height: int
    width: int
    pixel_spacing: tuple[float, float] | None = None
    format: str = "array"
    image_flags: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One decoded radiograph.

    ``pixels`` is float32 of shape ``(H, W)`` with values in [0, 1], 1 = bright
    (MONOCHROME2 convention: MONOCHROME1 files are already inverted). ``bits`` is
    the source bit depth (BitsStored for DICOM). ``pixel_spacing`` is (row, col)
    in mm, DICOM only, taken from ``spacing_source``. ``warnings`` holds the
    warnings pydicom or Pillow gave while reading (``"Category: message"``), which
    are also logged at DEBUG. ``eq=False`` because array equality has no single
    truth value; compare ``pixels`` explicitly.

    ``height`` and ``width`` are always the NATIVE size declared by the file (what a
    lung mask must be written at). ``scale`` is 1 when ``pixels`` is that native grid;
    a JPEG read with ``min_side`` may instead be decoded at 1/2, 1/4 or 1/8 scale by
    the codec (DCT scaling), and then ``pixels`` is ``(ceil(height / scale),
    ceil(width / scale))`` and ``reduced`` is true. Use ``pixels.shape`` for the decoded
    grid and ``height``/``width`` for the native one.
    """

    pixels: np.ndarray
    height: int
    width: int
    format: str
    bits: int
    pixel_spacing: tuple[float, float] | None = None
    spacing_source: str | None = None
    photometric: str | None = None
    warnings: tuple[str, ...] = ()
    scale: int = 1
    colour: bool = False  # the file held colour (chroma), folded to grey here: a photograph, not a film

    @property
    def reduced(self) -> bool:
        """Whether ``pixels`` was decoded below the native size (``scale > 1``)."""
        return self.scale > 1


def check_budget(path: Path, width: int, height: int, limit: int | None, frames: int = 1, samples: int = 1) -> None:
    """Raise ReadError if the declared image has more pixels than ``limit`` (None: no limit)."""
    if limit is None or width * height * frames * samples <= limit:
        return
    extra = (f" x {frames} frames" if frames > 1 else "") + (f" x {samples} samples" if samples > 1 else "")
    mp = f"{limit / 1e6:.6f}".rstrip("0").rstrip(".")
    raise ReadError(path, f"image of {width} x {height} pixels{extra} exceeds the {mp} MP limit")


def chunked(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exactly ``fn(arr).astype(float32)`` for elementwise ``fn``, ``(H, W)``, a block of rows
    at a time, so float64 intermediates of ``fn`` stay a few MB whatever the image size."""
    out = np.empty(arr.shape, dtype=np.float32)
    step = max(1, _CHUNK_PIXELS // max(1, arr.shape[-1]))
    for start in range(0, arr.shape[0], step):
        out[start : start + step] = fn(arr[start : start + step])
    return out
