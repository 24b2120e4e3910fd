import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import DATA, make_checkpoint, make_dicom, radiograph_like, save_png8, save_png16
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage
from typer.testing import CliRunner

import mmcli.weights
from mmcli import __version__
from mmcli.cli import app
from mmcli.predict import PredictConfig, run_predict

runner = CliRunner()


@pytest.fixture()
def scans(tmp_path):
    root = tmp_path / "scans"
    save_png8(root / "a" / "x.png", 90, 70, seed=1)
    save_png8(root / "b" / "x.png", 64, 64, seed=2)
    save_png16(root / "c16.png", 120, 100, seed=3)
    Image.fromarray((radiograph_like(50, 60, 4) * 255).astype(np.uint8)).convert("RGB").save(root / "rgb.jpg")
    make_dicom(root / "IM0001", (radiograph_like(96, 80) * 4095).astype(np.uint16),  # DICOM without suffix
               sop_class=SecondaryCaptureImageStorage, pixel_spacing=[0.2, 0.25],
               PatientName="DOE^JANE", PatientID="PID-98765", PatientBirthDate="19700101")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "a" / "x.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def _run(args, **kw):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)


def test_version_and_help():
    assert _run(["--version"]).output.strip() == f"mmcli {__version__}"
    out = _run(["--help"]).output
    for cmd in ("train", "predict", "evaluate", "explain"):
        assert cmd in out


def test_predict_without_weights_explains_how_to_get_them(tmp_path, scans, monkeypatch):
    monkeypatch.delenv("MMCLI_WEIGHTS", raising=False)
    monkeypatch.setattr(mmcli.weights, "WEIGHTS_DIRS", (tmp_path / "no-weights",))
    res = _run(["predict", scans, "--out", tmp_path / "r.csv", "-q"])
    assert res.exit_code == 2
    assert "--weights PATH" in res.output and "MMCLI_WEIGHTS" in res.output
    assert not (tmp_path / "r.csv").exists()


def test_predict_end_to_end(tmp_path, scans, tiny_weights):
    out = tmp_path / "out" / "results.csv"
    res = _run(["predict", scans, "--out", out, "--weights", tiny_weights, "-q", "-b", "3", "-j", "0"])
    assert res.exit_code == 1, res.output  # three bad files
    df = pd.read_csv(out, dtype={"case_id": str})
    assert list(df.case_id) == ["IM0001", "a/x", "b/x", "c16", "empty", "rgb", "text", "truncated"]
    status = dict(zip(df.case_id, df.status, strict=True))
    assert [k for k, v in status.items() if v == "error"] == ["empty", "text", "truncated"]
    errors = dict(zip(df.case_id, df.error, strict=True))
    assert "empty" in errors["empty"] and "truncated" in errors["truncated"].lower()
    ok = df[df.status == "ok"].set_index("case_id")
    assert ((ok.p_pneumonia >= 0) & (ok.p_pneumonia <= 1)).all()
    assert set(ok.label) <= {"normal", "pneumonia", "uncertain"}  # synthetic images may be flagged
    assert ok[ok.label == "uncertain"].qa_flags.notna().all()
    sure = ok[ok.label != "uncertain"]
    assert (sure.label == np.where(sure.p_pneumonia >= 0.5, "pneumonia", "normal")).all()
    # masks at native resolution, fraction consistent with the mask file
    for _, row in ok.iterrows():
        mask = np.asarray(Image.open(out.parent / row["mask"])) > 0
        assert mask.shape == (row.height, row.width)
        assert mask.mean() == pytest.approx(row.lung_fraction, abs=1e-6)
    assert (ok.loc["IM0001", ["height", "width"]] == [96, 80]).all()
    spacing_area = ok.loc["IM0001", "lung_fraction"] * 96 * 80 * 0.2 * 0.25
    assert ok.loc["IM0001", "lung_area_mm2"] == pytest.approx(spacing_area, rel=1e-4)
    assert np.isnan(ok.loc["a/x", "lung_area_mm2"])
    manifest = json.loads((out.parent / "results" / "run.json").read_text())
    flagged = int(ok.qa_flags.notna().sum())
    assert manifest["counts"] == {"total": 8, "ok": 5, "flagged": flagged, "failed": 3, "skipped": 0, "resumed": 0}
    assert manifest["provenance"]["weights_sha256"]
    # no patient identifier anywhere in the outputs
    for f in out.parent.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert b"DOE" not in blob and b"PID-98765" not in blob and b"19700101" not in blob


def test_predict_gives_the_same_bytes_twice(tmp_path, scans, tiny_weights):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for out in (a, b):
        _run(["predict", scans, "--out", out, "-w", tiny_weights, "-q"])
    assert a.read_text().replace("a/masks", "X") == b.read_text().replace("b/masks", "X")
    for mask in (tmp_path / "a" / "masks").rglob("*.png"):
        assert mask.read_bytes() == (tmp_path / "b" / "masks" / mask.relative_to(tmp_path / "a" / "masks")).read_bytes()


def test_predict_is_deterministic_and_batch_independent(tmp_path, scans, tiny_weights):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    # float32: the tiny random model's mask logits sit near 0, where bf16 rounding in a
    # mixed decoder flips pixels (test_precision checks mixed with the shipped weights)
    _run(["predict", scans, "--out", a, "-w", tiny_weights, "-q", "-b", "1", "-j", "0", "--precision", "fp32"])
    _run(["predict", scans, "--out", b, "-w", tiny_weights, "-q", "-b", "8", "-j", "2", "--precision", "fp32"])
    da, db = pd.read_csv(a), pd.read_csv(b)
    assert np.allclose(da.p_pneumonia, db.p_pneumonia, atol=1e-5, equal_nan=True)
    for m in da["mask"].dropna():
        ma, mb = np.asarray(Image.open(tmp_path / m)), np.asarray(Image.open(tmp_path / m.replace("a/", "b/", 1)))
        assert (ma == mb).mean() > 0.999


