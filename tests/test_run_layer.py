"""The run layer: every command's run.json in one schema, written through one place, and the same
checks before any work (a foreign file or folder refused, never replaced)."""

import json
from pathlib import Path

import pytest
from conftest import save_png8
from test_train_data import make_folders
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.errors import UsageError
from mmcli.io.runfolder import REPORT_FORMATS, RUN_SCHEMA, RunLayout, is_hdf5, report_format, run_record

runner = CliRunner()
ENVELOPE = {"schema", "mmcli_command", "mmcli_version", "command", "settings", "status", "created", "versions",
            "seconds", "counts", "outputs"}


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _manifest(folder):
    return json.loads((folder / "run.json").read_text(encoding="utf-8"))


def test_report_formats_are_one_table():
    assert REPORT_FORMATS == {".csv": "csv", ".h5": "hdf5", ".hdf5": "hdf5"}
    tmp = Path("/x")
    assert [report_format(tmp / name) for name in ("a.CSV", "b.h5", "c.HDF5")] == ["csv", "hdf5", "hdf5"]
    assert RunLayout.for_report(tmp / "r.csv").folder == tmp / "r"
    assert is_hdf5(tmp / "r.Hdf5") and not is_hdf5(tmp / "r.csv")
    with pytest.raises(UsageError, match=r"--out must end in .csv, .h5 or .hdf5, got 'r.json'"):
        report_format(tmp / "r.json")


def test_run_record_has_the_envelope_first_and_the_command_s_own_after():
    record = run_record("predict", argv=["mmcli", "predict"], settings={"a": 1}, status="finished", seconds=1.23456,
                        counts={"total": 2}, outputs={"folder": "/f"}, provenance={"weights": "w"})
    assert list(record)[: len(ENVELOPE)] == ["schema", "mmcli_command", "mmcli_version", "command", "settings",
                                              "status", "created", "versions", "seconds", "counts", "outputs"]
    assert record["schema"] == RUN_SCHEMA == 1 and record["seconds"] == 1.235
    assert record["provenance"] == {"weights": "w"}
    assert set(record["versions"]) == {"python", "torch", "platform"}


@pytest.mark.usefixtures("one_thread")
def test_every_command_writes_run_json_in_one_schema(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    for i in range(3):
        save_png8(scans / f"s{i}.png", 72, 64, seed=i)
    common = ["-w", tiny_weights, "-q", "--workers", "0"]
    assert _run("predict", scans, "--out", tmp_path / "r.csv", *common).exit_code == 0
    assert _run("explain", scans, "--out", tmp_path / "why", *common).exit_code == 0
    for k in range(2):
        assert _run("predict", scans, "--out", tmp_path / "p.csv", "--shard", f"{k}/2", *common).exit_code == 0
    assert _run("merge", tmp_path / "p.shard-0-of-2.csv", tmp_path / "p.shard-1-of-2.csv",
                "--out", tmp_path / "m.csv", "-q").exit_code == 0
    seg, cls = make_folders(tmp_path / "data", n_seg=4, n_cls=6)
    assert _run("evaluate", seg, cls, "--out", tmp_path / "eval", "--no-plots", *common).exit_code == 0
    assert _run("train", "--seg-data", seg, "--cls-data", cls, "--out", tmp_path / "train", "--arch", "tiny",
                "--image-size", "64", "--batch-size", "2", "--steps-per-epoch", "1", "--epochs", "1",
                "--val-fraction", "0.34", "--device", "cpu", "-j", "0", "-q", "--no-calibrate").exit_code == 0
    runs = {"predict": tmp_path / "r", "explain": tmp_path / "why", "merge": tmp_path / "m",
            "evaluate": tmp_path / "eval", "train": tmp_path / "train"}
    for command, folder in runs.items():
        manifest = _manifest(folder)
        assert set(manifest) >= ENVELOPE, (command, ENVELOPE - set(manifest))
        assert manifest["mmcli_command"] == command and manifest["status"] == "finished", command
        assert manifest["command"][-1] and manifest["outputs"]["folder"] == str(folder.resolve()), command
    assert _manifest(runs["merge"])["counts"]["total"] == _manifest(runs["predict"])["counts"]["total"] == 3
    assert _manifest(runs["evaluate"])["counts"]["total"] == 10
    assert _manifest(runs["train"])["settings"]["epochs"] == 1


def test_merge_never_replaces_a_file_it_did_not_write(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    for i in range(2):
        save_png8(scans / f"s{i}.png", 72, 64, seed=i)
    for k in range(2):
        assert _run("predict", scans, "--out", tmp_path / "p.csv", "--shard", f"{k}/2", "-w", tiny_weights, "-q",
                    "--workers", "0").exit_code == 0
    mine = tmp_path / "mine.csv"
    mine.write_text("patient,notes\n1,keep me\n")
    res = _run("merge", tmp_path / "p.shard-0-of-2.csv", tmp_path / "p.shard-1-of-2.csv", "--out", mine)
    assert res.exit_code == 2 and "mine.csv" in res.output and "did not write" in res.output
    assert mine.read_text() == "patient,notes\n1,keep me\n" and not (tmp_path / "mine").exists()
    res = _run("merge", tmp_path / "p.shard-0-of-2.csv", tmp_path / "p.shard-1-of-2.csv", "--out", tmp_path / "m.csv")
    assert res.exit_code == 0  # a merge's own outputs are replaced by the next merge
    assert _run("merge", tmp_path / "p.shard-0-of-2.csv", tmp_path / "p.shard-1-of-2.csv", "--out",
                tmp_path / "m.csv").exit_code == 0


def test_train_refuses_a_folder_of_someone_else_s_files(tmp_path):
    seg, cls = make_folders(tmp_path / "data", n_seg=4, n_cls=6)
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("keep")
    res = _run("train", "--seg-data", seg, "--cls-data", cls, "--out", out, "--arch", "tiny", "--image-size", "64",
               "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "-j", "0", "-q")
    assert res.exit_code == 2 and str(out) in res.output
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]


def test_a_training_that_fails_at_the_start_leaves_its_folder_to_the_next(tmp_path, tiny_weights):
    """The folder is train's as soon as it is locked: a corrected rerun goes ahead."""
    seg, cls = make_folders(tmp_path / "data", n_seg=4, n_cls=6)
    args = ["train", "--seg-data", seg, "--cls-data", cls, "--out", tmp_path / "run", "--image-size", "64",
            "--epochs", "1", "--steps-per-epoch", "1", "--val-fraction", "0.34", "--device", "cpu", "-j", "0", "-q",
            "--no-calibrate"]
    res = _run(*args, "--init", tiny_weights)  # the tiny weights do not fit the base architecture
    assert res.exit_code == 2 and _manifest(tmp_path / "run")["status"] == "starting"
    res = _run(*args, "--arch", "tiny")
    assert res.exit_code == 0, res.output
    assert _manifest(tmp_path / "run")["status"] == "finished"


def test_status_is_its_own_text_everywhere():
    from mmcli.status import Status

    assert str(Status.OK) == "ok" and f"{Status.ERROR:>6}" == " error" and f"{Status.OK}" == "ok"
    assert json.dumps({"status": Status.SKIPPED}) == '{"status": "skipped"}' and Status.MISSING == "missing"
