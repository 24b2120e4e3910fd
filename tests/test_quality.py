"""The --qa policy end to end: flags in every per-case output, uncertain labels, refusals."""

import numpy as np
import pytest
from conftest import DATA, rows_by_case, save_png8
from PIL import Image
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.qa.policy import apply_policy

runner = CliRunner()
EXAMPLES = DATA.parent.parent / "examples" / "scans"


@pytest.fixture()
def scans(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    film = next(p for p in sorted(EXAMPLES.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    Image.open(film).convert("L").save(root / "film.png")
    grey = np.asarray(Image.open(root / "film.png"))
    Image.fromarray(255 - grey).save(root / "negative.png")  # an inverted film
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(root / "grey.png")  # not a radiograph
    save_png8(root / "tiny.png", 40, 40)  # under 64 px
    rgb = np.stack([grey, np.roll(grey, 60, axis=1), 255 - grey], axis=2)  # a film's shapes, in colour
    Image.fromarray(rgb).save(root / "photo.jpg", quality=90)
    return root


def test_warn_flags_and_labels_doubtful_images_uncertain(tmp_path, scans, tiny_weights):
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights),
                              "-j", "0"])
    assert res.exit_code == 0, res.output
    rows = rows_by_case(tmp_path / "r.csv")
    assert rows["grey"]["qa_flags"].split(";")[0] == "not_radiograph" and rows["grey"]["label"] == "uncertain"
    assert rows["tiny"]["qa_flags"].startswith("not_radiograph") and rows["tiny"]["label"] == "uncertain"
    assert "inverted" in rows["negative"]["qa_flags"].split(";") and rows["negative"]["label"] == "uncertain"
    assert rows["photo"]["qa_flags"].startswith("not_radiograph") and rows["photo"]["label"] == "uncertain"
    assert "inverted" not in rows["film"]["qa_flags"] and "not_radiograph" not in rows["film"]["qa_flags"]
    assert all(r["status"] == "ok" and r["p_pneumonia"] for r in rows.values())  # outputs are still written
    assert "flagged by quality control" in res.output


def test_refuse_fails_flagged_cases_and_off_checks_nothing(tmp_path, scans, tiny_weights):
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights),
                              "-j", "0", "-q", "--qa", "refuse"])
    assert res.exit_code == 1
    rows = rows_by_case(tmp_path / "r.csv")
    assert rows["grey"]["status"] == "error"
    assert rows["grey"]["error"].startswith("refused by quality control: not_radiograph")
    assert rows["negative"]["status"] == "error" and rows["negative"]["label"] == ""
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "off.csv"), "-w", str(tiny_weights),
                              "-j", "0", "-q", "--qa", "off"])
    assert res.exit_code == 0
    rows = rows_by_case(tmp_path / "off.csv")
    assert all(r["qa_flags"] == "" and r["label"] in ("normal", "pneumonia") for r in rows.values())
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "x.csv"), "--qa", "maybe"])
    assert res.exit_code == 2 and "--qa must be warn, refuse or off" in res.output


def test_explain_reports_the_same_flags(tmp_path, scans, tiny_weights):
    runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights), "-q"])
    runner.invoke(app, ["explain", str(scans), "--out", str(tmp_path / "e"), "-w", str(tiny_weights), "-q"])
    pred, expl = rows_by_case(tmp_path / "r.csv"), rows_by_case(tmp_path / "e" / "explain.csv")
    for case_id in ("grey", "tiny", "negative"):  # image flags (mask flags: test_qa_registry.py, in fp32)
        image_flags = {"not_radiograph", "inverted", "rotated"}
        assert set(pred[case_id]["qa_flags"].split(";")) & image_flags == \
            set(expl[case_id]["qa_flags"].split(";")) & image_flags
        assert expl[case_id]["label"] == "uncertain"


