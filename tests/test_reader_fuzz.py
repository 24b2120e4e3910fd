"""Mutation fuzzing of read_radiograph: broken files give a valid Radiograph or a ReadError, fast.

Small real files (the test DICOMs, PNG/JPEG/TIFF made in tmp_path) are mutated
deterministically with a seeded numpy RNG: bytes flipped, the file cut short, chunks
inserted or deleted, header fields (DICOM image pixel attributes, PNG IHDR, JPEG SOF)
overwritten. Nothing but ReadError may escape, no library warning may reach the caller,
and every call must finish quickly.
"""

from __future__ import annotations

import signal
import struct
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dicom
from PIL import Image
from test_readers import FAKE_MONO1, MONO2

from mmcli.errors import ReadError
from mmcli.io.readers import Radiograph, read_radiograph

# (group, element) of the attributes that say how to decode the pixels
DICOM_FIELDS = [(0x0028, e) for e in (0x0002, 0x0004, 0x0008, 0x0010, 0x0011, 0x0100, 0x0101, 0x0103, 0x1052, 0x1053)]
DICOM_FIELDS += [(0x7FE0, 0x0010), (0x0002, 0x0010)]  # pixel data, transfer syntax
SLOW_CALL_S = 5.0


def seeds(folder: Path) -> list[Path]:
    """A few small, valid inputs of every kind the reader handles."""
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (24, 20), dtype=np.uint16)
    Image.fromarray(grey8).save(folder / "grey8.png")
    Image.fromarray(grey16).save(folder / "grey16.png")
    Image.fromarray(np.stack([grey8] * 3, axis=-1)).save(folder / "rgb.jpg", quality=80)
    Image.fromarray(grey16).save(folder / "grey16.tif")
    Image.fromarray(grey8.astype(np.float32) / 7).save(folder / "float.tiff")
    native = make_dicom(
        folder / "native.dcm", (grey16 >> 4).astype(np.uint16),
        RescaleSlope=2, RescaleIntercept=-10, WindowCenter=1000, WindowWidth=800, PixelSpacing=[0.2, 0.2],
    )  # fmt: skip
    signed = make_dicom(folder / "signed.dcm", (grey16.astype(np.int32) - 32768 >> 4).astype(np.int16))
    return [folder / n for n in ("grey8.png", "grey16.png", "rgb.jpg", "grey16.tif", "float.tiff")] + [
        native, signed, MONO2, FAKE_MONO1,
    ]  # fmt: skip


def header_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the value bytes of fields that describe the image."""
    fields = []
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        fields += [(16, 4), (20, 4), (24, 1), (25, 1), (26, 1), (27, 1), (28, 1)]  # IHDR
    sof = data.find(b"\xff\xc0")
    if data[:2] == b"\xff\xd8" and sof > 0:
        fields += [(sof + 5, 2), (sof + 7, 2), (sof + 9, 1), (sof + 4, 1)]  # height, width, components, bits
    for group, element in DICOM_FIELDS:
        at = data.find(struct.pack("<HH", group, element))
        if at >= 0:
            fields += [(at + 4, 4), (at + 8, 2), (at + 8, 4)]  # VR + length, and the value
    return [(o, n) for o, n in fields if o + n <= len(data)] or [(0, min(8, len(data)))]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One deterministic mutation of ``data``; the kind is chosen by ``rng``."""
    buf = bytearray(data)
    kind = int(rng.integers(6))
    if kind == 0:  # flip a few bytes anywhere
        for at in rng.integers(0, len(buf), int(rng.integers(1, 9))):
            buf[at] ^= int(rng.integers(1, 256))
    elif kind == 1:  # cut the file short
        return bytes(buf[: int(rng.integers(1, len(buf)))])
    elif kind == 2:  # insert a chunk of random bytes
        at = int(rng.integers(0, len(buf)))
        buf[at:at] = rng.bytes(int(rng.integers(1, 65)))
    elif kind == 3:  # delete a chunk
        at = int(rng.integers(0, len(buf)))
        del buf[at : at + int(rng.integers(1, 257))]
    else:  # overwrite a header field with an extreme or random value
        fields = header_fields(data)
        at, size = fields[int(rng.integers(len(fields)))]
        choice = int(rng.integers(4))
        value = [b"\x00" * size, b"\xff" * size, b"\x7f" + b"\xff" * (size - 1), rng.bytes(size)][choice]
        buf[at : at + size] = value
    return bytes(buf)


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail instead of hanging if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"fuzz loop still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_valid(img: Radiograph) -> None:
    assert isinstance(img, Radiograph)
    assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2
    assert img.pixels.shape == (img.height, img.width) and img.height > 0 and img.width > 0
    assert np.all(np.isfinite(img.pixels))
    assert img.pixels.min() >= 0.0 and img.pixels.max() <= 1.0


def fuzz(folder: Path, per_seed: int, seed: int) -> dict[str, int]:
    """Read ``per_seed`` mutants of every seed file; tally outcomes, fail on anything else."""
    rng = np.random.default_rng(seed)
    tally = {"read": 0, "refused": 0}
    for source in seeds(folder):
        data = source.read_bytes()
        for i in range(per_seed):
            mutant = folder / f"mutant{source.suffix}"
            mutant.write_bytes(mutate(data, rng))
            started = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    img = read_radiograph(mutant, voi_lut=bool(i % 2))
                except ReadError as exc:
                    assert exc.reason and str(mutant) in str(exc)
                    tally["refused"] += 1
                else:
                    check_valid(img)
                    tally["read"] += 1
            elapsed = time.perf_counter() - started
            assert caught == [], (source.name, i, [str(w.message) for w in caught])
            assert elapsed < SLOW_CALL_S, f"{source.name} mutant {i} took {elapsed:.1f} s"
    return tally


def test_mutated_files_read_or_refused(tmp_path: Path) -> None:
    with alarm(60):
        tally = fuzz(tmp_path, per_seed=60, seed=1)  # 540 mutants, a few seconds
    assert tally["refused"] > 0 and tally["read"] > 0  # the mutations both break and spare files


@pytest.mark.slow
def test_mutated_files_read_or_refused_long(tmp_path: Path) -> None:
    with alarm(1200):
        fuzz(tmp_path, per_seed=600, seed=2)
