"""The Python API: one image at a time, the same answer as ``mmcli predict``."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, save_png8
from PIL import Image

import mmcli
from mmcli.errors import CaseError, UsageError
from mmcli.predict import PredictConfig, run_predict

ROOT = Path(__file__).parents[1]
SCANS = ROOT / "examples" / "scans"


def test_api_gives_the_predict_rows_of_the_shipped_examples(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCLI_WEIGHTS", raising=False)
    cfg = PredictConfig(inputs=(str(SCANS),), out=tmp_path / "r.csv", workers=0, precision="fp32")
    run_predict(cfg)
    rows = read_rows(tmp_path / "r.csv")
    model = mmcli.load(precision="fp32")
    assert len(rows) == 5
    for row in rows:
        result = model.predict(row["source"])
        assert result.p_pneumonia == round(result.p_pneumonia, 6)  # as the report holds it
        assert result.p_pneumonia == pytest.approx(float(row["p_pneumonia"]), abs=1.01e-6)  # batched, alone
        assert result.label == row["label"]
        assert ";".join(result.flags) == row["qa_flags"]
        written = np.asarray(Image.open(tmp_path / row["mask"])) > 0
        assert result.mask.shape == written.shape == (int(row["height"]), int(row["width"]))
        assert np.mean(result.mask != written) < 1e-3
        for side in ("", "right_", "left_"):
            fraction, area = getattr(result, f"{side}lung_fraction"), getattr(result, f"{side}lung_area_mm2")
            assert fraction == pytest.approx(float(row[f"{side}lung_fraction"]), abs=1e-3)
            if row[f"{side}lung_area_mm2"]:  # the DICOM example gives its pixel spacing
                assert area == pytest.approx(float(row[f"{side}lung_area_mm2"]), rel=1e-3)
            else:
                assert area is None


@pytest.mark.parametrize("qa", ["warn", "refuse", "off"])
def test_api_result_is_the_report_row_cell_for_cell(tiny_weights, tmp_path, qa):
    from dataclasses import fields

    scans = tmp_path / "scans"
    save_png8(scans / "a.png", 96, 80, seed=3)
    shutil.copyfile(ROOT / "tests" / "data" / "dicom" / "Fake_MONOHR1.dcm", scans / "b.dcm")  # with a spacing
    cfg = PredictConfig(inputs=(str(scans),), out=tmp_path / "r.csv", weights=str(tiny_weights), workers=0,
                        batch_size=1, precision="fp32", threshold=0.3, qa=qa)
    run_predict(cfg)
    rows = read_rows(tmp_path / "r.csv")
    model = mmcli.load(tiny_weights, precision="fp32", threshold=0.3, qa=qa)
    assert len(rows) == 2
    for row in rows:
        if row["status"] == "error":  # refused by quality control: the API raises the row's reason
            with pytest.raises(CaseError, match=re.escape(row["error"])):
                model.predict(row["source"])
            continue
        result = model.predict(row["source"])
        assert ";".join(result.flags) == row["qa_flags"]
        for name in {f.name for f in fields(result)} - {"mask", "flags"}:
            value = getattr(result, name)
            assert ("" if value is None else str(value)) == row[name], name  # the cell predict writes
        assert np.array_equal(result.mask, np.asarray(Image.open(tmp_path / row["mask"])) > 0)


def test_an_array_is_the_same_image_as_its_file(tiny_weights, tmp_path):
    path = save_png8(tmp_path / "a.png", 96, 80, seed=3)
    model = mmcli.load(tiny_weights, precision="fp32")
    pixels = np.asarray(Image.open(path))
    by_file, by_array = model.predict(path), model.predict(pixels)
    assert by_array.p_pneumonia == by_file.p_pneumonia
    assert np.array_equal(by_array.mask, by_file.mask) and by_array.flags == by_file.flags
    assert (by_array.height, by_array.width) == (96, 80)
    assert model.predict(pixels.astype(np.float32) / 255).p_pneumonia == pytest.approx(by_file.p_pneumonia, abs=1e-6)


def test_api_errors_name_the_input(tiny_weights, tmp_path):
    model = mmcli.load(tiny_weights)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(CaseError, match="notes.png"):
        model.predict(bad)
    with pytest.raises(UsageError, match=r"\(H, W\)"):
        model.predict(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        model.predict(np.full((8, 8), 2.0))
    with pytest.raises(UsageError, match="threshold"):
        mmcli.load(tiny_weights, threshold=1.5)
    with pytest.raises(UsageError, match="qa"):
        mmcli.load(tiny_weights, qa="sometimes")


def test_threshold_and_qa_settings_apply(tiny_weights, tmp_path):
    path = save_png8(tmp_path / "a.png", 64, 64, seed=1)
    p = mmcli.load(tiny_weights).predict(path).p_pneumonia
    assert mmcli.load(tiny_weights, threshold=0.0, qa="off").predict(path).label == "pneumonia"
    expected = "pneumonia" if p >= 1 else "normal"
    assert mmcli.load(tiny_weights, threshold=1.0, qa="off").predict(path).label == expected
    assert mmcli.load(tiny_weights, qa="off").predict(path).flags == ()
