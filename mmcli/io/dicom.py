"""Decode single-frame grey DICOM radiographs: header checks and pixel budget, modality LUT,
optional VOI LUT or window, scaling by the stored bit range, MONOCHROME1 inversion, spacing.

No patient identifiers ever leave this module: only pixels, sizes, bit depth and spacing.
Messages quote no header value either: a library's failure to read the header or a value is named
by its type alone (its text may quote the bytes of the value it could not parse, which
:func:`redact` cannot know), and what else a library says goes through :func:`redact`.
"""

from __future__ import annotations

import logging
import math
import mmap
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from mmcli.errors import ReadError
from mmcli.io.image import NO_MEMORY, NOT_AN_IMAGE, Radiograph, check_budget, chunked

log = logging.getLogger(__name__)

_GREY_DICOM = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little / big endian
_DEFER_SIZE = "1 MB"  # larger DICOM values are read when used: none over the pixel budget
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                      "UR", "UT"})
"""Value representations whose values are text (what :func:`redact` hides)."""
_REDACTED = "[header value]"
_SHORTEST_REDACTED = 3  # "M", "CR", "PA" say nothing about a patient, and are everywhere in messages
# Defined terms of (0028,0004): only these are quoted in a message (any other value might be anything)
_PHOTOMETRIC_TERMS = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                                "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "ARGB", "CMYK", "HSV",
                                "XYB"})


def read_dicom(path: Path, *, voi_lut: bool, force: bool, max_pixels: int | None) -> Radiograph:
    """Decode a single-frame grey DICOM: modality LUT, optional VOI, then MONOCHROME1 inversion."""
    try:
        ds = pydicom.dcmread(path, force=force, defer_size=_DEFER_SIZE)
    except Exception as exc:  # pydicom raises many types on malformed headers
        raise ReadError(path, NOT_AN_IMAGE if force else _unparsable(exc)) from None
    if "PixelData" not in ds:
        if force:
            raise ReadError(path, NOT_AN_IMAGE)
        # pydicom drops an element the file ends inside, so a cut-off file looks empty
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cut = any(data.find(tag) >= 0 for tag in _PIXEL_DATA_TAGS)
        raise ReadError(path, _pixel_error(ds, None) if cut else "DICOM file has no pixel data")
    try:
        rows, cols, bits, photometric = _check_dicom_header(ds, path, max_pixels)
    except (ReadError, MemoryError):
        raise
    except Exception as exc:  # element values are parsed lazily, on first access
        raise ReadError(path, _unparsable(exc)) from None
    try:
        raw = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, corrupt or short pixel data, ...
        raise ReadError(path, redact(_pixel_error(ds, exc), ds)) from None
    if raw.shape != (rows, cols) or raw.dtype.kind not in "iu":
        raise ReadError(path, f"unexpected DICOM pixel array {raw.dtype} {raw.shape}, expected ({rows}, {cols})")
    bits = min(bits, raw.dtype.itemsize * 8)
    try:
        lo, hi = _modality_range(ds, bits, signed=raw.dtype.kind == "i")
        pixels = _pointwise(raw, _dicom_scale(ds, lo, hi, voi_lut, path))
    except MemoryError:
        raise
    except Exception as exc:
        raise ReadError(path, f"invalid modality LUT / rescale ({_reason(exc)})") from None
    if photometric == "MONOCHROME1":
        # invert after the cast so MONOCHROME1 is exactly 1 - the MONOCHROME2 reading
        np.subtract(np.float32(1.0), pixels, out=pixels)
    spacing, source = _pixel_spacing(ds)
    log.debug("read DICOM %s %dx%d (%d bits)", photometric, cols, rows, bits)
    return Radiograph(pixels, rows, cols, "dicom", bits, spacing, source, photometric)


