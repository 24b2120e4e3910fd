"""The quality-control registry: every flag named once, with the stage that computes it and what it does
to the label; and, each flag being computed at one stage, predict and explain agree on a film."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.io.readers import read_radiograph
from mmcli.qa.flags import FLAGS, NO_GROUNDS
from mmcli.qa.image import image_flags
from mmcli.qa.mask import mask_flags
from mmcli.qa.policy import UNCERTAIN, apply_policy

ROOT = Path(__file__).parents[1]
SCANS = ROOT / "examples" / "scans"


def test_registry_names_every_flag_once_with_its_stage():
    assert list(FLAGS) == ["not_radiograph", "inverted", "rotated", "mask_implausible", "out_of_distribution"]
    assert {name: f.stage for name, f in FLAGS.items()} == {
        "not_radiograph": "image", "inverted": "image", "rotated": "image", "mask_implausible": "mask",
        "out_of_distribution": "features"}
    assert NO_GROUNDS == ("not_radiograph", "inverted", "rotated")
    assert all(f.name == name and f.meaning for name, f in FLAGS.items())


def test_the_rules_raise_registered_flags_of_their_own_stage():
    film = read_radiograph(SCANS / "NORMAL2-IM-1427-0001.jpeg").pixels
    noise = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    raised = {"image": [image_flags(x, height=x.shape[0], width=x.shape[1])
                        for x in (film, 1.0 - film, np.ascontiguousarray(film[::-1]), noise)],
              "mask": [mask_flags(np.zeros((100, 100), bool))]}
    assert raised["image"] == [[], ["inverted"], ["rotated"], ["not_radiograph"]]
    for stage, lists in raised.items():
        assert all(FLAGS[name].stage == stage for flags in lists for name in flags)
    assert raised["mask"] == [["mask_implausible"]]


@pytest.mark.parametrize("name", list(FLAGS))
def test_the_policy_follows_the_registry(name):
    warned = apply_policy({"label": "normal", "status": "ok"}, [name], "warn")
    assert warned["qa_flags"] == name and warned["status"] == "ok"
    assert (warned["label"] == UNCERTAIN) == FLAGS[name].no_grounds
    refused = apply_policy({"label": "normal", "status": "ok"}, [name], "refuse")
    assert refused["status"] == "error" and refused["label"] is None and name in refused["error"]


def test_the_readme_table_has_a_row_for_every_flag():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in readme for name in FLAGS)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def test_predict_and_explain_judge_a_film_alike(tmp_path, one_thread):
    """explain judges the mask as predict does: at the image's native size, with its pixel spacing. With a
    spacing that makes its lungs a few cm^2, the example DICOM's plausible mask is ``mask_implausible`` in both."""
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(SCANS / "nih_siim_example.dcm", scans)
    tiny = pydicom.dcmread(SCANS / "nih_siim_example.dcm")
    tiny.PixelSpacing = [0.01, 0.01]
    tiny.save_as(scans / "tiny_spacing.dcm")
    runner = CliRunner()
    common = ["-q", "--precision", "fp32", "--workers", "0"]  # the default weights
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "p.csv"), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["explain", str(scans), "--out", str(tmp_path / "why"), *common])
    assert res.exit_code == 0, res.output
    predicted, explained = _rows(tmp_path / "p.csv"), _rows(tmp_path / "why" / "explain.csv")
    assert {k: r["qa_flags"] for k, r in predicted.items()} == {"nih_siim_example": "",
                                                                 "tiny_spacing": "mask_implausible"}
    for case_id, row in predicted.items():
        assert explained[case_id]["qa_flags"] == row["qa_flags"], case_id
        assert explained[case_id]["label"] == row["label"], case_id
        assert float(explained[case_id]["lung_fraction"]) == pytest.approx(float(row["lung_fraction"]), abs=1e-3)
