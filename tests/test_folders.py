"""mmcli.data.folders: the one dataset-folder rule (images, masks/<key>.png, labels.csv, patients)."""

import logging

import numpy as np
import pytest
from conftest import save_png8
from PIL import Image

from mmcli.data.folders import FolderImage, read_labels_csv, read_mask, row_key, scan_dataset
from mmcli.errors import CaseError, InputError


def _mask(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


@pytest.fixture()
def folder(tmp_path):
    """a.png, b.jpg, sub/c.png, sub/deep/d.png; masks for a and sub/c; a stray image in masks/."""
    root = tmp_path / "set"
    for rel in ("a.png", "b.jpg", "sub/c.png", "sub/deep/d.png"):
        save_png8(root / rel, 8, 6)
    _mask(root / "masks" / "a.png", np.zeros((8, 6)))
    _mask(root / "masks" / "sub" / "c.png", np.zeros((8, 6)))
    _mask(root / "masks" / "b.jpg.png", np.zeros((8, 6)))  # not b's mask: b's key is "b"
    return root


def test_scan_is_recursive_and_keys_are_relative(folder):
    images = scan_dataset(folder)
    assert [im.key for im in images] == ["a", "b", "sub/c", "sub/deep/d"]  # nothing from masks/
    assert [im.path for im in images] == [(folder / p).resolve() for p in
                                          ("a.png", "b.jpg", "sub/c.png", "sub/deep/d.png")]
    assert [im.mask for im in images] == [folder / "masks" / "a.png", None, folder / "masks" / "sub" / "c.png", None]
    assert all(im.label is None and im.patient is None for im in images)
    assert all(im.mask is None for im in scan_dataset(folder, masks=False))


def test_labels_match_with_and_without_suffix(folder, caplog):
    (folder / "labels.csv").write_text(
        "File , Label\n"
        "a.png,Normal\n"
        "b, pneumonia \n"
        "sub/c.jpeg,pneumonia\n"  # the suffix is dropped whatever it is
        "sub\\deep\\d.PNG,normal\n"
        "gone.png,normal\n"
    )
    with caplog.at_level(logging.WARNING, logger="mmcli.data.folders"):
        images = scan_dataset(folder)
    assert {im.key: im.label for im in images} == {"a": "normal", "b": "pneumonia", "sub/c": "pneumonia",
                                                  "sub/deep/d": "normal"}
    assert "1 row(s) name no image of the folder (first: 'gone')" in caplog.text
    assert all(im.label is None for im in scan_dataset(folder, labels=False))
    assert read_labels_csv(folder / "labels.csv") == {"a": "normal", "b": "pneumonia", "sub/c": "pneumonia",
                                                     "sub/deep/d": "normal", "gone": "normal"}


def test_row_key():
    assert row_key("a.png") == row_key("a") == row_key(" ./a.DCM ") == "a"
    assert row_key("sub/a.jpeg") == row_key("sub\\a.tif") == "sub/a"
    assert row_key("1.2.840.5") == "1.2.840.5"  # not an image suffix: a DICOM file name is kept whole


def test_bad_labels_csv(folder):
    (folder / "labels.csv").write_text("file,label\na.png,covid\n")
    with pytest.raises(InputError, match=r"labels\.csv: label 'covid' of 'a\.png' is not one of normal, pneumonia"):
        scan_dataset(folder)
    (folder / "labels.csv").write_text("file,label\na.png,\n")
    with pytest.raises(InputError, match="label '' of 'a.png'"):
        scan_dataset(folder)
    (folder / "labels.csv").write_text("name,class\na.png,normal\n")
    with pytest.raises(InputError, match=r"labels\.csv: needs the columns file,label; found name, class"):
        read_labels_csv(folder / "labels.csv")
    # a folder read without labels only looks at labels.csv for patients
    assert [im.label for im in scan_dataset(folder, labels=False)] == [None] * 4


def test_patients_from_labels_csv_first_then_meta_csv(folder):
    (folder / "meta.csv").write_text("FILE,age,Subject_ID\na.png,3,S1\nsub/c,4,S1\nb.jpg,5,\n")
    by_key = {im.key: im for im in scan_dataset(folder)}
    assert {k: im.patient for k, im in by_key.items()} == {"a": "S1", "b": None, "sub/c": "S1", "sub/deep/d": None}
    # labels.csv without a patient column: still meta.csv
    (folder / "labels.csv").write_text("file,label\na.png,normal\n")
    assert scan_dataset(folder)[0] == FolderImage((folder / "a.png").resolve(), "a", folder / "masks" / "a.png",
                                                  "normal", "S1")
    # labels.csv with a patient column wins, even for images it does not label
    (folder / "labels.csv").write_text("file,label,PatientID\na.png,normal,P7\nb.jpg,pneumonia, P8 \n")
    assert {im.key: im.patient for im in scan_dataset(folder)} == {"a": "P7", "b": "P8", "sub/c": None,
                                                                   "sub/deep/d": None}
    assert {im.key: im.patient for im in scan_dataset(folder, labels=False)}["b"] == "P8"


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="Dataset folder not found"):
        scan_dataset(tmp_path / "nope")
    _mask(tmp_path / "only-masks" / "masks" / "a.png", np.zeros((4, 4)))
    with pytest.raises(InputError, match="Found 0 images"):
        scan_dataset(tmp_path / "only-masks")


def test_mask_is_pixel_above_127_and_sized_like_its_image(tmp_path):
    path = _mask(tmp_path / "m.png", [[0, 127, 128], [255, 200, 1]])
    got = read_mask(path, (2, 3))
    assert got.dtype == bool and got.tolist() == [[False, False, True], [True, True, False]]
    with pytest.raises(CaseError, match="the mask is 3x2 but its image is 4x2"):
        read_mask(path, (2, 4))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CaseError, match="cannot read the mask"):
        read_mask(tmp_path / "bad.png", (2, 3))
