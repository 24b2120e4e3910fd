"""The run skeleton shared by predict and explain: lock, resume rules, fail-fast, one summary."""

import json
import os
import re
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import rows_by_case, save_png8
from typer.testing import CliRunner

from mmcli.batch import _settings_changes
from mmcli.cli import app
from mmcli.errors import UsageError
from mmcli.explain import ExplainConfig, open_explain
from mmcli.io.runfolder import RunLayout, RunLock
from mmcli.predict import PredictConfig, open_predict, run_predict
from mmcli.runtime import resolve_precision

runner = CliRunner()


@pytest.fixture()
def scans(tmp_path):
    for i in range(4):
        save_png8(tmp_path / "scans" / f"s{i}.png", 64 + 3 * i, 64, seed=i)
    (tmp_path / "scans" / "bad.png").write_text("not an image")
    return tmp_path / "scans"


def test_predict_and_explain_agree(tmp_path, scans, tiny_weights):
    # one Predictor, one precision policy: the same probabilities and labels from both commands
    run_predict(PredictConfig(inputs=(str(scans),), out=tmp_path / "p.csv", weights=str(tiny_weights),
                              device="cpu"))
    open_explain(ExplainConfig(inputs=(str(scans),), out=tmp_path / "e", weights=str(tiny_weights), device="cpu")).run()
    pred, expl = rows_by_case(tmp_path / "p.csv"), rows_by_case(tmp_path / "e" / "explain.csv")
    assert pred.keys() == expl.keys()
    for case_id, row in pred.items():
        assert row["status"] == expl[case_id]["status"]
        if row["status"] == "ok":
            assert float(row["p_pneumonia"]) == pytest.approx(float(expl[case_id]["p_pneumonia"]), abs=1e-5)
            assert row["label"] == expl[case_id]["label"]
    for name in ("p", "e"):  # both run.json files come from one writer
        manifest = json.loads((tmp_path / name / "run.json").read_text())
        counts = {k: v for k, v in manifest["counts"].items() if k != "flagged"}
        assert counts == {"total": 5, "ok": 4, "failed": 1, "skipped": 0, "resumed": 0}
        assert 0 <= manifest["counts"]["flagged"] <= 4
        assert manifest["precision"] == resolve_precision("auto", torch.device("cpu"))
        assert manifest["provenance"]["model"] == "multimix_tiny"


def test_explain_runs_on_the_cpu_worker_engine(tmp_path, scans, tiny_weights):
    run = open_explain(ExplainConfig(inputs=(str(scans),), out=tmp_path / "e", weights=str(tiny_weights),
                                     device="cpu", workers=2))
    assert run.engine.__name__ == "iter_rows_processes"
    summary = run.run()
    assert summary.ok == 4 and summary.failed == 1
    with h5py.File(tmp_path / "e" / "maps.h5") as h5:
        assert set(h5["saliency"]) == {f"s{i}" for i in range(4)}


def test_fail_fast_skips_the_rest_in_explain(tmp_path, scans, tiny_weights):
    (scans / "a_bad.png").write_text("broken, and first in order")
    summary = open_explain(ExplainConfig(inputs=(str(scans),), out=tmp_path / "e", weights=str(tiny_weights),
                                         device="cpu", workers=0, batch_size=1, fail_fast=True)).run()
    rows = rows_by_case(tmp_path / "e" / "explain.csv")
    assert rows["a_bad"]["status"] == "error" and summary.failed == 1
    assert summary.skipped == 5 and all(r["status"] == "skipped" for k, r in rows.items() if k != "a_bad")


def test_resume_refusal_names_what_changed(tmp_path, scans, tiny_weights):
    cfg = PredictConfig(inputs=(str(scans),), out=tmp_path / "r.csv", weights=str(tiny_weights), device="cpu",
                        precision="fp32")
    run_predict(cfg)
    # a threshold alone relabels (test_no_clobber.py); with any other change the rerun is refused
    with pytest.raises(UsageError, match=r"threshold 0\.5 -> 0\.7, voi_lut False -> True"):
        open_predict(PredictConfig(**{**cfg.__dict__, "threshold": 0.7, "voi_lut": True}))
    with pytest.raises(UsageError, match=r"precision 'fp32' -> 'bf16'"):
        open_predict(PredictConfig(**{**cfg.__dict__, "precision": "bf16"}))
    assert _settings_changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == "b 2 -> 3, c None -> 4"


