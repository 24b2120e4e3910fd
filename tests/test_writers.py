import json
import os

import h5py
import numpy as np
import pytest

from mmcli.io.runfolder import Journal
from mmcli.io.writers import (
    atomic_path,
    read_csv_rows,
    read_mask_png,
    write_csv,
    write_hdf5,
    write_json,
    write_mask_png,
)


def test_mask_png_round_trip(tmp_path):
    mask = np.zeros((37, 53), dtype=bool)
    mask[5:20, 10:40] = True
    write_mask_png(tmp_path / "sub" / "m.png", mask)
    assert np.array_equal(read_mask_png(tmp_path / "sub" / "m.png"), mask)
    assert os.listdir(tmp_path / "sub") == ["m.png"]  # no temporary file left


def test_atomic_path_keeps_old_file_on_crash(tmp_path):
    target = tmp_path / "report.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.csv"]


def test_csv_and_json(tmp_path):
    rows = [{"case_id": "a/x", "p": 0.25, "error": None}, {"case_id": "007", "p": None, "error": "bad"}]
    write_csv(tmp_path / "r.csv", rows, ["case_id", "p", "error"])
    back = read_csv_rows(tmp_path / "r.csv")
    assert back == [{"case_id": "a/x", "p": 0.25, "error": None}, {"case_id": "007", "p": None, "error": "bad"}]
    write_json(tmp_path / "m.json", {"a": 1, "path": tmp_path})
    assert json.loads((tmp_path / "m.json").read_text())["path"] == str(tmp_path)


def test_hdf5_table_masks_and_attrs(tmp_path):
    rows = [{"case_id": "a", "p": 0.5, "status": "ok"}, {"case_id": "b", "p": None, "status": "error"}]
    mask = np.eye(300, 280, dtype=bool)
    write_hdf5(
        tmp_path / "r.h5", rows, ["case_id", "p", "status"],
        masks=lambda row: mask if row["case_id"] == "a" else None, attrs={"version": "1", "pre": {"s": 256}},
    )
    with h5py.File(tmp_path / "r.h5") as h5:
        assert [s.decode() for s in h5["cases/case_id"][()]] == ["a", "b"]
        p = h5["cases/p"][()]
        assert p[0] == 0.5 and np.isnan(p[1])
        ds = h5["masks/a"]
        assert np.array_equal(ds[()].astype(bool), mask)
        assert ds.compression == "gzip" and ds.chunks is not None
        assert "b" not in h5["masks"]
        assert h5.attrs["version"] == "1" and json.loads(h5.attrs["pre"]) == {"s": 256}


def test_journal_resume_ignores_torn_line(tmp_path):
    j = Journal(tmp_path / "j.jsonl")
    j.start({"sha": "x"}, [{"case_id": "a", "status": "ok"}])
    j.append({"case_id": "b", "status": "error"})
    j.close()
    with open(tmp_path / "j.jsonl", "a") as f:
        f.write('{"case_id": "c", "sta')  # killed mid-write
    header, rows = Journal(tmp_path / "j.jsonl").read()
    assert header == {"sha": "x"}
    assert set(rows) == {"a", "b"} and rows["b"]["status"] == "error"


def test_csv_ids_that_look_like_numbers_stay_text(tmp_path):
    rows = [{"case_id": v, "p": 1.5e-3} for v in ("007", "1_000", "nan", "12", "-0.5")]
    write_csv(tmp_path / "r.csv", rows, ["case_id", "p"])
    back = [r["case_id"] for r in read_csv_rows(tmp_path / "r.csv")]
    assert back == ["007", "1_000", "nan", 12.0, "-0.5"]  # text, neutralised: read back as text
    assert read_csv_rows(tmp_path / "r.csv")[0]["p"] == 1.5e-3


def test_written_files_honour_the_umask(tmp_path):
    import mmcli.io.writers as writers

    old = os.umask(0o027)
    os.umask(old)
    expected = 0o666 & ~old
    assert expected == writers._FILE_MODE  # read from the process, not assumed
    write_mask_png(tmp_path / "m.png", np.ones((4, 4), bool))
    write_csv(tmp_path / "r.csv", [{"a": 1}], ["a"])
    for name in ("m.png", "r.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert expected != 0o600  # the temporary file's mode is not what survives
