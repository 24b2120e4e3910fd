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
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmcli.errors import ReadError, UsageError
from mmcli.io.dicom import read_dicom
from mmcli.io.image import DEFAULT_MAX_PIXELS, NO_MEMORY, NOT_AN_IMAGE, Radiograph, check_budget, chunked

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")  # a quoted value in a library's warning
log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
_DICOM_SUFFIXES = (".dcm", ".dicom")



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
    path: str | os.PathLike[str], *, voi_lut: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> Radiograph:
    """Read one single-frame grey radiograph.

    Args:
        path: image file; DICOM is detected by its header, anything else goes to Pillow.
        voi_lut: for DICOM, apply the file's VOI LUT or first window (if any) and
            scale its output range to [0, 1]; otherwise scale by the stored bit range.
        max_pixels: refuse, from the header and before decoding, images of more pixels
            (width x height x frames x samples). It stands in for Pillow's own bomb limit
            during the call; None: no limit of ours, ``PIL.Image.MAX_IMAGE_PIXELS`` applies.
            Always checked against the native size, also when ``min_side`` reduces the decode.
        min_side: for a (non-DICOM) JPEG, let the codec decode at 1/2, 1/4 or 1/8 scale
            (``Image.draft``), the largest that keeps the decoded shorter side >= ``min_side``;
            nearly free, and all a model of input size S needs is about ``2 * S``. Other
            formats, and JPEGs too small to shrink, are decoded at native size as with None.

    Returns:
        A :class:`Radiograph` with float32 pixels in [0, 1], ``(H, W)`` native unless
        ``Radiograph.reduced`` (``height``/``width`` are native in every case). Library
        warnings are logged at DEBUG and kept in ``Radiograph.warnings``, never shown raw.

    Raises:
        ReadError: the only error a file can cause (missing, empty, over ``max_pixels``,
            truncated or corrupt, not an image, multi-frame or colour...); the reason says which.
        UsageError: ``max_pixels`` or ``min_side`` is not a positive integer or None.
    """
    for name, value in (("max_pixels", max_pixels), ("min_side", min_side)):
        if value is not None and not _positive_int(value):
            raise UsageError(f"{name} must be a positive integer or None, not {value!r}")
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:  # filter local to the block; logged below
        warnings.simplefilter("always")
        try:
            rad = _read(path, voi_lut=voi_lut, max_pixels=max_pixels, min_side=min_side)
        except ReadError:
            raise
        except MemoryError:
            raise ReadError(path, NO_MEMORY) from None
        except RecursionError:
            raise ReadError(path, "file structure nested too deeply to parse") from None
        except Exception as exc:  # last line of defence: a library failed in a way not foreseen below
            # by its type alone: a library's text may quote a header value
            raise ReadError(path, f"cannot read file ({type(exc).__name__})") from None
        finally:
            notes = tuple(dict.fromkeys(f"{w.category.__name__}: {_unquoted(str(w.message))}" for w in caught))
            for note in notes:
                log.debug("%s: %s", path, note)
    return dataclasses.replace(rad, warnings=notes) if notes else rad


def _unquoted(message: str) -> str:
    """A library warning without the values it quotes (pydicom quotes the header value it
    found invalid, which may be a name or another identifier)."""
    return _QUOTED.sub("'...'", message)


def _positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and bool(value >= 1)


def _read(path: Path, *, voi_lut: bool, max_pixels: int | None, min_side: int | None) -> Radiograph:
    _check_file(path)
    if is_dicom(path):
        return read_dicom(path, voi_lut=voi_lut, force=False, max_pixels=max_pixels)
    try:
        return _read_pillow(path, max_pixels, min_side)
    except _NotAnImage:
        if path.suffix.lower() in _DICOM_SUFFIXES:
            # Some writers omit the 128-byte preamble; accept those only with pixel data.
            return read_dicom(path, voi_lut=voi_lut, force=True, max_pixels=max_pixels)
        raise ReadError(path, NOT_AN_IMAGE) from None


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


def _read_pillow(path: Path, max_pixels: int | None, min_side: int | None) -> Radiograph:
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
            return _decode_pillow(img, path, max_pixels, min_side)


