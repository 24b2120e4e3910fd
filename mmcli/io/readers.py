"""Read one radiograph file (PNG, JPEG, TIFF, DICOM, ...) into grey pixels in [0, 1].

Every image mmcli sees goes through :func:`read_radiograph`, which returns the
pixels with 1 = bright (bone white, the MONOCHROME2 convention) plus the little
metadata later stages need. DICOM is recognised by its header, never by its suffix.
No patient identifiers ever leave this module.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from mmcli.errors import ReadError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_GREY_DICOM = ("MONOCHROME1", "MONOCHROME2")
_NOT_AN_IMAGE = "not an image or DICOM file (cannot identify image format)"


@dataclass(frozen=True, eq=False)
class Radiograph:
    """One decoded radiograph.

    ``pixels`` is float32 of shape ``(H, W)`` with values in [0, 1], 1 = bright
    (MONOCHROME2 convention: MONOCHROME1 files are already inverted). ``bits`` is
    the source bit depth (BitsStored for DICOM). ``pixel_spacing`` is (row, col)
    in mm, DICOM only, taken from ``spacing_source``. ``eq=False`` because array
    equality has no single truth value; compare ``pixels`` explicitly.
    """

    pixels: np.ndarray
    height: int
    width: int
    format: str
    bits: int
    pixel_spacing: tuple[float, float] | None = None
    spacing_source: str | None = None
    photometric: str | None = None


class _NotAnImage(Exception):
    """Pillow could not identify the file; the caller may still try DICOM."""


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with a DICOM preamble (``b"DICM"`` at bytes 128:132).

    Unreadable or short files are simply not DICOM; the suffix is ignored.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # never open a pipe or device: the open would block or read forever
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_radiograph(path: str | os.PathLike[str], *, voi_lut: bool = False) -> Radiograph:
    """Read one single-frame grey radiograph.

    Args:
        path: image file; DICOM is detected by its header, anything else goes to Pillow.
        voi_lut: for DICOM, apply the file's VOI LUT or first window (if any) and
            scale its output range to [0, 1]; otherwise scale by the stored bit range.

    Returns:
        A :class:`Radiograph` with float32 ``(H, W)`` pixels in [0, 1].

    Raises:
        ReadError: the file is missing, unreadable, empty, corrupt, not an image,
            multi-frame or colour DICOM; the reason says which.
    """
    path = Path(path)
    _check_file(path)
    if is_dicom(path):
        return _read_dicom(path, voi_lut=voi_lut, force=False)
    try:
        return _read_pillow(path)
    except _NotAnImage:
        if path.suffix.lower() in _DICOM_SUFFIXES:
            # Some writers omit the 128-byte preamble; accept those only with pixel data.
            return _read_dicom(path, voi_lut=voi_lut, force=True)
        raise ReadError(path, _NOT_AN_IMAGE) from None


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def _check_file(path: Path) -> None:
    """Raise ReadError unless ``path`` is a non-empty regular file we may read.

    The type is checked with ``stat`` before anything is opened: opening a named pipe
    would block until someone writes to it.
    """
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ReadError(path, "is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _SPECIAL_FILES if test(info.st_mode)), "a special file")
            raise ReadError(path, f"not a regular file ({kind})")
        if info.st_size == 0:
            raise ReadError(path, "file is empty (0 bytes)")
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        reason = "broken symbolic link (its target does not exist)" if path.is_symlink() else "file not found"
        raise ReadError(path, reason) from None
    except PermissionError:
        raise ReadError(path, "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReadError(path, "symbolic link loop (the link leads back to itself)") from None
        raise ReadError(path, f"cannot open file: {exc.strerror or exc}") from None


def _read_pillow(path: Path) -> Radiograph:
    """Decode a non-DICOM image with Pillow (no EXIF rotation) and fold it to grey."""
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise _NotAnImage from None
    except Image.DecompressionBombError as exc:
        raise ReadError(path, f"image too large to decode safely: {exc}") from None
    except OSError as exc:
        raise ReadError(path, f"cannot open image: {exc}") from None
    with img:
        fmt = (img.format or "unknown").lower()
        try:
            n_frames = int(getattr(img, "n_frames", 1))
            if n_frames <= 1:
                img.load()  # decode now, so truncated files fail here
        except Image.DecompressionBombError as exc:
            raise ReadError(path, f"image too large to decode safely: {exc}") from None
        except Exception as exc:  # Pillow's decoders raise many types on broken data
            raise ReadError(path, f"truncated or corrupt image data: {exc}") from None
        if n_frames > 1:
            raise ReadError(path, f"multi-frame images are not supported ({n_frames} frames)")
        grey, bits = _pil_to_grey(img, path)
    pixels = np.ascontiguousarray(grey, dtype=np.float32)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    log.debug("read %s image %dx%d (%d bits)", fmt, pixels.shape[1], pixels.shape[0], bits)
    return Radiograph(pixels, pixels.shape[0], pixels.shape[1], fmt, bits)


# Lookup tables give the same float32 values as dividing in float64, several times faster
# on the 4-megapixel images a batch job sees.
_SCALE_8 = (np.arange(2**8) / 255.0).astype(np.float32)
_SCALE_16 = (np.arange(2**16) / 65535.0).astype(np.float32)


def _pil_to_grey(img: Image.Image, path: Path) -> tuple[np.ndarray, int]:
    """Fold a loaded Pillow image to float grey ``(H, W)`` in [0, 1] plus its bit depth."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32), 1
    if mode == "L":
        return _SCALE_8[np.asarray(img)], 8
    if mode.startswith("I;16"):
        return _SCALE_16[np.asarray(img).astype(np.uint16, copy=False)], 16
    if mode == "I":
        bits = _declared_bits(img)
        arr = np.asarray(img).astype(np.float64)
        if bits is not None and bits <= 16:
            return arr / float(2**bits - 1), bits
        return _min_max(arr, path), bits or 32
    if mode == "F":
        return _min_max(np.asarray(img).astype(np.float64), path), 32
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        grey = Image.alpha_composite(black, rgba).convert("L")
        return _SCALE_8[np.asarray(grey)], 8
    try:
        grey = img.convert("L") if mode == "RGB" else img.convert("RGB").convert("L")
    except ValueError as exc:
        raise ReadError(path, f"unsupported image mode {mode!r}: {exc}") from None
    return _SCALE_8[np.asarray(grey)], 8