def _check_dicom_header(ds: pydicom.Dataset, path: Path, max_pixels: int | None) -> tuple[int, int, int, str]:
    """Rows, columns, bits stored, photometric interpretation of a grey single-frame image."""
    rows, cols = _as_int(ds.get("Rows"), default=0), _as_int(ds.get("Columns"), default=0)
    if rows < 1 or cols < 1:
        raise ReadError(path, f"DICOM header declares no valid image size (Rows {rows}, Columns {cols})")
    n_frames = _as_int(ds.get("NumberOfFrames"), default=1)
    samples = _as_int(ds.get("SamplesPerPixel"), default=1)
    check_budget(path, cols, rows, max_pixels, max(n_frames, 1), max(samples, 1))
    if n_frames > 1:
        raise ReadError(path, f"multi-frame DICOM ({n_frames} frames) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    shown = photometric if photometric in _PHOTOMETRIC_TERMS else "(not a defined term)" if photometric \
        else "(missing)"
    if samples != 1 or photometric.startswith(("RGB", "YBR", "PALETTE", "ARGB", "CMYK", "HSV")):
        kind = shown if photometric else f"{samples} samples per pixel"
        raise ReadError(path, f"colour DICOM ({kind}) is not supported: expected a grey radiograph")
    if photometric not in _GREY_DICOM:
        raise ReadError(path, f"unsupported photometric interpretation {shown}: expected MONOCHROME1 or MONOCHROME2")
    allocated = _as_int(ds.get("BitsAllocated"), default=0)
    bits = _as_int(ds.get("BitsStored"), default=allocated)
    if not 1 <= bits <= max(allocated, 1):
        raise ReadError(path, f"invalid Bits Stored ({bits}) for {allocated}-bit pixel data")
    return rows, cols, bits, photometric


class _Unusable(ValueError):
    """A reason of mmcli's own, which quotes no header value."""


def _reason(exc: Exception) -> str:
    """What a message may say of ``exc``: mmcli's own reason, else the exception's type alone."""
    return str(exc) if isinstance(exc, _Unusable) else type(exc).__name__


def _unparsable(exc: Exception) -> str:
    return f"cannot parse DICOM header ({type(exc).__name__}): malformed or unreadable element"


def _pixel_error(ds: pydicom.Dataset, exc: Exception | None) -> str:
    """Why ``ds.pixel_array`` failed (``exc``) or pixel data is missing (None)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or "unknown transfer syntax"
    if exc is None:
        return f"truncated or corrupt DICOM pixel data ({name}): the element is cut short or unreadable"
    if isinstance(exc, MemoryError):
        return NO_MEMORY
    detail = " ".join(str(exc).split())  # pydicom lists each plugin's failure on its own line
    if isinstance(exc, NotImplementedError) or "missing dependencies" in detail:
        # pydicom's list of its plugins and what each one lacks: what to install (redacted by the caller)
        return f"cannot decode DICOM pixel data ({name}): no decoder available: {detail}"
    return f"truncated or corrupt DICOM pixel data ({name}): the decoder failed ({type(exc).__name__})"


def _pointwise(raw: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exactly ``fn(raw).astype(float32)`` for an elementwise ``fn``, with no float64 image.

    8/16-bit ``raw``: ``fn`` maps every value the container holds (by bit pattern) and the
    pixels look the table up; wider data goes through ``fn`` a block of rows at a time.
    """
    if raw.dtype.itemsize > 2:
        return chunked(raw, fn)
    raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
    unsigned = np.dtype(f"u{raw.dtype.itemsize}")
    domain = np.arange(2 ** (8 * raw.dtype.itemsize), dtype=unsigned).view(raw.dtype)
    table = np.asarray(fn(domain), dtype=np.float32)
    return table[raw.view(unsigned)]


def _dicom_scale(ds: pydicom.Dataset, lo: float, hi: float, voi_lut: bool, path: Path) -> Callable[..., np.ndarray]:
    """Elementwise stored value -> [0, 1]: modality LUT, then VOI or the modality range."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise _Unusable(f"the modality transform gives non-finite values ({lo} .. {hi})")
    use_voi = [voi_lut]  # an unusable VOI is reported once, then left out

    def scale(stored: np.ndarray) -> np.ndarray:
        values = apply_modality_lut(stored, ds)
        scaled = _apply_voi(values, ds, path) if use_voi[0] else None
        use_voi[0] = scaled is not None
        if scaled is None:
            scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros(values.shape)
        return np.clip(_finite(scaled), 0.0, 1.0)

    return scale


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
            return _finite(apply_voi(values, ds, index=0) / float(2**depth - 1))
        if "WindowCenter" in ds and "WindowWidth" in ds:
            # pydicom maps values below/above the window to its output range ends
            # (y_min, y_max) for every VOI function, so the ends tell us that range.
            y_min, y_max = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
            if y_max == y_min:
                raise _Unusable("window output range is empty")
            return _finite((apply_windowing(values, ds, index=0) - y_min) / (y_max - y_min))
    except MemoryError:
        raise
    except Exception as exc:  # bad width, unknown VOI function, odd LUT depth, ...
        log.warning("ignoring unusable VOI LUT / window in %s: %s", path, _reason(exc))
    return None


def _finite(values: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise _Unusable("the transform gives NaN or infinite values")
    return values


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, col) spacing in mm from PixelSpacing, else ImagerPixelSpacing, and its source."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(key)
            if value is None:
                continue
            row, col = (float(v) for v in value)
        except Exception:  # optional metadata: any malformed value is just not a spacing
            continue
        if all(math.isfinite(v) and v > 0 for v in (row, col)):
            return (row, col), key
    return None, None


@dataclass(frozen=True)
class HeaderElement:
    """One element of a header walk (:func:`header_elements`).

    Attributes:
        ds: the dataset (the header, or an item of a sequence in it) that holds the element.
        values: its values as text (a multi-valued one in parts; empty for an empty value),
            or None where the element cannot be decoded.
    """

    ds: pydicom.Dataset
    tag: int
    vr: str
    keyword: str
    values: tuple[str, ...] | None


def header_elements(ds: pydicom.Dataset) -> list[HeaderElement]:
    """Every element of ``ds`` and of the items of its sequences (depth first) that holds text
    (a VR of :data:`TEXT_VRS`) or cannot be decoded at all (any VR; ``values`` None).

    The walk decodes each value under a local warnings filter: pydicom warns about invalid
    values, quoting them, and nothing may show them.
    """
    found: list[HeaderElement] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _walk(ds, found)
    return found


def _walk(ds: pydicom.Dataset, found: list[HeaderElement]) -> None:
    for tag in list(ds.keys()):
        vr, keyword = "", ""
        try:
            elem = ds[tag]
            vr, keyword = elem.VR, elem.keyword
            if vr == "SQ":
                for item in elem.value or ():
                    _walk(item, found)
                continue
            if vr not in TEXT_VRS:
                continue
            value = elem.value
            values = value if isinstance(value, (list, tuple, MultiValue)) else [] if value is None else [value]
            found.append(HeaderElement(ds, tag, vr, keyword, tuple(str(v) for v in values)))
        except Exception:  # noqa: BLE001 - any failure to decode: the element, without its values
            found.append(HeaderElement(ds, tag, vr, keyword, None))


def header_texts(ds: pydicom.Dataset) -> set[str]:
    """Every text value in ``ds`` (nested sequences and each part of a person name too) of 3 characters or more."""
    found: set[str] = set()
    for elem in header_elements(ds):
        values = elem.values or ()
        for value in (*values, "\\".join(values)) if len(values) > 1 else values:
            parts = [value, *value.replace("=", "^").split("^")] if "^" in value or "=" in value else [value]
            found.update(p.strip() for p in parts if len(p.strip()) >= _SHORTEST_REDACTED)
    return found


def redact(text: str, ds: pydicom.Dataset | None) -> str:
    """``text`` (e.g. a library's error message) with every header value of ``ds`` (:func:`header_texts`) hidden.

    Errors and log lines must never carry what a header holds (names, ids, dates, free text).
    """
    values = header_texts(ds) if ds is not None else set()
    if not values:
        return text
    # whole values only: a count "150" in a message is not hidden inside "41500"
    pattern = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.sub(f"(?<![A-Za-z0-9])(?:{pattern})(?![A-Za-z0-9])", _REDACTED, text)


def _as_int(value: object, *, default: int) -> int:
    """An integer DICOM attribute value (IS/US may arrive as str or float), or ``default``."""
    try:
        return int(float(value)) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return default
