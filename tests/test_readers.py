"""Tests for mmcli.io.readers: exact pixel values for PNG/TIFF/JPEG and DICOM files."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import make_dicom, read_rows
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from mmcli.errors import ReadError, UsageError
from mmcli.io.readers import SUPPORTED_SUFFIXES, Radiograph, is_dicom, read_radiograph

DICOM_DIR = Path(__file__).parent / "data" / "dicom"
CXR = DICOM_DIR / "cxr.dcm"
J2K = DICOM_DIR / "RG1_J2KI.dcm"
MONO2 = DICOM_DIR / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = DICOM_DIR / "Fake_MONOHR1.dcm"


def f32(values: np.ndarray | list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def png(path: Path, array: np.ndarray) -> Path:
    """Save ``array`` with Pillow; the format follows the suffix, PNG for unknown ones."""
    fmt = "TIFF" if path.suffix in (".tif", ".tiff") else "PNG"
    Image.fromarray(array).save(path, format=fmt)
    return path


def assert_refused(path: Path, *words: str) -> ReadError:
    with pytest.raises(ReadError) as info:
        read_radiograph(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return info.value


# ---------------------------------------------------------------- Pillow images


def test_png_8bit_exact(tmp_path: Path) -> None:
    arr = np.array([[0, 1, 128], [254, 255, 17]], dtype=np.uint8)
    img = read_radiograph(png(tmp_path / "a.png", arr))
    assert isinstance(img, Radiograph)
    assert (img.height, img.width, img.format, img.bits) == (2, 3, "png", 8)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (2, 3)
    np.testing.assert_array_equal(img.pixels, f32(arr / 255.0))
    assert img.pixel_spacing is None and img.spacing_source is None and img.photometric is None


@pytest.mark.parametrize("suffix,fmt", [(".png", "png"), (".tif", "tiff")])
def test_16bit_exact(tmp_path: Path, suffix: str, fmt: str) -> None:
    arr = np.array([[0, 1, 65535], [1000, 30000, 40000]], dtype=np.uint16)
    img = read_radiograph(png(tmp_path / f"a{suffix}", arr))
    assert (img.format, img.bits) == (fmt, 16)
    np.testing.assert_array_equal(img.pixels, f32(arr / 65535.0))


def test_1bit(tmp_path: Path) -> None:
    img = read_radiograph(png(tmp_path / "a.png", np.array([[True, False]])))
    assert img.bits == 1
    np.testing.assert_array_equal(img.pixels, f32([[1.0, 0.0]]))


def test_rgb_to_luma(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], dtype=np.uint8)
    img = read_radiograph(png(tmp_path / "a.png", rgb))
    # ITU-R 601 luma as Pillow rounds it: 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_array_equal(img.pixels, f32(np.array([[76, 150, 29, 90]]) / 255.0))


def test_rgba_and_la_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array(
        [[[200, 200, 200, 255], [200, 200, 200, 0], [100, 100, 100, 128], [255, 0, 0, 255]]],
        dtype=np.uint8,
    )
    img = read_radiograph(png(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(img.pixels, f32(np.array([[200, 0, 50, 76]]) / 255.0))
    la = Image.new("LA", (2, 1))
    la.putdata([(200, 255), (200, 0)])
    la.save(tmp_path / "la.png")
    img = read_radiograph(tmp_path / "la.png")
    np.testing.assert_array_equal(img.pixels, f32(np.array([[200, 0]]) / 255.0))


def test_palette_image(tmp_path: Path) -> None:
    grey = np.array([[0, 60, 255]], dtype=np.uint8)
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    np.testing.assert_array_equal(read_radiograph(tmp_path / "p.png").pixels, f32(grey / 255.0))


def test_float_tiff_min_max(tmp_path: Path) -> None:
    arr = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    img = read_radiograph(png(tmp_path / "f.tiff", arr))
    assert img.format == "tiff"
    np.testing.assert_array_equal(img.pixels, f32([[0.0, 0.25], [0.5, 1.0]]))


def test_jpeg_without_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" must be ignored
    Image.new("L", (8, 4), 128).save(tmp_path / "a.jpg", exif=exif)
    img = read_radiograph(tmp_path / "a.jpg")
    assert (img.format, img.bits, img.pixels.shape) == ("jpeg", 8, (4, 8))
    np.testing.assert_allclose(img.pixels, 128 / 255.0, atol=2 / 255.0)



# ---------------------------------------------------------------- JPEG decoded at reduced scale


def smooth_jpeg(path: Path, mode: str = "L", size: tuple[int, int] = (1600, 1200)) -> Path:
    """A smooth ``size`` (W, H) radiograph-like JPEG, Pillow quality 95."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    grey = np.clip(128 + 90 * np.sin(x / 97.0) * np.cos(y / 131.0), 0, 255).astype(np.uint8)
    array = grey if mode == "L" else np.stack([grey, np.roll(grey, 5, axis=1), grey // 2 + 60], axis=-1)
    Image.fromarray(array).save(path, quality=95)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_min_side_decodes_reduced_with_native_size(tmp_path: Path, mode: str) -> None:
    path = smooth_jpeg(tmp_path / "a.jpg", mode)
    full = read_radiograph(path)
    half = read_radiograph(path, min_side=512)  # 1200 // 512 = 2: the DCT decodes at 1/2
    assert (half.height, half.width, half.format, half.bits) == (1200, 1600, "jpeg", 8)
    assert (half.scale, half.reduced, full.scale, full.reduced) == (2, True, 1, False)
    assert half.pixels.dtype == np.float32 and half.pixels.shape == (600, 800)
    # The codec's 1/2 decode is close to a 2 x 2 mean of the full decode (measured: 0.75 / 255 at most).
    box = full.pixels.reshape(600, 2, 800, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(half.pixels, box, atol=1.5 / 255, rtol=0)
    assert half.pixels.min() >= 0.0 and half.pixels.max() <= 1.0


@pytest.mark.parametrize("min_side,scale,shape", [
    (1, 8, (150, 200)), (128, 8, (150, 200)), (256, 4, (300, 400)), (600, 2, (600, 800)), (601, 1, (1200, 1600)),
])
def test_jpeg_min_side_keeps_the_shorter_side(tmp_path: Path, min_side: int, scale: int, shape: tuple) -> None:
    img = read_radiograph(smooth_jpeg(tmp_path / "a.jpg"), min_side=min_side)
    assert (img.scale, img.pixels.shape, img.height, img.width) == (scale, shape, 1200, 1600)
    assert min(img.pixels.shape) >= min(min_side, 1200)


def test_jpeg_min_side_ceils_odd_sizes(tmp_path: Path) -> None:
    img = read_radiograph(smooth_jpeg(tmp_path / "a.jpg", size=(1001, 803)), min_side=200)
    assert (img.scale, img.pixels.shape, img.height, img.width) == (4, (201, 251), 803, 1001)


def test_min_side_larger_than_the_image_is_a_full_decode(tmp_path: Path) -> None:
    path = smooth_jpeg(tmp_path / "a.jpg")
    full = read_radiograph(path)
    for min_side in (1201, 5000):
        img = read_radiograph(path, min_side=min_side)
        assert (img.scale, img.reduced, img.height, img.width) == (1, False, 1200, 1600)
        np.testing.assert_array_equal(img.pixels, full.pixels)


def test_min_side_leaves_other_formats_alone(tmp_path: Path) -> None:
    arr = (np.arange(1200 * 1600, dtype=np.uint32) % 251).astype(np.uint8).reshape(1200, 1600)
    dcm = make_dicom(tmp_path / "a.dcm", arr.astype(np.uint16))
    files = (png(tmp_path / "a.png", arr), png(tmp_path / "a.tif", arr), dcm)
    for path in files:
        plain, small = read_radiograph(path), read_radiograph(path, min_side=256)
        assert (small.scale, small.reduced, small.height, small.width) == (1, False, 1200, 1600)
        np.testing.assert_array_equal(small.pixels, plain.pixels)
    dicom = read_radiograph(MONO2, min_side=256)  # JPEG inside DICOM: not reduced (yet)
    assert (dicom.scale, dicom.pixels.shape) == (1, (1024, 1024))


def test_min_side_budget_counts_native_pixels(tmp_path: Path) -> None:
    path = smooth_jpeg(tmp_path / "a.jpg")
    with pytest.raises(ReadError, match=r"image of 1600 x 1200 pixels exceeds the 1\.919999 MP limit$"):
        read_radiograph(path, max_pixels=1600 * 1200 - 1, min_side=256)  # decoded would be 300 x 400
    assert read_radiograph(path, max_pixels=1600 * 1200, min_side=256).pixels.shape == (300, 400)
    for bad in (0, -1, 1.5, True, "512"):
        with pytest.raises(UsageError, match="min_side"):
            read_radiograph(path, min_side=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- real DICOM files


@pytest.fixture(scope="module")
def mono2() -> Radiograph:
    return read_radiograph(MONO2)


def test_dicom_jpeg_baseline_monochrome2(mono2: Radiograph) -> None:
    raw = pydicom.dcmread(MONO2).pixel_array
    assert (mono2.format, mono2.bits, mono2.photometric) == ("dicom", 8, "MONOCHROME2")
    assert (mono2.height, mono2.width) == (1024, 1024)
    assert mono2.pixel_spacing == (0.168, 0.168) and mono2.spacing_source == "PixelSpacing"
    np.testing.assert_array_equal(mono2.pixels, f32(raw / 255.0))


def test_fake_monochrome1_is_inverted_monochrome2(mono2: Radiograph) -> None:
    fake = read_radiograph(FAKE_MONO1)
    assert fake.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(fake.pixels, np.float32(1.0) - mono2.pixels)


def test_cxr_jpeg_lossless_monochrome1_modality_lut() -> None:
    ds = pydicom.dcmread(CXR)
    raw = ds.pixel_array
    # lossless: the decoded stored values are fixed, whichever decoder is used
    assert hashlib.sha256(raw.astype("<u2").tobytes()).hexdigest()[:16] == CXR_RAW_SHA
    assert (int(raw.min()), int(raw.max())) == (132, 1018)
    # the file maps its 10 stored bits through a Modality LUT Sequence (1024 entries, 0..990)
    lut = np.frombuffer(ds.ModalityLUTSequence[0].LUTData, dtype="<u2")
    assert lut.shape == (1024,) and (lut.min(), lut.max()) == (0, 990)
    img = read_radiograph(CXR)
    assert (img.height, img.width, img.bits, img.photometric) == (2140, 1760, 10, "MONOCHROME1")
    assert img.pixel_spacing == (0.2, 0.2) and img.spacing_source == "PixelSpacing"
    expected = np.float32(1.0) - f32(lut[raw] / 990.0)
    np.testing.assert_array_equal(img.pixels, expected)
    assert img.pixels.min() >= 0.0 and img.pixels.max() <= 1.0
    windowed = read_radiograph(CXR, voi_lut=True)
    assert windowed.pixels.shape == (2140, 1760)
    assert windowed.pixels.min() >= 0.0 and windowed.pixels.max() <= 1.0


CXR_RAW_SHA = "19a20c9d788186bb"


def test_jpeg2000_monochrome1() -> None:
    raw = pydicom.dcmread(J2K).pixel_array
    img = read_radiograph(J2K)
    assert (img.height, img.width, img.bits, img.photometric) == (1955, 1841, 15, "MONOCHROME1")
    assert img.pixel_spacing is None  # PixelSpacing is 0\0 in this file: invalid
    np.testing.assert_array_equal(img.pixels, np.float32(1.0) - f32(raw / 32767.0))


# ---------------------------------------------------------------- synthetic DICOM


def test_modality_rescale_exact(tmp_path: Path) -> None:
    raw = np.array([[0, 1, 100], [4095, 2048, 7]], dtype=np.uint16)
    path = make_dicom(tmp_path / "r.dcm", raw, RescaleSlope=2, RescaleIntercept=-100)
    img = read_radiograph(path)
    assert img.bits == 12
    # range [0, 4095] -> [-100, 8090]; value 2 x - 100 -> (2 x) / 8190
    np.testing.assert_array_equal(img.pixels, f32(2.0 * raw / 8190.0))


def test_signed_pixels(tmp_path: Path) -> None:
    raw = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    img = read_radiograph(make_dicom(tmp_path / "s.dcm", raw))
    np.testing.assert_array_equal(img.pixels, f32((raw + 2048.0) / 4095.0))


def test_voi_window_exact(tmp_path: Path) -> None:
    raw = np.array([[0, 1536, 1537, 2048, 2559, 2560, 4095]], dtype=np.uint16)
    path = make_dicom(tmp_path / "w.dcm", raw, WindowCenter=2048, WindowWidth=1024)
    # DICOM LINEAR: <= 1536 -> 0, > 2559 -> 1, else (x - 1536) / 1023
    expected = f32([[0.0, 0.0, 1 / 1023, 512 / 1023, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(read_radiograph(path, voi_lut=True).pixels, expected)
    np.testing.assert_array_equal(read_radiograph(path).pixels, f32(raw / 4095.0))
    mono1 = make_dicom(
        tmp_path / "w1.dcm", raw, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=1024
    )
    inverted = read_radiograph(mono1, voi_lut=True).pixels
    np.testing.assert_array_equal(inverted, np.float32(1.0) - expected)


def test_voi_window_after_rescale(tmp_path: Path) -> None:
    raw = np.array([[0, 100, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "w.dcm", raw, RescaleSlope=2, RescaleIntercept=-100,
        WindowCenter=100.5, WindowWidth=201,
    )  # fmt: skip
    # modality values -100, 100, 8090; window [0, 200] -> 100 maps to 0.5
    np.testing.assert_allclose(read_radiograph(path, voi_lut=True).pixels, [[0.0, 0.5, 1.0]])


def test_voi_lut_sequence(tmp_path: Path) -> None:
    raw = np.array([[0, 10, 255]], dtype=np.uint8)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 10])  # LUT Descriptor: 256 entries, 10 bits
    item.add_new(0x00283006, "US", [min(4 * i, 1023) for i in range(256)])
    path = make_dicom(tmp_path / "l.dcm", raw, bits_stored=8, VOILUTSequence=[item])
    img = read_radiograph(path, voi_lut=True)
    np.testing.assert_array_equal(img.pixels, f32(np.array([[0, 40, 1020]]) / 1023.0))


def test_invalid_window_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = np.array([[0, 4095]], dtype=np.uint16)
    path = make_dicom(tmp_path / "w.dcm", raw, WindowCenter=10, WindowWidth=0)
    with caplog.at_level(logging.WARNING, logger="mmcli.io.readers"):
        img = read_radiograph(path, voi_lut=True)
    np.testing.assert_array_equal(img.pixels, f32([[0.0, 1.0]]))
    assert "VOI" in caplog.text


@pytest.mark.parametrize(
    "attrs,expected",
    [
        ({"PixelSpacing": [0.2, 0.3]}, ((0.2, 0.3), "PixelSpacing")),
        ({"ImagerPixelSpacing": [0.15, 0.16]}, ((0.15, 0.16), "ImagerPixelSpacing")),
        (
            {"PixelSpacing": [0.2, 0.2], "ImagerPixelSpacing": [0.1, 0.1]},
            ((0.2, 0.2), "PixelSpacing"),
        ),
        (
            {"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.1, 0.1]},
            ((0.1, 0.1), "ImagerPixelSpacing"),
        ),
        ({}, (None, None)),
    ],
)
def test_pixel_spacing(tmp_path: Path, attrs: dict[str, object], expected: tuple) -> None:
    img = read_radiograph(make_dicom(tmp_path / "p.dcm", np.zeros((2, 2), np.uint16), **attrs))
    assert (img.pixel_spacing, img.spacing_source) == expected


def test_dicom_sniffed_not_suffixed(tmp_path: Path) -> None:
    named_png = shutil.copy(MONO2, tmp_path / "scan.png")
    assert is_dicom(named_png) and not is_dicom(tmp_path / "missing")
    assert read_radiograph(named_png).format == "dicom"
    fake_dcm = png(tmp_path / "x.dcm", np.array([[0, 255]], np.uint8))
    assert not is_dicom(fake_dcm)
    assert read_radiograph(fake_dcm).format == "png"
    assert ".dcm" in SUPPORTED_SUFFIXES


def test_dicom_without_preamble(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "a.dcm", np.array([[0, 4095]], np.uint16))
    data = path.read_bytes()
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(data[132:])  # drop preamble + "DICM", keep the file meta group
    assert not is_dicom(bare)
    np.testing.assert_array_equal(read_radiograph(bare).pixels, f32([[0.0, 1.0]]))


# ---------------------------------------------------------------- refusals


def test_refuse_multiframe_dicom(tmp_path: Path) -> None:
    raw = np.zeros((2, 3, 3), dtype=np.uint16)
    path = make_dicom(tmp_path / "m.dcm", raw, NumberOfFrames=2)
    assert_refused(path, "multi-frame DICOM (2 frames) is not supported")


def test_refuse_rgb_dicom(tmp_path: Path) -> None:
    raw = np.zeros((3, 3, 3), dtype=np.uint8)
    path = make_dicom(tmp_path / "c.dcm", raw, bits_stored=8, photometric="RGB")
    assert_refused(path, "colour DICOM (RGB) is not supported: expected a grey radiograph")


def test_refuse_dicom_without_pixels_even_named_png(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "n.png", np.zeros((2, 2), np.uint16), pixel_data=False)
    assert_refused(path, "DICOM file has no pixel data")


def test_refuse_undecodable_dicom(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "j.dcm", np.zeros((8, 8), np.uint8), bits_stored=8, transfer_syntax=JPEGBaseline8Bit,
                      pixel_data=encapsulate([b"\xff\xd8 not really a jpeg"]))
    assert_refused(path, "truncated or corrupt DICOM pixel data", "JPEG Baseline")


def test_refuse_multiframe_image(tmp_path: Path) -> None:
    frames = [Image.new("L", (4, 4), v) for v in (0, 100, 200)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    assert_refused(tmp_path / "m.tif", "multi-frame images are not supported")


def test_refuse_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = png(tmp_path / "t.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, "truncated or corrupt image data")


NOT_AN_IMAGE = "not an image or DICOM file (cannot identify image format)"


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("e.png", b"", "file is empty (0 bytes)"),
        ("t.png", b"hello, not a picture\n" * 20, NOT_AN_IMAGE),
        ("t.dcm", b"plain text, no DICOM header\n" * 20, NOT_AN_IMAGE),
        ("r.bin", np.random.default_rng(1).bytes(4096), NOT_AN_IMAGE),
    ],
)
def test_refuse_bad_bytes(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    (tmp_path / name).write_bytes(data)
    assert_refused(tmp_path / name, reason)


def test_refuse_missing_and_folder(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.png", "file not found")
    assert_refused(tmp_path, "is a folder")


def test_refuse_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))

    def locked(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("mmcli.io.readers.open", locked, raising=False)  # works as root too
    assert_refused(path, "permission denied")


def test_pillow_bomb_limit_only_without_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = png(tmp_path / "big.png", np.zeros((16, 16), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ReadError, match="too large"):
        read_radiograph(path, max_pixels=None)  # no limit of ours: Pillow's applies
    assert read_radiograph(path).pixels.shape == (16, 16)  # ours stands in for Pillow's
    assert Image.MAX_IMAGE_PIXELS == 10  # and it is put back
    with pytest.raises(ReadError, match=r"image of 16 x 16 pixels exceeds the 0.0002 MP limit$"):
        read_radiograph(path, max_pixels=200)


def test_shipped_examples_read_and_match_their_labels():
    scans = Path(__file__).parents[1] / "examples" / "scans"
    labels = {row["file"]: row["label"] for row in read_rows(scans / "labels.csv")}
    assert set(labels.values()) == {"normal", "pneumonia"}
    for path in sorted(scans.iterdir()):
        if path.suffix == ".csv":
            continue
        rad = read_radiograph(path)
        assert min(rad.height, rad.width) >= 512 and 0.0 <= rad.pixels.min() < rad.pixels.max() <= 1.0
    assert all((scans / name).is_file() for name in labels)


# ---------------------------------------------------------------- pixel budget, errors, warnings


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit grey PNG of ``width`` x ``height`` zeros: a few hundred KB on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    packer, rows = zlib.compressobj(9), bytes((width + 1) * 1000)  # filter byte + row, 1000 rows
    idat = b"".join(packer.compress(rows[: (width + 1) * min(1000, height - y)]) for y in range(0, height, 1000))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat + packer.flush()) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def dicom_bomb(path: Path) -> Path:
    """An uncompressed DICOM declaring 16000 x 16000 pixels with 8 bytes of pixel data."""
    return make_dicom(path, np.zeros((2, 2), np.uint16), Rows=16000, Columns=16000)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    return png_bomb(folder / "bomb.png", 13000, 13000), dicom_bomb(folder / "bomb.dcm")


def run_measured(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object as its last line."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no library warning reaches stderr raw
    return json.loads(done.stdout.strip().splitlines()[-1])


# ru_maxrss survives fork and exec (Linux keeps the parent's peak in the child), so a child
# started from a big pytest process would under-report; VmHWM is this process's own peak.
MEASURE = """
    import json, resource, sys, time
    from mmcli.errors import ReadError
    from mmcli.io.readers import read_radiograph

    def peak_kib():
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        try:
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), maxrss
        except (OSError, StopIteration):
            return maxrss, maxrss

    out = {}
    for path in PATHS:
        (hwm, maxrss), start = peak_kib(), time.perf_counter()
        try:
            rad = read_radiograph(path)
            result = [rad.height, rad.width, float(rad.pixels.max())]
        except ReadError as exc:
            result = exc.reason
        hwm_after, maxrss_after = peak_kib()
        out[path] = {
            "result": result, "grown_mb": (hwm_after - hwm) / 1024, "seconds": time.perf_counter() - start,
            "maxrss_grown_mb": (maxrss_after - maxrss) / 1024,
        }
    print(json.dumps(out))
"""


def test_bombs_refused_from_the_header(bombs: tuple[Path, Path]) -> None:
    png_path, dcm_path = bombs
    with pytest.warns(Image.DecompressionBombWarning), Image.open(png_path) as check:
        assert check.size == (13000, 13000)  # a real PNG, which Pillow alone would decode
    assert_refused(png_path, "image of 13000 x 13000 pixels exceeds the 60 MP limit")
    assert_refused(dcm_path, "image of 16000 x 16000 pixels exceeds the 60 MP limit")
    code = f"PATHS = {[str(png_path), str(dcm_path)]!r}\n" + textwrap.dedent(MEASURE)
    for path, row in run_measured(code).items():
        assert row["result"].endswith("exceeds the 60 MP limit"), (path, row)
        assert max(row["grown_mb"], row["maxrss_grown_mb"]) < 200 and row["seconds"] < 2, (path, row)


def test_budget_counts_frames_and_formats_the_limit(tmp_path: Path) -> None:
    path = png(tmp_path / "a.png", np.zeros((1000, 500), np.uint8))
    with pytest.raises(ReadError, match=r": image of 500 x 1000 pixels exceeds the 0\.4 MP limit$"):
        read_radiograph(path, max_pixels=400_000)
    assert read_radiograph(path, max_pixels=500_000).pixels.shape == (1000, 500)
    assert read_radiograph(path, max_pixels=None).pixels.shape == (1000, 500)
    frames = make_dicom(tmp_path / "m.dcm", np.zeros((3, 4, 5), np.uint16), NumberOfFrames=3)
    with pytest.raises(ReadError, match=r"image of 5 x 4 pixels x 3 frames exceeds the 0\.00005 MP limit"):
        read_radiograph(frames, max_pixels=50)
    for bad in (0, -1, 1.5, True, "60"):
        with pytest.raises(UsageError, match="max_pixels"):
            read_radiograph(path, max_pixels=bad)  # type: ignore[arg-type]


def test_truncated_jpeg_dicom_is_corrupt_not_pixel_free(tmp_path: Path) -> None:
    data = MONO2.read_bytes()
    for fraction in (0.5, 0.9, 0.999):
        cut = tmp_path / f"cut{fraction}.dcm"
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert_refused(cut, "truncated or corrupt DICOM pixel data", "JPEG Baseline")
    native = make_dicom(tmp_path / "n.dcm", np.arange(400, dtype=np.uint16).reshape(20, 20))
    (tmp_path / "n_cut.dcm").write_bytes(native.read_bytes()[:-100])
    assert_refused(tmp_path / "n_cut.dcm", "truncated or corrupt DICOM pixel data", "Explicit VR Little Endian")


@pytest.mark.parametrize(
    "attrs,reason",
    [
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour DICOM (PALETTE COLOR) is not supported"),
        ({"PhotometricInterpretation": "FOO"}, "unsupported photometric interpretation (not a defined term)"),
        ({"Rows": 0}, "DICOM header declares no valid image size (Rows 0, Columns 2)"),
        ({"BitsStored": 0, "HighBit": 0}, "invalid Bits Stored (0) for 16-bit pixel data"),
        ({"RescaleSlope": "1e308", "RescaleIntercept": "1e308"}, "invalid modality LUT / rescale"),
    ],
)
def test_refuse_bad_dicom_headers(tmp_path: Path, attrs: dict[str, object], reason: str) -> None:
    assert_refused(make_dicom(tmp_path / "h.dcm", np.zeros((2, 2), np.uint16), **attrs), reason)


def test_unforeseen_library_errors_become_read_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
    for exc in (KeyError("x"), IndexError("y"), ZeroDivisionError("z"), struct.error("s")):

        def broken(*args: object, exc: Exception = exc, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr("mmcli.io.readers._pil_to_grey", broken)
        assert_refused(path, "cannot convert 'L' image to grey")
    for exc, reason in ((MemoryError(), "not enough memory"), (RecursionError(), "nested too deeply")):

        def broken(*args: object, exc: Exception = exc, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr("mmcli.io.readers._check_file", broken)
        assert_refused(path, reason)


def test_library_warnings_are_captured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when the value is set, too
        path = make_dicom(tmp_path / "v.dcm", np.zeros((2, 2), np.uint16), NumberOfFrames="1.0")  # IS: no "."
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG, "mmcli.io.readers"):
        warnings.simplefilter("always")
        img = read_radiograph(path)
    assert caught == []
    assert len(img.warnings) == 1 and img.warnings[0].startswith("UserWarning: Invalid value for VR IS: '...'")
    mine = [r.getMessage() for r in caplog.records if r.name == "mmcli.io.readers"]
    assert mine and not any("1.0" in m for m in mine)  # the header value itself is never logged
    assert f"{path}: UserWarning: Invalid value for VR IS" in caplog.text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(MONO2.read_bytes()[:60000])
        with pytest.raises(ReadError):
            read_radiograph(cut)  # pydicom warns "End of file reached before delimiter"
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40: Pillow warns, does not refuse
        assert read_radiograph(png_bomb(tmp_path / "b.png", 40, 40), max_pixels=None).warnings
    assert caught == []  # neither pydicom's nor Pillow's DecompressionBombWarning escaped


def test_int32_tiff_min_max_exact(tmp_path: Path) -> None:
    arr = np.array([[-70000, 0], [5, 2**30]], dtype=np.int32)
    img = read_radiograph(png(tmp_path / "i.tif", arr))
    assert img.bits == 32
    np.testing.assert_array_equal(img.pixels, f32((arr + 70000.0) / (2**30 + 70000.0)))


def test_wide_dicom_goes_through_blocks_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mmcli.io.image._CHUNK_PIXELS", 7)  # several blocks even for a tiny image
    raw = np.array([[0, 1, 2**20], [2**24 - 1, 12345, 7], [3, 4, 5]], dtype=np.uint32)
    path = make_dicom(tmp_path / "w.dcm", raw, bits_stored=24, RescaleSlope=3, RescaleIntercept=-1)
    np.testing.assert_array_equal(read_radiograph(path).pixels, f32(3.0 * raw / (3.0 * (2**24 - 1))))


@pytest.mark.slow
def test_peak_memory_of_large_inputs(tmp_path: Path) -> None:
    """A ~59 MP 16-bit PNG and uncompressed DICOM each read within 1.5 GB of resident growth."""
    height, width = 7600, 7760  # 58.98 MP, under the 60 MP budget
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // (width - 1)).astype(np.uint16)
    pixels = np.broadcast_to(ramp, (height, width))
    Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / "big.png", compress_level=1)
    make_dicom(tmp_path / "big.dcm", pixels, bits_stored=16, RescaleSlope=2, RescaleIntercept=-3)
    mono1 = make_dicom(tmp_path / "big1.dcm", pixels, bits_stored=16, photometric="MONOCHROME1")
    paths = [str(tmp_path / "big.png"), str(tmp_path / "big.dcm"), str(mono1)]
    for path in paths:  # one fresh interpreter per file: ru_maxrss is a high-water mark
        row = run_measured(f"PATHS = {[path]!r}\n" + textwrap.dedent(MEASURE))[path]
        assert row["result"] == [height, width, 1.0], row
        assert max(row["grown_mb"], row["maxrss_grown_mb"]) < 1536, row
        print(f"{Path(path).name}: peak resident growth {row['grown_mb']:.0f} MB in {row['seconds']:.1f} s")


def test_colour_is_told_from_grey_saved_as_rgb(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    grey = (np.linspace(0, 255, 200 * 150).reshape(150, 200)).astype(np.uint8)
    PILImage.fromarray(grey).convert("RGB").save(tmp_path / "grey.jpg", quality=90)  # chroma noise only
    rgb = np.stack([grey, np.roll(grey, 40, axis=1), 255 - grey], axis=2)
    PILImage.fromarray(rgb).save(tmp_path / "photo.jpg", quality=90)
    PILImage.fromarray(grey).save(tmp_path / "plain.png")
    assert read_radiograph(tmp_path / "grey.jpg").colour is False
    assert read_radiograph(tmp_path / "photo.jpg").colour is True
    assert read_radiograph(tmp_path / "plain.png").colour is False


def test_every_value_up_to_16_bits_scales_as_float64_division() -> None:
    from mmcli.io.readers import _unit

    for bits in range(1, 17):
        top = 2**bits - 1
        values = np.arange(top + 1, dtype=np.uint8 if bits <= 8 else np.uint16)
        got = _unit(values, top)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, (values / float(top)).astype(np.float32))
        np.testing.assert_array_equal(_unit(values.astype(np.int32), top), got)  # mode "I" data