def test_hdf5_report(tmp_path, scans, tiny_weights):
    out = tmp_path / "results.h5"
    res = _run(["predict", scans, "--out", out, "-w", tiny_weights, "-q", "--hdf5", tmp_path / "extra.h5"])
    assert res.exit_code == 1
    for path in (out, tmp_path / "extra.h5"):
        with h5py.File(path) as h5:
            ids = [s.decode() for s in h5["cases/case_id"][()]]
            assert len(ids) == 8 and "a/x" in ids
            assert h5["masks/IM0001"].shape == (96, 80)
            assert h5["masks/IM0001"].compression == "gzip"
            assert "empty" not in h5["masks"]
            assert h5.attrs["mmcli_version"] == __version__ and len(h5.attrs["weights_sha256"]) == 64
            assert np.isfinite(h5["cases/p_pneumonia"][()]).sum() == 5


def test_resume_after_kill_and_rerun(tmp_path, scans, tiny_weights):
    out = tmp_path / "r.csv"
    cfg = PredictConfig(inputs=(str(scans),), out=out, weights=str(tiny_weights), batch_size=1, workers=0)
    seen = []

    def killer(row):
        seen.append(row["case_id"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_predict(cfg, on_case=killer)
    assert not out.exists()  # no half-written report
    summary = run_predict(cfg)
    assert summary.resumed == 3 and summary.total == 8 and summary.ok == 5 and summary.failed == 3
    first = pd.read_csv(out)
    mask = tmp_path / first["mask"].dropna().iloc[0]
    mtime = mask.stat().st_mtime_ns
    summary = run_predict(cfg)  # everything ok is skipped; the errors are tried again
    assert summary.resumed == 5 and mask.stat().st_mtime_ns == mtime
    assert pd.read_csv(out).equals(first)


def test_resume_with_other_weights_needs_overwrite(tmp_path, scans, tiny_weights):
    out = tmp_path / "r.csv"
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    _run(["predict", scans, "--out", out, "-w", tiny_weights, "-q"])
    res = _run(["predict", scans, "--out", out, "-w", other, "-q"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = _run(["predict", scans, "--out", out, "-w", other, "-q", "--overwrite"])
    assert res.exit_code == 1
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert manifest["counts"]["resumed"] == 0


def test_fail_fast_marks_the_rest_skipped(tmp_path, scans, tiny_weights):
    out = tmp_path / "r.csv"
    res = _run(["predict", scans, "--out", out, "-w", tiny_weights, "-q", "-b", "1", "-j", "0", "--fail-fast"])
    assert res.exit_code == 1
    df = pd.read_csv(out)
    assert list(df.status[:5]) == ["ok"] * 4 + ["error"]
    assert set(df.status[5:]) == {"skipped"}


def test_usage_errors_exit_2(tmp_path, tiny_weights):
    (tmp_path / "empty").mkdir()
    res = _run(["predict", tmp_path / "empty", "--out", tmp_path / "r.csv", "-w", tiny_weights])
    assert res.exit_code == 2 and "Found 0 images" in res.output
    res = _run(["predict", tmp_path / "nowhere", "--out", tmp_path / "r.csv", "-w", tiny_weights])
    assert res.exit_code == 2
    res = _run(["predict", tmp_path, "--out", tmp_path / "r.txt", "-w", tiny_weights])
    assert res.exit_code == 2 and ".csv" in res.output
    res = _run(["predict", tmp_path, "--out", tmp_path / "r.csv", "-w", tmp_path / "nope.pt"])
    assert res.exit_code == 2
    assert _run(["predict", tmp_path, "--out", tmp_path / "r.csv", "--batch-size", "0"]).exit_code == 2


def test_real_dicoms_masks_at_native_size(tmp_path, tiny_weights):
    scans = tmp_path / "dicom"
    scans.mkdir()
    shutil.copy(DATA / "dicom" / "cxr.dcm", scans / "cxr.dcm")
    shutil.copy(DATA / "dicom" / "RG1_J2KI.dcm", scans / "RG1_J2KI.dcm")
    out = tmp_path / "r.csv"
    res = _run(["predict", scans, "--out", out, "-w", tiny_weights, "-q"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out).set_index("case_id")
    assert (df.loc["cxr", ["height", "width"]] == [2140, 1760]).all()
    assert Image.open(tmp_path / df.loc["cxr", "mask"]).size == (1760, 2140)
    assert (df.loc["RG1_J2KI", ["height", "width"]] == [1955, 1841]).all()


def test_errors_are_one_line_and_not_read_as_markup(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCLI_WEIGHTS", raising=False)
    monkeypatch.setattr(mmcli.weights, "WEIGHTS_DIRS", (tmp_path / "no-weights",))
    weird = tmp_path / "[bold]scans"
    save_png8(weird / "x.png", 32, 32)
    res = _run(["predict", weird, "--out", tmp_path / "r.csv"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: No default weights")
    res = _run(["predict", weird / "missing.png", "--out", tmp_path / "r.csv"])
    assert "[bold]scans" in res.output
