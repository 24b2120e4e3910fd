"""Writers under attack: formula cells in CSV, clashing HDF5 keys, a full disk, long names."""

import csv
import errno
import os
import urllib.parse

import h5py
import numpy as np
import pytest

from mmcli.io.writers import atomic_path, csv_cell, hdf5_key, read_csv_rows, write_csv, write_hdf5, write_mask_png

FORMULAS = ["=HYPERLINK(\"http://x\",\"y\")", "+1+2", "-2+3", "@SUM(1)", "\tTAB", "\rCR", "'quoted", "=-1"]


def _cells(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_text_cells_that_start_like_a_formula_are_neutralised(tmp_path):
    rows = [{"case_id": text, "logit": -1.2, "n": -3} for text in FORMULAS]
    write_csv(tmp_path / "r.csv", rows, ["case_id", "logit", "n"])
    cells = _cells(tmp_path / "r.csv")[1:]
    assert [c[0] for c in cells] == ["'" + text for text in FORMULAS]
    assert {(c[1], c[2]) for c in cells} == {("-1.2", "-3")}  # numbers are written as they are
    assert [r["case_id"] for r in read_csv_rows(tmp_path / "r.csv")] == FORMULAS
    assert read_csv_rows(tmp_path / "r.csv")[0]["logit"] == -1.2


@pytest.mark.parametrize("value", ["a", "1.50", "12", "-0.5", "'=x", "", None, 64, 0.25, -1.2, 1e-05, "nan", "007"])
def test_exact_reading_writes_back_the_same_bytes(tmp_path, value):
    write_csv(tmp_path / "a.csv", [{"v": value}], ["v"])
    write_csv(tmp_path / "b.csv", read_csv_rows(tmp_path / "a.csv", exact=True), ["v"])
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()


def test_csv_cell_by_type_not_by_look():
    assert csv_cell(-1.2) == -1.2 and csv_cell(np.float32(-0.5)) == np.float32(-0.5) and csv_cell(-3) == -3
    assert csv_cell("-1.2") == "'-1.2" and csv_cell(None) == "" and csv_cell(True) == "True"


def test_hdf5_keys_of_a_file_beside_a_folder_do_not_clash(tmp_path):
    ids = ["a", "a/b", "a%2Fb", "x y/é", ".", "=1"]
    rows = [{"case_id": i} for i in ids]
    write_hdf5(tmp_path / "r.h5", rows, ["case_id"], masks=lambda row: np.ones((3, 4), bool))
    with h5py.File(tmp_path / "r.h5") as h5:
        assert len(h5["masks"]) == len(ids)
        for key, ds in h5["masks"].items():
            assert urllib.parse.unquote(key) == ds.attrs["case_id"]
        assert sorted(ds.attrs["case_id"] for ds in h5["masks"].values()) == sorted(ids)
        assert h5["masks"][hdf5_key("a/b")].attrs["case_id"] == "a/b"


def test_a_full_disk_while_writing_hdf5_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(OSError) as caught:
        write_hdf5(tmp_path / "r.h5", [{"case_id": "a"}], ["case_id"])
    assert caught.value.filename == str(tmp_path / "r.h5") and caught.value.errno == errno.ENOSPC
    assert str(caught.value.strerror) == "No space left on device"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("length", [242, 250, 255])
def test_temp_names_fit_name_max_whatever_the_final_name(tmp_path, length):
    name = "x" * (length - 4) + ".png"
    write_mask_png(tmp_path / name, np.ones((2, 2), bool))
    assert os.listdir(tmp_path) == [name]
    wide = "é" * ((length - 4) // 2) + ".png"  # two bytes a character: the cut keeps whole ones
    with atomic_path(tmp_path / wide) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        tmp.write_bytes(b"x")
    assert (tmp_path / wide).read_bytes() == b"x"


def test_every_csv_mmcli_writes_goes_through_write_csv():
    # one place neutralises formula cells: no other module makes its own csv.writer
    from pathlib import Path

    import mmcli

    root = Path(mmcli.__file__).parent
    writers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if "csv.writer(" in p.read_text(encoding="utf-8") or "csv.DictWriter(" in p.read_text(encoding="utf-8")]
    assert writers == ["io/writers.py"]
