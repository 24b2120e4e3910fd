"""Shared fixtures and builders: a tiny random checkpoint, small radiographs and DICOM files made in
tmp_path, and the reader for CSV reports."""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mmcli.config import PreprocessConfig
from mmcli.models import create_model, model_kwargs
from mmcli.weights import Checkpoint, save_checkpoint

DATA = Path(__file__).parent / "data"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def make_checkpoint(path: Path, seed: int = 0, image_size: int = 64) -> Path:
    torch.manual_seed(seed)
    kwargs = model_kwargs("multimix_tiny")
    model = create_model("multimix_tiny", **kwargs)
    ckpt = Checkpoint(
        model_name="multimix_tiny", model_kwargs=kwargs, state_dict=model.state_dict(),
        preprocess=PreprocessConfig(image_size=image_size),
    )
    save_checkpoint(ckpt, path)
    return path


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (registered, so the scripts can import each other)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def radiograph_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth grey image in [0, 1] with two dark 'lungs', ``(H, W)`` float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    img = 0.8 - 0.5 * (np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.02)
                       + np.exp(-((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.02))
    img += 0.02 * rng.standard_normal((height, width))
    return np.clip(img, 0, 1).astype(np.float32)


def save_png8(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((radiograph_like(height, width, seed) * 255).astype(np.uint8)).save(path)
    return path


def save_png16(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((radiograph_like(height, width, seed) * 65535).astype(np.uint16)).save(path)
    return path


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    sop_class: str = DX_FOR_PRESENTATION,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_spacing: Sequence[float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_data: bool | bytes = True,
    **attrs: object,
) -> Path:
    """Write a single-file DICOM image of ``pixels`` to ``path`` and return ``path``.

    ``pixels`` is ``(H, W)`` grey, ``(frames, H, W)`` with ``NumberOfFrames`` in ``attrs``, or
    ``(H, W, 3)`` with ``photometric="RGB"``; BitsAllocated follows its dtype, PixelRepresentation its
    signedness, HighBit ``bits_stored``. ``pixel_data``: ``True`` stores ``pixels`` little endian
    (uncompressed: keep the default ``transfer_syntax``), ``False`` stores no pixel data, ``bytes`` are
    stored as they are (e.g. ``encapsulate([...])`` for a compressed ``transfer_syntax``). Every other
    attribute (``PatientID=...``, ``RescaleSlope=...``, ``VOILUTSequence=...``) comes as a keyword,
    set after the ones above, so it can override them (``Rows=16000``).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2] if photometric == "RGB" else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if isinstance(pixel_data, bytes):
        ds.PixelData = pixel_data
    elif pixel_data:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def read_rows(path: Path | str) -> list[dict[str, str]]:
    """The rows of the CSV file at ``path`` (header first), each ``{column: cell text}``, in file order."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rows_by_case(path: Path | str) -> dict[str, dict[str, str]]:
    """``read_rows(path)`` keyed by the ``case_id`` column (a report's rows by case)."""
    return {row["case_id"]: row for row in read_rows(path)}


@pytest.fixture()
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
