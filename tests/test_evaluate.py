"""``mmcli evaluate`` end to end through the CLI, with the tiny checkpoint and hand-made predictions."""

import csv
import json

import h5py
import numpy as np
import pytest
from conftest import read_rows, save_png8
from PIL import Image
from typer.testing import CliRunner

from mmcli import metrics as M
from mmcli.cli import app
from mmcli.io.writers import read_mask_png, write_mask_png

runner = CliRunner()


def _run(args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _lung_mask(size=64, shift=0):
    mask = np.zeros((size, size), bool)
    mask[16:48, 8 + shift : 28 + shift] = True
    mask[16:48, 36 + shift : 56 + shift] = True
    return mask


@pytest.fixture()
def datasets(tmp_path):
    seg, cls = tmp_path / "seg", tmp_path / "cls"
    for i in range(3):
        save_png8(seg / f"s{i}.png", 64, 64, seed=i)
        write_mask_png(seg / "masks" / f"s{i}.png", _lung_mask(shift=i))
    labels = ["normal", "pneumonia", "pneumonia", "normal"]
    for i in range(4):
        save_png8(cls / f"c{i}.png", 64, 64, seed=10 + i)
    save_png8(cls / "unlabelled.png", 64, 64, seed=20)
    (cls / "labels.csv").write_text("file,label\n" + "".join(f"c{i}.png,{lab}\n" for i, lab in enumerate(labels)))
    return seg, cls


def test_evaluate_end_to_end(tmp_path, datasets, tiny_weights):
    out = tmp_path / "report"
    res = _run(["evaluate", *datasets, "-w", tiny_weights, "--out", out, "-j", "0", "--bootstrap", "50",
                "--hdf5", out / "evaluation.h5"])
    assert res.exit_code == 0, res.output
    rows = read_rows(out / "per_case.csv")
    assert [r["dataset"] for r in rows] == ["seg"] * 3 + ["cls"] * 4  # the unlabelled image is left out
    assert all(r["status"] == "ok" for r in rows)
    for r in rows[:3]:  # per-case metrics are those of the predicted and reference mask files
        expected = M.overlap_metrics(read_mask_png(r["pred_mask"]), read_mask_png(r["true_mask"]))
        assert float(r["dice"]) == pytest.approx(expected["dice"])
        assert float(r["jaccard"]) <= float(r["dice"])
    summary = json.loads((out / "summary.json").read_text())
    seg, cls = summary["datasets"]["seg"], summary["datasets"]["cls"]
    assert "classification" not in seg and seg["segmentation"]["n"] == 3 and seg["segmentation"]["jaccard_le_dice"]
    acc = cls["classification"]["metrics"]["accuracy"]
    assert acc["baseline"] == 0.5 and acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert cls["classification"]["metrics"]["roc_auc"]["baseline"] == 0.5
    md = (out / "summary.md").read_text()
    assert "| metric | cls (n=4) | always normal |" in md and "seg (n=3)" in md and "dice_boxplot.png" in md
    for name in ("dice_boxplot", "roc", "reliability", "worst_cases"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 1000
        with Image.open(png) as img:
            assert img.format == "PNG" and min(img.size) > 100
    with h5py.File(out / "evaluation.h5") as h5:
        assert h5["cases/dice"].shape == (7,) and "datasets" in h5.attrs
    assert (out / "predictions.csv").is_file() and (out / "predictions" / "run.json").is_file()

    # an earlier predict report gives the same numbers without running the model again
    again = tmp_path / "again"
    res = _run(["evaluate", *datasets, "--predictions", out / "predictions.csv", "--out", again,
                "--bootstrap", "50", "--no-plots", "-q"])
    assert res.exit_code == 0, res.output
    assert [r["dice"] for r in read_rows(again / "per_case.csv")] == [r["dice"] for r in rows]
    assert json.loads((again / "summary.json").read_text())["datasets"] == summary["datasets"]
    assert not (again / "predictions.csv").exists() and not (again / "roc.png").exists()


def test_evaluate_hand_made_predictions(tmp_path, datasets):
    seg, cls = datasets
    pred_dir = tmp_path / "preds"
    write_mask_png(pred_dir / "masks" / "s0.png", _lung_mask(shift=0))  # perfect
    half = _lung_mask(shift=1)  # the reference of s1
    half[:32] = False
    write_mask_png(pred_dir / "masks" / "s1.png", half)
    rows = [
        {"source": seg / "s0.png", "status": "ok", "mask": "masks/s0.png"},
        {"source": seg / "s1.png", "status": "ok", "mask": "masks/s1.png"},
        {"source": seg / "s2.png", "status": "error", "error": "cannot read"},
        {"source": cls / "c0.png", "status": "ok", "p_pneumonia": 0.2, "label": "normal"},
        {"source": cls / "c1.png", "status": "ok", "p_pneumonia": 0.9, "label": "pneumonia"},
        {"source": cls / "c2.png", "status": "ok", "p_pneumonia": 0.4, "label": "normal"},
    ]  # c3 has no prediction at all
    columns = ["case_id", "source", "status", "error", "p_pneumonia", "label", "mask"]
    with open(pred_dir / "r.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({"case_id": str(r["source"].stem), **r} for r in rows)
    out = tmp_path / "report"
    res = _run(["evaluate", seg, cls, "--predictions", pred_dir / "r.csv", "--out", out, "--bootstrap", "0", "-q"])
    assert res.exit_code == 1  # one failed prediction, one missing
    by_id = {r["case_id"]: r for r in read_rows(out / "per_case.csv")}
    assert float(by_id["s0"]["dice"]) == 1.0 and float(by_id["s0"]["ahd"]) == 0.0
    # 2 x 32 x 20 reference pixels, the top half of them predicted: Dice 2/3, Jaccard 1/2
    assert float(by_id["s1"]["dice"]) == pytest.approx(2 / 3) and float(by_id["s1"]["jaccard"]) == pytest.approx(0.5)
    assert float(by_id["s1"]["precision"]) == 1.0 and float(by_id["s1"]["recall"]) == 0.5
    assert by_id["s2"]["status"] == "error" and by_id["c3"]["status"] == "missing"
    metrics = json.loads((out / "summary.json").read_text())["datasets"]["cls"]["classification"]["metrics"]
    assert metrics["accuracy"]["value"] == pytest.approx(2 / 3)  # c2 missed
    assert metrics["sensitivity"]["value"] == 0.5 and metrics["specificity"]["value"] == 1.0
    assert metrics["roc_auc"]["value"] == 1.0 and metrics["accuracy"]["ci_low"] is None
    assert metrics["accuracy"]["baseline"] == pytest.approx(2 / 3)  # always pneumonia: 2 of 3
    dice = json.loads((out / "summary.json").read_text())["datasets"]["seg"]["segmentation"]["metrics"]["dice"]
    assert dice["value"] == pytest.approx((1 + 2 / 3) / 2)
    assert json.loads((out / "summary.json").read_text())["datasets"]["cls"]["qa"] == {
        "flagged": 0, "share": 0.0, "by_flag": {}}


def test_evaluate_reports_quality_control(tmp_path, datasets):
    _, cls = datasets
    rows = [
        {"source": cls / "c0.png", "status": "ok", "p_pneumonia": 0.2, "label": "normal"},
        {"source": cls / "c1.png", "status": "ok", "p_pneumonia": 0.9, "label": "pneumonia"},
        {"source": cls / "c2.png", "status": "ok", "p_pneumonia": 0.4, "label": "uncertain",
         "qa_flags": "inverted;out_of_distribution"},
        {"source": cls / "c3.png", "status": "ok", "p_pneumonia": 0.3, "label": "normal",
         "qa_flags": "out_of_distribution"},
    ]
    columns = ["case_id", "source", "status", "error", "p_pneumonia", "label", "qa_flags", "mask"]
    with open(tmp_path / "r.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({"case_id": str(r["source"].stem), **r} for r in rows)
    out = tmp_path / "report"
    res = _run(["evaluate", cls, "--predictions", tmp_path / "r.csv", "--out", out, "--bootstrap", "0", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())["datasets"]["cls"]
    assert summary["qa"] == {"flagged": 2, "share": 0.5, "by_flag": {"inverted": 1, "out_of_distribution": 2}}
    # the uncertain c2 (truly pneumonia) is scored by its probability: 0.4, normal, wrong
    assert summary["classification"]["metrics"]["accuracy"]["value"] == pytest.approx(3 / 4)
    assert summary["without_flagged"]["classification"]["n"] == 2
    assert summary["without_flagged"]["classification"]["metrics"]["accuracy"]["value"] == 1.0
    by_id = {r["case_id"]: r for r in read_rows(out / "per_case.csv")}
    assert by_id["c2"]["qa_flags"] == "inverted;out_of_distribution"
    assert "## Quality control" in (out / "summary.md").read_text()


def test_evaluate_usage_errors(tmp_path, datasets):
    bare = tmp_path / "bare"
    save_png8(bare / "x.png", 64, 64)
    res = _run(["evaluate", bare, "--predictions", tmp_path / "none.csv", "--out", tmp_path / "r"])
    assert res.exit_code == 2 and "none.csv" in res.output
    (tmp_path / "p.csv").write_text("a,b\n1,2\n")
    res = _run(["evaluate", bare, "--predictions", tmp_path / "p.csv", "--out", tmp_path / "r"])
    assert res.exit_code == 2 and "neither masks/ nor labels.csv" in res.output
    res = _run(["evaluate", datasets[0], "--predictions", tmp_path / "p.csv", "--out", tmp_path / "r"])
    assert res.exit_code == 2 and "not a report written by `mmcli predict`" in res.output
    res = _run(["evaluate", datasets[0], "--out", tmp_path / "r.csv"])
    assert res.exit_code == 2 and "folder" in res.output


def test_dataset_of_symlinks(tmp_path, tiny_weights):
    import os

    from conftest import save_png8

    from mmcli.evaluation import find_references

    real = tmp_path / "real"
    save_png8(real / "a.png", 64, 64)
    save_png8(real / "masks" / "a.png", 64, 64)
    linked = tmp_path / "linked"
    (linked / "masks").mkdir(parents=True)
    os.symlink(real / "a.png", linked / "a.png")
    os.symlink(real / "masks" / "a.png", linked / "masks" / "a.png")
    refs = find_references(linked, "linked")
    assert [r.key for r in refs] == ["a"] and refs[0].mask is not None


def test_find_references_follows_the_folder_rule(tmp_path):
    from mmcli.errors import UsageError
    from mmcli.evaluation import Reference, find_references

    folder = tmp_path / "set"
    for rel in ("b.png", "c.png", "sub/a.png"):
        save_png8(folder / rel, 64, 64)
    write_mask_png(folder / "masks" / "sub" / "a.png", _lung_mask())
    (folder / "labels.csv").write_text("file,label\nb, Pneumonia\n")
    assert find_references(folder, "d") == [  # c has neither: left out
        Reference("d", (folder / "b.png").resolve(), "b", "pneumonia", None),
        Reference("d", (folder / "sub" / "a.png").resolve(), "sub/a", None, folder / "masks" / "sub" / "a.png"),
    ]
    (folder / "labels.csv").write_text("file,label\nb.png,covid\n")
    with pytest.raises(UsageError, match=r"labels\.csv: label 'covid' of 'b\.png' is not one of normal, pneumonia"):
        find_references(folder, "d")
    (folder / "labels.csv").write_text("file,label\nnone.png,normal\n")
    (folder / "masks" / "sub" / "a.png").unlink()
    with pytest.raises(UsageError, match="No image of .* has a mask in masks/<stem>.png or a row in labels.csv"):
        find_references(folder, "d")
    with pytest.raises(UsageError, match="is not a folder"):
        find_references(tmp_path / "nope", "d")


def test_long_case_ids_are_shortened_in_figure_titles():
    from mmcli.plots import _shorten

    long = "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-day-3"
    short = _shorten(long)
    assert len(short) == 38 and short.startswith("covid-19-rapidly-p") and short.endswith("ards-day-3")
    assert "\u2026" in short and _shorten("seg-in: JPCLN016") == "seg-in: JPCLN016"
