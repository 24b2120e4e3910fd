"""Read one radiograph file (PNG, JPEG, TIFF, DICOM, ...) into grey pixels in [0, 1].

Every image mmcli sees goes through :func:`read_radiograph`, which returns the
pixels with 1 = bright (bone white, the MONOCHROME2 convention) plus the little
metadata later stages need. DICOM is recognised by its header, never by its suffix.
No patient identifiers ever leave this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import mmap
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from mmcli.errors import ReadError, UsageError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_GREY_DICOM = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), little / big endian
_DEFER_SIZE = "1 MB"  # larger DICOM values are read when used: none over the pixel budget
_CHUNK_PIXELS = 1 << 21  # float64 intermediates are made a block of rows this big at a time

DEFAULT_MAX_PIXELS = 60_000_000
"""Largest image (width x height x frames) :func:`read_radiograph` decodes by default."""
_NO_MEMORY = "not enough memory to decode the image"
_NOT_AN_IMAGE = "not an image or DICOM file (cannot identify image format)"


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


def read_radiograph(
    path: str | os.PathLike[str], *, voi_lut: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Radiograph:
    """Read one single-frame grey radiograph.

    Args:
        path: image file; DICOM is detected by its header, anything else goes to Pillow.
        voi_lut: for DICOM, apply the file's VOI LUT or first window (if any) and
            scale its output range to [0, 1]; otherwise scale by the stored bit range.
        max_pixels: refuse, from the header and before decoding, images of more pixels
            (width x height x frames x samples). It stands in for Pillow's own bomb limit
            during the call; None: no limit of ours, ``PIL.Image.MAX_IMAGE_PIXELS`` applies.

    Returns:
        A :class:`Radiograph` with float32 ``(H, W)`` pixels in [0, 1]. Library warnings
        are logged at DEBUG and kept in ``Radiograph.warnings``, never shown raw.

    Raises:
        ReadError: the only error a file can cause (missing, empty, over ``max_pixels``,
            truncated or corrupt, not an image, multi-frame or colour...); the reason says which.
        UsageError: ``max_pixels`` is not a positive integer or None.
    """
    if max_pixels is not None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
            raise UsageError(f"max_pixels must be a positive integer or None, not {max_pixels!r}")
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:  # filter local to the block; logged below
        warnings.simplefilter("always")
        try:
            rad = _read(path, voi_lut=voi_lut, max_pixels=max_pixels)
        except ReadError:
            raise
        except MemoryError:
            raise ReadError(path, _NO_MEMORY) from None
        except RecursionError:
            raise ReadError(path, "file structure nested too deeply to parse") from None
        except Exception as exc:  # last line of defence: a library failed in a way not foreseen below
            raise ReadError(path, f"cannot read file ({type(exc).__name__}: {exc})") from None
        finally:
            notes = tuple(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
            for note in notes:
                log.debug("%s: %s", path, note)
    return dataclasses.replace(rad, warnings=notes) if notes else rad


def _read(path: Path, *, voi_lut: bool, max_pixels: int | None) -> Radiograph:
    _check_file(path)
    if is_dicom(path):
        return _read_dicom(path, voi_lut=voi_lut, force=False, max_pixels=max_pixels)
    try:
        return _read_pillow(path, max_pixels)
    except _NotAnImage:
        if path.suffix.lower() in _DICOM_SUFFIXES:
            # Some writers omit the 128-byte preamble; accept those only with pixel data.
            return _read_dicom(path, voi_lut=voi_lut, force=True, max_pixels=max_pixels)
        raise ReadError(path, _NOT_AN_IMAGE) from None


def _check_budget(path: Path, width: int, height: int, limit: int | None, frames: int = 1, samples: int = 1) -> None:
    """Raise ReadError if the declared image has more pixels than ``limit`` (None: no limit)."""
    if limit is None or width * height * frames * samples <= limit:
        return
    extra = (f" x {frames} frames" if frames > 1 else "") + (f" x {samples} samples" if samples > 1 else "")
    mp = f"{limit / 1e6:.6f}".rstrip("0").rstrip(".")
    raise ReadError(path, f"image of {width} x {height} pixels{extra} exceeds the {mp} MP limit")


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


_LIFT: dict = {"lock": threading.Lock(), "depth": 0, "saved": None}


@contextlib.contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """Pillow's bomb check off: ``Image.open`` applies it before we see the size, and below our
    budget for a large one. Counted, so overlapping threads restore the value they found."""
    with _LIFT["lock"]:
        if _LIFT["depth"] == 0:
            _LIFT["saved"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _LIFT["depth"] += 1
    try:
        yield
    finally:
        with _LIFT["lock"]:
            _LIFT["depth"] -= 1
            if _LIFT["depth"] == 0:
                Image.MAX_IMAGE_PIXELS = _LIFT["saved"]


def _read_pillow(path: Path, max_pixels: int | None) -> Radiograph:
    """Decode a non-DICOM image with Pillow (no EXIF rotation) and fold it to grey."""
    with contextlib.nullcontext() if max_pixels is None else _pillow_limit_lifted():
        try:
            img = Image.open(path)  # lazy: reads the header only
        except UnidentifiedImageError:
            raise _NotAnImage from None
        except Image.DecompressionBombError as exc:
            raise ReadError(path, f"image too large to decode safely: {exc}") from None
        except Exception as exc:  # Pillow's header parsers raise many types on broken files
            raise ReadError(path, f"cannot open image: {exc}") from None
        with img:
            return _decode_pillow(img, path, max_pixels)


def _decode_pillow(img: Image.Image, path: Path, max_pixels: int | None) -> Radiograph:
    fmt = (img.format or "unknown").lower()
    width, height = img.size
    _check_budget(path, width, height, max_pixels)
    try:
        n_frames = int(getattr(img, "n_frames", 1))
        _check_budget(path, width, height, max_pixels, n_frames)
        if n_frames > 1:
            raise ReadError(path, f"multi-frame images are not supported ({n_frames} frames)")
        img.load()  # decode now, so truncated files fail here
    except (ReadError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise ReadError(path, f"image too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow's decoders raise many types on broken data
        raise ReadError(path, f"truncated or corrupt image data: {exc}") from None
    try:
        grey, bits = _pil_to_grey(img, path)
    except (ReadError, MemoryError):
        raise
    except Exception as exc:
        raise ReadError(path, f"cannot convert {img.mode!r} image to grey: {exc}") from None
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
        arr = np.asarray(img)
        if bits is not None and bits <= 16:
            top = 2**bits - 1  # clip(x / top, 0, 1) == clip(x, 0, top) / top: a table lookup
            table = (np.arange(top + 1) / float(top)).astype(np.float32)
            return _chunked(arr, lambda rows: table[np.clip(rows, 0, top)]), bits
        return _min_max(arr, path), bits or 32
    if mode == "F":
        return _min_max(np.asarray(img), path), 32
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        grey = Image.alpha_composite(black, rgba).convert("L")
        return _SCALE_8[np.asarray(grey)], 8
    grey = img.convert("L") if mode == "RGB" else img.convert("RGB").convert("L")  # caller reports failures
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
    lo, hi = float(arr.min()), float(arr.max())  # NaN propagates through min and max
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ReadError(path, "image contains NaN or infinite values")
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return _chunked(arr, lambda rows: (rows.astype(np.float64) - lo) / (hi - lo))


def _chunked(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exactly ``fn(arr).astype(float32)`` for elementwise ``fn``, ``(H, W)``, a block of rows
    at a time, so float64 intermediates of ``fn`` stay a few MB whatever the image size."""
    out = np.empty(arr.shape, dtype=np.float32)
    step = max(1, _CHUNK_PIXELS // max(1, arr.shape[-1]))
    for start in range(0, arr.shape[0], step):
        out[start : start + step] = fn(arr[start : start + step])
    return out


def _read_dicom(path: Path, *, voi_lut: bool, force: bool, max_pixels: int | None) -> Radiograph:
    """Decode a single-frame grey DICOM: modality LUT, optional VOI, then MONOCHROME1 inversion."""
    try:
        ds = pydicom.dcmread(path, force=force, defer_size=_DEFER_SIZE)
    except Exception as exc:  # pydicom raises many types on malformed headers
        reason = _NOT_AN_IMAGE if force else f"cannot parse DICOM header: {exc}"
        raise ReadError(path, reason) from None
    if "PixelData" not in ds:
        if force:
            raise ReadError(path, _NOT_AN_IMAGE)
        # pydicom drops an element the file ends inside, so a cut-off file looks empty
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cut = any(data.find(tag) >= 0 for tag in _PIXEL_DATA_TAGS)
        raise ReadError(path, _pixel_error(ds, None) if cut else "DICOM file has no pixel data")
    try:
        rows, cols, bits, photometric = _check_dicom_header(ds, path, max_pixels)
    except (ReadError, MemoryError):
        raise
    except Exception as exc:  # element values are parsed lazily, on first access
        raise ReadError(path, f"cannot parse DICOM header: {exc}") from None
    try:
        raw = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, corrupt or short pixel data, ...
        raise ReadError(path, _pixel_error(ds, exc)) from None
    if raw.shape != (rows, cols) or raw.dtype.kind not in "iu":
        raise ReadError(path, f"unexpected DICOM pixel array {raw.dtype} {raw.shape}, expected ({rows}, {cols})")
    bits = min(bits, raw.dtype.itemsize * 8)
    try:
        lo, hi = _modality_range(ds, bits, signed=raw.dtype.kind == "i")
        pixels = _pointwise(raw, _dicom_scale(ds, lo, hi, voi_lut, path))
    except MemoryError:
        raise
    except Exception as exc:
        raise ReadError(path, f"invalid modality LUT / rescale: {exc}") from None
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
    _check_budget(path, cols, rows, max_pixels, max(n_frames, 1), max(samples, 1))
    if n_frames > 1:
        raise ReadError(path, f"multi-frame DICOM ({n_frames} frames) is not supported")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric.startswith(("RGB", "YBR", "PALETTE", "ARGB", "CMYK", "HSV")):
        kind = photometric or f"{samples} samples per pixel"
        raise ReadError(path, f"colour DICOM ({kind}) is not supported: expected a grey radiograph")
    if photometric not in _GREY_DICOM:
        shown = repr(photometric) if photometric else "(missing)"
        raise ReadError(path, f"unsupported photometric interpretation {shown}: expected MONOCHROME1 or MONOCHROME2")
    allocated = _as_int(ds.get("BitsAllocated"), default=0)
    bits = _as_int(ds.get("BitsStored"), default=allocated)
    if not 1 <= bits <= max(allocated, 1):
        raise ReadError(path, f"invalid Bits Stored ({bits}) for {allocated}-bit pixel data")
    return rows, cols, bits, photometric


def _pixel_error(ds: pydicom.Dataset, exc: Exception | None) -> str:
    """Why ``ds.pixel_array`` failed (``exc``) or pixel data is missing (None)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(syntax, "name", None) or "unknown transfer syntax"
    if exc is None:
        return f"truncated or corrupt DICOM pixel data ({name}): the element is cut short or unreadable"
    if isinstance(exc, MemoryError):
        return _NO_MEMORY
    detail = " ".join(str(exc).split())  # pydicom lists each plugin's failure on its own line
    if isinstance(exc, NotImplementedError) or "missing dependencies" in detail:
        return f"cannot decode DICOM pixel data ({name}): no decoder available: {detail}"
    return f"truncated or corrupt DICOM pixel data ({name}): {detail}"


def _pointwise(raw: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exactly ``fn(raw).astype(float32)`` for an elementwise ``fn``, with no float64 image.

    8/16-bit ``raw``: ``fn`` maps every value the container holds (by bit pattern) and the
    pixels look the table up; wider data goes through ``fn`` a block of rows at a time.
    """
    if raw.dtype.itemsize > 2:
        return _chunked(raw, fn)
    raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
    unsigned = np.dtype(f"u{raw.dtype.itemsize}")
    domain = np.arange(2 ** (8 * raw.dtype.itemsize), dtype=unsigned).view(raw.dtype)
    table = np.asarray(fn(domain), dtype=np.float32)
    return table[raw.view(unsigned)]


def _dicom_scale(ds: pydicom.Dataset, lo: float, hi: float, voi_lut: bool, path: Path) -> Callable[..., np.ndarray]:
    """Elementwise stored value -> [0, 1]: modality LUT, then VOI or the modality range."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"the modality transform gives non-finite values ({lo} .. {hi})")
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
                raise ValueError("window output range is empty")
            return _finite((apply_windowing(values, ds, index=0) - y_min) / (y_max - y_min))
    except MemoryError:
        raise
    except Exception as exc:  # bad width, unknown VOI function, odd LUT depth, ...
        log.warning("ignoring unusable VOI LUT / window in %s: %s", path, exc)
    return None


def _finite(values: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ValueError("the transform gives NaN or infinite values")
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


def _as_int(value: object, *, default: int) -> int:
    """An integer DICOM attribute value (IS/US may arrive as str or float), or ``default``."""
    try:
        return int(float(value)) if value not in (None, "") else default  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return default