def _declared_bits(img: Image.Image) -> int | None:
    """Bits per sample a 32-bit-integer ('I') Pillow image came from, if known."""
    if img.format == "PNG":
        return 16  # PNG has no deeper grey; older Pillow opened 16-bit grey PNG as 'I'
    tags = getattr(img, "tag_v2", None)
    if tags is not None:
        value = tags.get(258)  # TIFF BitsPerSample
        if isinstance(value, tuple):
            value = value[0] if value else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _min_max(arr: np.ndarray, path: Path) -> np.ndarray:
    """Scale an array with no fixed range (float or 32-bit TIFF) to [0, 1] by its min and max."""
    if not np.all(np.isfinite(arr)):
        raise ReadError(path, "image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _read_dicom(path: Path, *, voi_lut: bool, force: bool) -> Radiograph:
    """Decode a single-frame grey DICOM: modality LUT, optional VOI, then MONOCHROME1 inversion."""
    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as exc:  # pydicom raises many types on malformed headers
        reason = _NOT_AN_IMAGE if force else f"cannot parse DICOM header: {exc}"
        raise ReadError(path, reason) from None
    if "PixelData" not in ds:
        raise ReadError(path, _NOT_AN_IMAGE if force else "DICOM file has no pixel data")
    n_frames = _as_int(ds.get("NumberOfFrames"), default=1)
    if n_frames > 1:
        raise ReadError(path, f"multi-frame DICOM ({n_frames} frames) is not supported")
    samples = _as_int(ds.get("SamplesPerPixel"), default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric not in _GREY_DICOM:
        kind = photometric or f"{samples} samples per pixel"
        raise ReadError(path, f"colour DICOM ({kind}) is not supported: expected a grey radiograph")

    try:
        raw = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, corrupt or short pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        raise ReadError(path, f"cannot decode DICOM pixel data ({name}): {exc}") from None
    if raw.ndim != 2:
        raise ReadError(path, f"unexpected DICOM pixel array shape {raw.shape}, expected (H, W)")

    bits = _as_int(ds.get("BitsStored"), default=raw.dtype.itemsize * 8)
    try:
        values = apply_modality_lut(raw, ds)
        lo, hi = _modality_range(ds, bits, signed=ds.get("PixelRepresentation", 0) == 1)
    except Exception as exc:
        raise ReadError(path, f"invalid modality LUT / rescale: {exc}") from None

    scaled = _apply_voi(values, ds, path) if voi_lut else None
    if scaled is None:
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros(values.shape)
    pixels = np.ascontiguousarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)
    if photometric == "MONOCHROME1":
        # invert after the cast so MONOCHROME1 is exactly 1 - the MONOCHROME2 reading
        pixels = np.float32(1.0) - pixels
    spacing, source = _pixel_spacing(ds)
    log.debug("read DICOM %s %dx%d (%d bits)", photometric, raw.shape[1], raw.shape[0], bits)
    return Radiograph(
        pixels, pixels.shape[0], pixels.shape[1], "dicom", bits, spacing, source, photometric
    )


def _modality_range(ds: pydicom.Dataset, bits: int, *, signed: bool) -> tuple[float, float]:
    """Lowest and highest value the modality transform can output for the stored bit range.

    The stored range is [0, 2^bits - 1] (unsigned) or [-2^(bits-1), 2^(bits-1) - 1]
    (signed); its image under the file's own modality LUT or rescale is the range
    we scale to [0, 1]. Mapping every stored value also covers non-linear LUTs.
    """
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.arange(lo, hi + 1) if bits <= 16 else np.array([lo, hi])
    out = np.asarray(apply_modality_lut(stored, ds))
    return float(out.min()), float(out.max())


def _apply_voi(values: np.ndarray, ds: pydicom.Dataset, path: Path) -> np.ndarray | None:
    """Apply the first VOI LUT or window and scale its output range to [0, 1].

    Returns None when the file has no VOI (or an unusable one), so the caller
    falls back to the stored bit range.
    """
    try:
        if ds.get("VOILUTSequence"):
            if np.issubdtype(values.dtype, np.floating) and np.all(values == np.rint(values)):
                values = np.rint(values).astype(np.int64)  # LUT indices must be integers
            depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return apply_voi(values, ds, index=0) / float(2**depth - 1)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            # pydicom maps values below/above the window to its output range ends
            # (y_min, y_max) for every VOI function, so the ends tell us that range.
            y_min, y_max = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
            if y_max == y_min:
                raise ValueError("window output range is empty")
            return (apply_windowing(values, ds, index=0) - y_min) / (y_max - y_min)
    except Exception as exc:  # bad width, unknown VOI function, odd LUT depth, ...
        log.warning("ignoring unusable VOI LUT / window in %s: %s", path, exc)
    return None


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, col) spacing in mm from PixelSpacing, else ImagerPixelSpacing, and its source."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(key)
            if value is None:
                continue
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) and v > 0 for v in (row, col)):
            return (row, col), key
    return None, None


def _as_int(value: object, *, default: int) -> int:
    """An integer DICOM attribute value (IS/US may arrive as str or float), or ``default``."""
    try:
        return int(float(value)) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