def test_a_second_run_into_the_same_out_is_refused(tmp_path, scans, tiny_weights):
    # another process holds the lock for the whole run: the second run exits 2 at once, naming it
    layout = RunLayout.for_report(tmp_path / "r.csv")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mmcli.io.runfolder import RunLock
        RunLock(Path({str(layout.lock)!r}), Path("r.csv")).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights)])
        assert res.exit_code == 2
        assert f"another mmcli run (pid {holder.pid}) is writing" in res.output
        assert not (tmp_path / "r.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights), "-q"])
    assert res.exit_code == 1 and (tmp_path / "r.csv").is_file()  # the lock died with its holder


def test_lock_is_released_after_a_run_and_after_an_interrupt(tmp_path, scans, tiny_weights):
    (scans / "bad.png").unlink()
    cfg = PredictConfig(inputs=(str(scans),), out=tmp_path / "r.csv", weights=str(tiny_weights), workers=0,
                        batch_size=1)
    run = open_predict(cfg)
    for _ in run:
        break  # the caller stops (Ctrl-C): the generator closes
    del run
    lock = RunLock(RunLayout.for_report(cfg.out).lock, cfg.out)
    lock.acquire()  # free again
    lock.release()
    assert not cfg.out.exists()  # a stopped run writes no report
    assert run_predict(cfg).resumed == 1


def test_plain_progress_lines_without_a_terminal(tmp_path, scans, tiny_weights):
    res = runner.invoke(app, ["explain", str(scans), "--out", str(tmp_path / "e"), "-w", str(tiny_weights)])
    lines = [line for line in res.output.splitlines() if line.startswith("explain: ")]
    assert lines[-1] == "explain: 5/5 done, 1 failed"
    assert re.search(r"4 ok( \(\d flagged by quality control\))?, 1 failed, 0 skipped \(0 resumed\)", res.output)


@pytest.mark.parametrize("command", ["predict", "explain", "evaluate", "train"])
def test_help_shows_no_python_type_placeholders(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for placeholder in ("<bool>", "<int", "<float", "<str>", "<path>", "<list"):
        assert placeholder not in res.output, placeholder
    assert os.linesep.join(res.output.splitlines())  # not empty


@pytest.mark.parametrize("command", ["predict", "explain", "evaluate", "train", "merge", "report"])
def test_help_paragraphs_wrap_to_the_terminal(command):
    """A docstring's line breaks are not kept: at 80 columns no help line is cut short mid-paragraph."""
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0
    text = res.output.split("╭")[0]  # the description, before the option panels
    lines = [line.strip() for line in text.splitlines()]
    for this, following in zip(lines, lines[1:], strict=False):
        if this and following and not this.startswith("Usage:"):
            assert len(this) > 60, (this, following)  # a full line, wrapped at the terminal's width


def test_a_replaced_input_is_predicted_again(tmp_path, scans, tiny_weights):
    out = tmp_path / "r.csv"
    cfg = PredictConfig(inputs=(str(scans),), out=out, weights=str(tiny_weights), device="cpu", workers=0)
    run_predict(cfg)
    before = rows_by_case(out)
    save_png8(scans / "s1.png", 90, 80, seed=9)  # same name, other image
    summary = run_predict(cfg)
    assert summary.resumed == 3  # s0, s2, s3 kept; s1 recomputed; bad.png retried
    after = rows_by_case(out)
    assert (after["s1"]["height"], after["s1"]["width"]) == ("90", "80") != (before["s1"]["height"], "64")
    assert after["s0"] == before["s0"]


def test_verify_inputs_compares_content_not_mtime(tmp_path, scans, tiny_weights):
    out = tmp_path / "r.csv"
    cfg = PredictConfig(inputs=(str(scans),), out=out, weights=str(tiny_weights), device="cpu", workers=0,
                        verify_inputs=True)
    run_predict(cfg)
    os.utime(scans / "s0.png", ns=(1, 1))  # touched (e.g. copied), same bytes: still done
    data = bytearray((scans / "s2.png").read_bytes())
    stat = (scans / "s2.png").stat()
    data[-20] ^= 0xFF  # one byte changed, size and mtime kept: only the sha256 sees it
    (scans / "s2.png").write_bytes(bytes(data))
    os.utime(scans / "s2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    summary = run_predict(cfg)
    assert summary.resumed == 3  # s0, s1, s3; s2 is predicted again (and now fails: a corrupt PNG)
    assert rows_by_case(out)["s2"]["status"] == "error"


def test_anonymized_ids_keep_no_file_name_and_map_back(tmp_path, scans, tiny_weights):
    (scans / "DOE_JANE_19700101.png").write_bytes((scans / "s0.png").read_bytes())
    mapping = tmp_path / "private" / "ids.json"
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.h5"), "-w", str(tiny_weights),
                              "--anonymize-ids", str(mapping), "-q", "-j", "0"])
    assert res.exit_code == 1  # bad.png
    everything = b"".join(p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file())
    everything += (tmp_path / "r.h5").read_bytes() + res.output.encode()
    assert b"DOE_JANE" not in everything and str(scans).encode() not in everything
    with h5py.File(tmp_path / "r.h5") as h5:
        ids = [s.decode() for s in h5["cases/case_id"][()]]
        assert set(h5["masks"]) <= set(ids) and all(len(i) == 20 for i in ids)
        assert np.isnan(h5["cases/source"][()]).all()  # a column with no value at all is stored as NaN
    table = json.loads(mapping.read_text())["cases"]
    assert {v["case_id"] for v in table.values()} == {"bad", "DOE_JANE_19700101", "s0", "s1", "s2", "s3"}
    assert mapping.stat().st_mode & 0o777 == 0o600
    res = runner.invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.h5"), "-w", str(tiny_weights),
                              "--anonymize-ids", str(mapping), "-j", "0"])
    assert "(5 resumed)" in res.output  # the same mapping gives the same ids
