"""Outputs never clobber a user's files; reruns remove only what the earlier run recorded, and a
rerun whose only change is ``--threshold`` relabels the stored probabilities without the model."""

import json
import shutil

import h5py
import pytest
from conftest import DATA, rows_by_case, save_png8
from typer.testing import CliRunner

import mmcli.inference
from mmcli.cli import app
from mmcli.io.writers import write_mask_png

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_line(res):
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture()
def scans(tmp_path):
    for i in range(3):
        save_png8(tmp_path / "scans" / f"s{i}.png", 64 + 4 * i, 64, seed=i)
    return tmp_path / "scans"


@pytest.mark.parametrize("name", ["mydata.csv", "data/labels.csv", "table.h5"])
def test_predict_never_replaces_a_file_it_did_not_write(tmp_path, scans, tiny_weights, name):
    mine = tmp_path / name
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("file,label\nc0.png,normal\n")
    for extra in ([], ["--overwrite"]):
        res = _run("predict", scans, "--out", mine, "-w", tiny_weights, "-j", "0", *extra)
        assert res.exit_code == 2
        assert str(mine) in _one_line(res) and "not a report of an earlier `mmcli predict` run" in res.output
    assert mine.read_text() == "file,label\nc0.png,normal\n"
    assert not mine.with_suffix("").exists()  # refused before anything was written
    other = tmp_path / "mine.h5"
    other.write_bytes(b"not mmcli's")
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights, "--hdf5", other, "--overwrite")
    assert res.exit_code == 2 and str(other) in res.output and other.read_bytes() == b"not mmcli's"


def test_a_run_folder_holding_other_files_is_refused(tmp_path, scans, tiny_weights):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights, "--overwrite")
    assert res.exit_code == 2 and "notes.txt" in _one_line(res)
    assert not (tmp_path / "r.csv").exists() and sorted(p.name for p in (tmp_path / "r").iterdir()) == ["notes.txt"]
    # an explain folder is no predict run folder either, nor a predict run folder an explain folder
    assert _run("explain", scans, "--out", tmp_path / "e", "-w", tiny_weights, "-j", "0", "-q").exit_code == 0
    res = _run("predict", scans, "--out", tmp_path / "e.csv", "-w", tiny_weights, "--overwrite")
    assert res.exit_code == 2 and "no earlier `mmcli predict` run wrote" in res.output
    assert _run("predict", scans, "--out", tmp_path / "p.csv", "-w", tiny_weights, "-j", "0", "-q").exit_code == 0
    res = _run("explain", scans, "--out", tmp_path / "p", "-w", tiny_weights, "--overwrite")
    assert res.exit_code == 2 and "no earlier `mmcli explain` run wrote" in res.output


def test_own_reports_are_recognised_without_their_run_folder(tmp_path, scans, tiny_weights):
    out = tmp_path / "r.csv"
    assert _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q").exit_code == 0
    shutil.rmtree(tmp_path / "r")  # the report alone: known by its exact header row
    assert _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q").exit_code == 0


def test_overwrite_removes_only_what_the_earlier_run_recorded(tmp_path, scans, tiny_weights):
    out, extra = tmp_path / "r.csv", tmp_path / "extra.h5"
    res = _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q", "--hdf5", extra)
    assert res.exit_code == 0
    masks = tmp_path / "r" / "masks"
    assert sorted(p.name for p in masks.iterdir()) == ["s0.png", "s1.png", "s2.png"]
    write_mask_png(masks / "mine.png", [[True]])  # the user's own files in the run folder
    (tmp_path / "r" / "notes.txt").write_text("mine")
    (scans / "s2.png").unlink()
    res = _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q", "--overwrite")
    assert res.exit_code == 0
    assert sorted(p.name for p in masks.iterdir()) == ["mine.png", "s0.png", "s1.png"]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert not extra.exists()  # the earlier run's --hdf5 report, which this run does not write
    assert list(rows_by_case(out)) == ["s0", "s1"]
    # a plain rerun without a case drops its mask too: the folder holds one run
    (scans / "s1.png").unlink()
    assert _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q").exit_code == 0
    assert sorted(p.name for p in masks.iterdir()) == ["mine.png", "s0.png"]