def _draft(img: Image.Image, min_side: int | None) -> int:
    """Ask the JPEG codec for a reduced decode whose shorter side stays >= ``min_side``.

    Pillow's ``draft`` picks the largest DCT scale 1/s (s in 8, 4, 2, 1) with
    s <= min(W // w, H // h), so asking for (min_side, min_side) keeps both decoded sides
    >= min_side. The mode is left as it is: grey comes from the same conversion as a full
    decode. Returns s (1: native decode).
    """
    if min_side is None or img.format != "JPEG":
        return 1
    width, _ = img.size
    result = img.draft(img.mode, (int(min_side), int(min_side)))
    return 1 if result is None else max(1, round(width / result[1][2]))


def _decode_pillow(img: Image.Image, path: Path, max_pixels: int | None, min_side: int | None) -> Radiograph:
    fmt = (img.format or "unknown").lower()
    width, height = img.size
    check_budget(path, width, height, max_pixels)
    try:
        n_frames = int(getattr(img, "n_frames", 1))
        check_budget(path, width, height, max_pixels, n_frames)
        if n_frames > 1:
            raise ReadError(path, f"multi-frame images are not supported ({n_frames} frames)")
        scale = _draft(img, min_side)  # after the budget: that counts native pixels
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
    colour = _has_chroma(img)
    log.debug("read %s image %dx%d (%d bits) decoded at 1/%d", fmt, width, height, bits, scale)
    if scale == 1:
        return Radiograph(pixels, pixels.shape[0], pixels.shape[1], fmt, bits, colour=colour)
    return Radiograph(pixels, height, width, fmt, bits, scale=scale, colour=colour)  # native size, from the header


CHROMA_LIMIT = 8 / 255
"""Mean spread between the R, G and B of a pixel above which an image holds colour. Grey
films saved as RGB JPEG differ by chroma noise of 1-2 levels; a photograph by tens."""


def _has_chroma(img: Image.Image) -> bool:
    """Whether a colour-mode image holds real colour (judged on a small copy: cheap)."""
    if img.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return False
    small = img.convert("RGB")
    small.thumbnail((128, 128))
    rgb = np.asarray(small, dtype=np.float32) / 255.0
    return bool((rgb.max(axis=2) - rgb.min(axis=2)).mean() > CHROMA_LIMIT)


def _unit(values: np.ndarray, top: int) -> np.ndarray:
    """Integers in [0, top] (top < 2**24) as float32 ``values / top``.

    One float32 division: the same values as dividing in float64 and rounding to float32
    (double rounding is harmless for division from 53 to 24 bits; tested for every value of
    every depth up to 16 bits), three times faster than a lookup table on a 4-megapixel image.
    """
    return np.divide(values, np.float32(top), dtype=np.float32)


def _pil_to_grey(img: Image.Image, path: Path) -> tuple[np.ndarray, int]:
    """Fold a loaded Pillow image to float grey ``(H, W)`` in [0, 1] plus its bit depth."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32), 1
    if mode == "L":
        return _unit(np.asarray(img), 255), 8
    if mode.startswith("I;16"):
        return _unit(np.asarray(img).astype(np.uint16, copy=False), 65535), 16
    if mode == "I":
        bits = _declared_bits(img)
        arr = np.asarray(img)
        if bits is not None and bits <= 16:
            top = 2**bits - 1  # clip(x / top, 0, 1) == clip(x, 0, top) / top
            return chunked(arr, lambda rows: _unit(np.clip(rows, 0, top), top)), bits
        return _min_max(arr, path), bits or 32
    if mode == "F":
        return _min_max(np.asarray(img), path), 32
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        grey = Image.alpha_composite(black, rgba).convert("L")
        return _unit(np.asarray(grey), 255), 8
    grey = img.convert("L") if mode == "RGB" else img.convert("RGB").convert("L")  # caller reports failures
    return _unit(np.asarray(grey), 255), 8


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
    return chunked(arr, lambda rows: (rows.astype(np.float64) - lo) / (hi - lo))
