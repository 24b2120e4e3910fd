"""``--shard K/N`` and ``mmcli merge``: a sharded run merged back equals one run."""

import json

import pytest
from conftest import save_png8
from typer.testing import CliRunner

from mmcli.batch import shard_path, take_shard
from mmcli.cli import app
from mmcli.io.discover import discover_inputs

runner = CliRunner()


@pytest.fixture()
def scans(tmp_path):
    for i in range(7):
        save_png8(tmp_path / "scans" / f"s{i}.png", 60 + 3 * i, 64, seed=i)
    save_png8(tmp_path / "scans" / "sub" / "s0.png", 64, 70, seed=9)
    (tmp_path / "scans" / "bad.png").write_text("not an image")
    return tmp_path / "scans"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_shards_are_every_nth_input_with_the_ids_of_one_run(scans):
    files = discover_inputs([scans])
    parts = [take_shard(files, (k, 3)) for k in range(3)]
    assert sorted(f.case_id for p in parts for f in p) == sorted(f.case_id for f in files)
    assert [f.case_id for f in parts[1]] == [f.case_id for f in files[1::3]]
    assert shard_path(scans / "r.csv", (2, 8)).name == "r.shard-2-of-8.csv"
    assert shard_path(scans / "out", (0, 2)).name == "out.shard-0-of-2"


@pytest.mark.parametrize("suffix", [".csv", ".h5"])
def test_a_sharded_run_merged_back_equals_one_run(tmp_path, scans, tiny_weights, suffix):
    # float32: the tiny random model's mask logits sit near 0, where a mixed decoder's bf16
    # rounding of features that differ in the last float32 bit between batches flips pixels
    work = tmp_path / "w"
    for k in range(3):
        res = _run("predict", scans, "--out", work / f"r{suffix}", "-w", tiny_weights, "--shard", f"{k}/3", "-q",
                   "--precision", "fp32")
        assert res.exit_code in (0, 1), res.output
        manifest = json.loads((work / f"r.shard-{k}-of-3" / "run.json").read_text())
        assert manifest["settings"]["shard"] == [k, 3]
    res = _run("merge", *sorted(work.glob(f"r.shard-*-of-3{suffix}")), "--out", work / f"merge{suffix}")
    assert res.exit_code == 0, res.output
    assert "3 shards: 8 ok, 1 failed, 0 skipped" in res.output
    res = _run("predict", scans, "--out", tmp_path / f"whole{suffix}", "-w", tiny_weights, "-q", "--precision", "fp32")
    # same rows and masks: the reports differ only in the folder their mask paths name
    merged, whole = (work / f"merge{suffix}").read_bytes(), (tmp_path / f"whole{suffix}").read_bytes()
    assert merged.replace(b"merge/masks", b"whole/masks") == whole
    for mask in (tmp_path / "whole" / "masks").rglob("*.png"):
        assert (work / "merge" / "masks" / mask.relative_to(tmp_path / "whole" / "masks")).read_bytes() == \
            mask.read_bytes()
    merged_manifest = json.loads((work / "merge" / "run.json").read_text())
    assert merged_manifest["counts"] == {"total": 9, "ok": 8, "failed": 1, "skipped": 0}
    assert len(merged_manifest["merged_from"]) == 3


def test_merge_names_missing_shards_and_refuses_other_settings(tmp_path, scans, tiny_weights):
    for k, threshold in ((0, "0.5"), (2, "0.5"), (1, "0.7")):
        name = "r" if threshold == "0.5" else "x"
        _run("predict", scans, "--out", tmp_path / f"{name}.csv", "-w", tiny_weights, "--shard", f"{k}/3", "-q",
             "--threshold", threshold)
    res = _run("merge", tmp_path / "r.shard-0-of-3.csv", tmp_path / "r.shard-2-of-3.csv", "--out", tmp_path / "m.csv")
    assert res.exit_code == 2 and "shard(s) 1/3 missing" in res.output
    res = _run("merge", tmp_path / "r.shard-0-of-3.csv", tmp_path / "x.shard-1-of-3.csv",
               tmp_path / "r.shard-2-of-3.csv", "--out", tmp_path / "m.csv")
    assert res.exit_code == 2 and "other weights or settings" in res.output and "threshold 0.5 -> 0.7" in res.output
    res = _run("merge", tmp_path / "r.shard-0-of-3.csv", tmp_path / "r.shard-0-of-3.csv",
               tmp_path / "r.shard-2-of-3.csv", "--out", tmp_path / "m.csv")
    assert res.exit_code == 2 and "given more than once" in res.output
    assert not (tmp_path / "m.csv").exists()


def test_shard_usage_errors(tmp_path, scans, tiny_weights):
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights, "--shard", "3/3")
    assert res.exit_code == 2 and "0 <= K < N" in res.output
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights, "--shard", "1-3")
    assert res.exit_code == 2 and "K/N" in res.output
    _run("predict", scans, "--out", tmp_path / "plain.csv", "-w", tiny_weights, "-q")
    res = _run("merge", tmp_path / "plain.csv", "--out", tmp_path / "m.csv")
    assert res.exit_code == 2 and "not made with --shard" in res.output


def test_explain_shards(tmp_path, scans, tiny_weights):
    res = _run("explain", scans, "--out", tmp_path / "e", "-w", tiny_weights, "--shard", "1/2", "-q")
    assert res.exit_code == 0  # bad.png is input 0: in shard 0
    rows = (tmp_path / "e.shard-1-of-2" / "explain.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and json.loads((tmp_path / "e.shard-1-of-2" / "run.json").read_text())["settings"][
        "shard"] == [1, 2]


def test_shards_run_at_other_precisions_are_refused(tmp_path, scans, tiny_weights):
    # what auto gives on two nodes with other CPUs: mixed on one, fp32 on the other
    work = tmp_path / "w"
    for k, precision in ((0, "fp32"), (1, "mixed")):
        res = _run("predict", scans, "--out", work / "r.csv", "-w", tiny_weights, "--shard", f"{k}/2", "-q",
                   "--precision", precision)
        assert res.exit_code in (0, 1), res.output
    res = _run("merge", *sorted(work.glob("r.shard-*-of-2.csv")), "--out", work / "merge.csv")
    assert res.exit_code == 2 and "precision 'fp32' -> 'mixed'" in res.output
    assert not (work / "merge.csv").exists()