def test_the_policy_on_hand_made_rows():
    assert apply_policy({"label": "normal"}, [], "warn") == {"label": "normal", "qa_flags": None}
    assert apply_policy({"label": "normal"}, ["mask_implausible"], "warn") == {
        "label": "normal", "qa_flags": "mask_implausible"}  # the image itself is fine: the label stands
    assert apply_policy({"label": "pneumonia"}, ["rotated", "rotated"], "warn") == {
        "label": "uncertain", "qa_flags": "rotated"}
    assert apply_policy({"label": "pneumonia", "status": "ok"}, ["out_of_distribution"], "refuse") == {
        "label": None, "qa_flags": "out_of_distribution", "status": "error",
        "error": "refused by quality control: out_of_distribution"}
    assert apply_policy({"label": "normal"}, ["inverted"], "off") == {"label": "normal", "qa_flags": None}


def test_lung_cells_of_a_hand_made_label_map():
    from mmcli.qa.mask import LEFT_LUNG, RIGHT_LUNG, lung_cells

    sides = np.zeros((100, 200), np.uint8)
    sides[10:60, 20:80] = RIGHT_LUNG  # 3000 px
    sides[10:50, 120:170] = LEFT_LUNG  # 2000 px
    assert lung_cells(sides, (0.5, 0.2)) == {
        "lung_fraction": 0.25, "lung_area_mm2": 500.0, "right_lung_fraction": 0.15, "right_lung_area_mm2": 300.0,
        "left_lung_fraction": 0.1, "left_lung_area_mm2": 200.0}
    assert lung_cells(sides, None)["right_lung_area_mm2"] is None


def test_predict_reports_each_lung_and_explain_the_same_lung_fraction(tmp_path, scans, tiny_weights):
    import shutil

    from conftest import DATA

    shutil.copyfile(DATA / "dicom" / "Fake_MONOHR1.dcm", scans / "mono1.dcm")
    for masks in (["--raw-masks"],):  # anatomical masks: tests/test_dicom_out.py (each lung against the SEG)
        out = tmp_path / f"r{len(masks)}.csv"
        res = runner.invoke(app, ["predict", str(scans), "--out", str(out), "-w", str(tiny_weights), "-q", "-j", "0",
                                  "-b", "1", "--qa", "off", *masks])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["explain", str(scans), "--out", str(tmp_path / f"e{len(masks)}"), "-w",
                                  str(tiny_weights), "-q", "-j", "0", "-b", "1", "--qa", "off", *masks])
        assert res.exit_code == 0, res.output
        pred, expl = rows_by_case(out), rows_by_case(tmp_path / f"e{len(masks)}" / "explain.csv")
        assert set(pred) == set(expl) and len(pred) == 6
        for case_id, row in pred.items():
            total, right, left = (float(row[f"{c}lung_fraction"]) for c in ("", "right_", "left_"))
            assert right + left == pytest.approx(total, abs=2e-6), case_id
            if masks:  # one definition, the native image; but explain's forward pass (with gradients) may flip
                # a random model's near-zero logits: with anatomical masks a whole piece may then go or stay
                assert float(expl[case_id]["lung_fraction"]) == pytest.approx(total, abs=2e-3), case_id
            areas = [row[f"{c}lung_area_mm2"] for c in ("", "right_", "left_")]
            spaced = case_id == "mono1"
            assert all(a != "" for a in areas) if spaced else all(a == "" for a in areas), case_id
            if spaced:
                height, width = int(row["height"]), int(row["width"])
                spacing = float(areas[0]) / (total * height * width) if total else 0.0
                for a, fraction in zip(areas[1:], (right, left), strict=True):
                    assert float(a) == pytest.approx(fraction * height * width * spacing, rel=1e-3, abs=0.05)
        if masks:  # the network's own mask of a random model: some lung somewhere
            assert any(float(r["lung_fraction"]) > 0 for r in pred.values())


def test_native_lung_mask_is_taken_at_the_native_size():
    """A lone positive logit on the 64 px grid covers 1/4096 of it, but about 3 grid pixels once
    resized bilinearly: explain's lung_fraction is now predict's, of the native image."""
    import torch

    from mmcli.inference import BatchPrediction

    logits = torch.full((1, 1, 64, 64), -0.1)
    logits[0, 0, 32, 32] = 1.0
    pred = BatchPrediction(None, logits, None)
    native = pred.mask_at(0, 640, 640)
    assert native.shape == (640, 640) and native.dtype == bool
    assert 2.5 / 4096 < native.mean() < 4 / 4096 and native[325, 325]
