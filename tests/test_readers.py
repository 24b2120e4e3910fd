"""Tests for mmcli.io.readers: exact pixel values for PNG/TIFF/JPEG and DICOM files."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from mmcli.errors import ReadError
from mmcli.io.readers import SUPPORTED_SUFFIXES, Radiograph, is_dicom, read_radiograph

DICOM_DIR = Path(__file__).parent / "data" / "dicom"
CXR = DICOM_DIR / "cxr.dcm"
J2K = DICOM_DIR / "RG1_J2KI.dcm"
MONO2 = DICOM_DIR / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
FAKE_MONO1 = DICOM_DIR / "Fake_MONOHR1.dcm"


def f32(values: np.ndarray | list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_data: bool = True,
    **attrs: object,
) -> Path:
    """Write an uncompressed (explicit VR little endian) DX file with ``pixels`` (H, W)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2] if photometric == "RGB" else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


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
    path = make_dicom(tmp_path / "j.dcm", np.zeros((8, 8), np.uint8), bits_stored=8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 not really a jpeg"])
    ds.save_as(path, enforce_file_format=True)
    assert_refused(path, "cannot decode DICOM pixel data", "JPEG Baseline")


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


def test_refuse_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = png(tmp_path / "big.png", np.zeros((16, 16), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert_refused(path, "too large")


def test_shipped_examples_read_and_match_their_labels():
    import csv

    scans = Path(__file__).parents[1] / "examples" / "scans"
    with open(scans / "labels.csv", newline="") as f:
        labels = {row["file"]: row["label"] for row in csv.DictReader(f)}
    assert set(labels.values()) == {"normal", "pneumonia"}
    for path in sorted(scans.iterdir()):
        if path.suffix == ".csv":
            continue
        rad = read_radiograph(path)
        assert min(rad.height, rad.width) >= 512 and 0.0 <= rad.pixels.min() < rad.pixels.max() <= 1.0
    assert all((scans / name).is_file() for name in labels)