def test_explain_overwrite_removes_the_pictures_of_dropped_cases(tmp_path, scans, tiny_weights):
    out = tmp_path / "e"
    assert _run("explain", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q").exit_code == 0
    (out / "saliency" / "mine.png").write_bytes(b"mine")
    (scans / "s0.png").unlink()
    assert _run("explain", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (out / "saliency").iterdir()) == ["mine.png", "s1.png", "s2.png"]
    assert sorted(p.name for p in (out / "gradcam").iterdir()) == ["s1.png", "s2.png"]
    with h5py.File(out / "maps.h5") as h5:
        assert set(h5["saliency"]) == {"s1", "s2"}


def test_evaluate_refuses_a_folder_and_hdf5_it_did_not_write(tmp_path, scans, tiny_weights):
    data = tmp_path / "set"
    for i in range(2):
        save_png8(data / f"c{i}.png", 64, 64, seed=i)
    (data / "labels.csv").write_text("file,label\nc0.png,normal\nc1.png,pneumonia\n")
    args = ["evaluate", data, "-w", tiny_weights, "-j", "0", "--bootstrap", "0", "--no-plots", "-q"]
    res = _run(*args, "--out", scans, "--overwrite")
    assert res.exit_code == 2 and str(scans) in _one_line(res)
    assert sorted(p.name for p in scans.iterdir()) == ["s0.png", "s1.png", "s2.png"]
    mine = tmp_path / "mine.h5"
    mine.write_bytes(b"mine")
    res = _run(*args, "--out", tmp_path / "ev", "--hdf5", mine)
    assert res.exit_code == 2 and str(mine) in res.output and mine.read_bytes() == b"mine"
    assert not (tmp_path / "ev").exists()
    for _ in range(2):  # an earlier evaluation's folder and HDF5 report are its own
        assert _run(*args, "--out", tmp_path / "ev", "--hdf5", tmp_path / "ev.h5").exit_code == 0
    # figures of the earlier evaluation that a rerun does not draw go; a user's picture stays
    args[args.index("--no-plots")] = "--plots"
    assert _run(*args, "--out", tmp_path / "ev").exit_code == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["figures"] == ["roc.png", "reliability.png"]
    (tmp_path / "ev" / "mine.png").write_bytes(b"mine")
    args[args.index("--plots")] = "--no-plots"
    assert _run(*args, "--out", tmp_path / "ev").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "ev").glob("*.png")) == ["mine.png"]


def test_out_whose_run_folder_is_the_input_folder_is_refused(tmp_path, scans, tiny_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _run("predict", "scans", "--out", "scans.csv", "-w", tiny_weights)
    assert res.exit_code == 2
    line = _one_line(res)
    assert f"--out scans.csv would put its run folder {scans} on the input folder scans; choose another name" in line
    res = _run("predict", "scans/s0.png", "--out", "scans.csv", "-w", tiny_weights)
    assert res.exit_code == 2 and "around the input scans/s0.png" in res.output
    res = _run("explain", "scans", "--out", "scans", "-w", tiny_weights)
    assert res.exit_code == 2 and "on the input folder scans" in res.output
    assert sorted(p.name for p in scans.iterdir()) == ["s0.png", "s1.png", "s2.png"]  # nothing written there


def _no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(mmcli.inference.Predictor, "predict", refuse)


def test_a_threshold_change_relabels_without_the_model(tmp_path, scans, tiny_weights, monkeypatch):
    save_png8(scans / "s3.png", 64, 64, seed=3)
    out = tmp_path / "r.csv"
    base = ["predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-q"]
    assert _run(*base, "--threshold", "0").exit_code == 0
    first = rows_by_case(out)
    masks = {p: p.stat().st_mtime_ns for p in (tmp_path / "r" / "masks").iterdir()}
    _no_model(monkeypatch)
    for threshold, label in (("1", "normal"), ("0", "pneumonia")):
        res = _run(*base[:-1], "--threshold", threshold)
        assert res.exit_code == 0, res.output
        assert "(4 resumed)" in res.output
        rows = rows_by_case(out)
        for case_id, row in rows.items():
            assert row["p_pneumonia"] == first[case_id]["p_pneumonia"]
            # quality control's "uncertain" stays; every other label follows the threshold
            assert row["label"] == ("uncertain" if first[case_id]["label"] == "uncertain" else label)
        assert json.loads((tmp_path / "r" / "run.json").read_text())["settings"]["threshold"] == float(threshold)
        header = json.loads((tmp_path / "r" / "journal.jsonl").read_text().splitlines()[0])["header"]
        assert header["threshold"] == float(threshold)
    assert {p: p.stat().st_mtime_ns for p in masks} == masks  # nothing recomputed or rewritten
    res = _run(*base, "--threshold", "0.3", "--voi-lut")  # any other change still needs --overwrite
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_a_threshold_change_rewrites_the_dicom_sr(tmp_path, tiny_weights, monkeypatch):
    hd = pytest.importorskip("highdicom")
    scans = tmp_path / "dicom"
    scans.mkdir()
    shutil.copy(DATA / "dicom" / "cxr.dcm", scans / "cxr.dcm")
    base = ["predict", scans, "-w", tiny_weights, "-j", "0", "-q", "--qa", "off", "--dicom-seg", "--dicom-sr"]
    out = tmp_path / "r.csv"
    assert _run(*base, "--out", out, "--threshold", "0").exit_code == 0
    fresh = tmp_path / "fresh.csv"
    assert _run(*base, "--out", fresh, "--threshold", "1").exit_code == 0

    def finding(path):
        [group] = hd.sr.srread(path).content.get_image_measurement_groups()
        return group.finding_type.value

    row = rows_by_case(out)["cxr"]
    assert row["label"] == "pneumonia" and finding(tmp_path / row["dicom_sr"]) == "233604007"
    seg = tmp_path / row["dicom_seg"]
    seg_bytes = seg.read_bytes()
    _no_model(monkeypatch)
    assert _run(*base, "--out", out, "--threshold", "1").exit_code == 0
    row = rows_by_case(out)["cxr"]
    assert row["label"] == "normal" and finding(tmp_path / row["dicom_sr"]) == "17621005"
    assert seg.read_bytes() == seg_bytes
    # the same bytes as a fresh run at that threshold, its reference to the SEG included
    assert (tmp_path / row["dicom_sr"]).read_bytes() == (tmp_path / rows_by_case(fresh)["cxr"]["dicom_sr"]).read_bytes()
