"""``mmcli merge`` and predict's reports under attack: changed inputs, edited shards, paths that
lead out, formula cells, clashing HDF5 keys, a full disk, long names, earlier runs in the inputs."""

import csv
import errno
import json
import os

import h5py
import pytest
from conftest import save_png8
from typer.testing import CliRunner

from mmcli.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _predict(scans, out, weights, *extra):
    res = _run("predict", scans, "--out", out, "-w", weights, "-q", "-j", "0", "--precision", "fp32", *extra)
    assert res.exit_code in (0, 1), res.output
    return res


@pytest.fixture()
def scans(tmp_path):
    for i in range(5):
        save_png8(tmp_path / "scans" / f"s{i}.png", 64, 64, seed=i)
    return tmp_path / "scans"


def _shards(scans, work, weights, n=2, suffix=".csv"):
    for k in range(n):
        _predict(scans, work / f"r{suffix}", weights, "--shard", f"{k}/{n}")
    return sorted(work.glob(f"r.shard-*-of-{n}{suffix}"))


def _merge(*reports, out):
    return _run("merge", *reports, "--out", out)


def test_a_file_added_between_shard_jobs_is_refused(tmp_path, scans, tiny_weights):
    work = tmp_path / "w"
    _predict(scans, work / "r.csv", tiny_weights, "--shard", "0/2")
    save_png8(scans / "s00.png", 64, 64, seed=9)  # sorts second: every later case moves one place
    _predict(scans, work / "r.csv", tiny_weights, "--shard", "1/2")
    res = _merge(*sorted(work.glob("r.shard-*-of-2.csv")), out=work / "m.csv")
    assert res.exit_code == 2, res.output
    assert "r.shard-1-of-2.csv was made from another input list" in res.output and "6 inputs" in res.output
    assert not (work / "m.csv").exists() and not (work / "m").exists()


@pytest.mark.parametrize("edit", ["remove", "duplicate", "replace"])
def test_a_shard_whose_rows_are_not_its_share_is_refused(tmp_path, scans, tiny_weights, edit):
    work = tmp_path / "w"
    reports = _shards(scans, work, tiny_weights)
    lines = reports[0].read_text().splitlines(keepends=True)  # header, s0, s2, s4
    if edit == "remove":
        del lines[2]
    elif edit == "duplicate":
        lines.insert(2, lines[1])
    else:
        lines[2] = lines[2].replace("s2", "s1", 1)
    reports[0].write_text("".join(lines))
    res = _merge(*reports, out=work / "m.csv")
    assert res.exit_code == 2, res.output
    assert "r.shard-0-of-2.csv" in res.output
    assert {"remove": "share of the 5 inputs is 3: a case is missing", "duplicate": "holds case 's0' twice",
            "replace": "its rows are not the cases its run.json records"}[edit] in res.output
    assert not (work / "m.csv").exists()


def _poison_journal(report, column, value):
    journal = report.with_suffix("") / "journal.jsonl"
    lines = journal.read_text().splitlines()
    row = json.loads(lines[1])
    row[column] = value
    journal.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")


@pytest.mark.parametrize("value", ["r.shard-1-of-2/masks/../../../../payload.txt", "{payload}",
                                   "r.shard-1-of-2/../r.shard-0-of-2/masks/s0.png", "r.shard-1-of-2/run.json"])
def test_paths_that_lead_out_of_a_shard_are_refused_never_copied(tmp_path, scans, tiny_weights, value):
    work = tmp_path / "a" / "b" / "w"
    reports = _shards(scans, work, tiny_weights)
    payload = tmp_path / "payload.txt"
    payload.write_text("secret")
    _poison_journal(reports[1], "mask", value.format(payload=payload))
    res = _merge(*reports, out=work / "m.csv")
    assert res.exit_code == 2, res.output
    assert "r.shard-1-of-2.csv" in res.output and "refused" in res.output.replace("\n", " ")
    assert not (work / "m").exists() and not (work / "m.csv").exists()


def test_out_may_not_name_a_shard(tmp_path, scans, tiny_weights):
    work = tmp_path / "w"
    reports = _shards(scans, work, tiny_weights)
    for out in (reports[0], reports[1].with_suffix(".h5"), reports[0].with_suffix("") / "m.csv"):
        before = reports[0].read_bytes()
        res = _merge(*reports, out=out)
        assert res.exit_code == 2 and "would write over shard" in res.output, res.output
        assert reports[0].read_bytes() == before


def _cells(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_formula_file_names_are_text_cells_also_after_merge(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    (scans / "0bad.png").parent.mkdir(parents=True)
    (scans / "0bad.png").write_text("not an image")  # fails first: --fail-fast skips the rest of shard 0
    names = ['=HYPERLINK("evil.example","y")', "@SUM(1)", "-2+3", "+cmd"]
    for i, name in enumerate(names):
        save_png8(scans / f"{name}.png", 64, 64, seed=i)
    work = tmp_path / "w"
    for k in range(2):
        _predict(scans, work / "r.csv", tiny_weights, "--shard", f"{k}/2", "--fail-fast")
    # in order +cmd, -2+3, 0bad, =HYPERLINK, @SUM. Shard 0: +cmd (ok), 0bad (error), @SUM (skipped: its row
    # comes from the shard's report, read and written again); shard 1: -2+3 and =HYPERLINK (ok, from the journal)
    res = _merge(*sorted(work.glob("r.shard-*-of-2.csv")), out=work / "m.csv")
    assert res.exit_code == 0, res.output
    rows = {r[0]: r for r in _cells(work / "m.csv")[1:]}
    assert set(rows) == {"0bad"} | {"'" + n for n in names}
    assert rows["'@SUM(1)"][2] == "skipped" and rows["'=HYPERLINK(\"evil.example\",\"y\")"][2] == "ok"
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in _cells(work / "m.csv") for cell in row)
    single = _cells(work / "r.shard-0-of-2.csv")[1:]
    assert [r[0] for r in single] == ["'+cmd", "0bad", "'@SUM(1)"]


@pytest.mark.parametrize("suffix", [".csv", ".h5"])
def test_a_file_beside_a_folder_of_its_stem_gets_its_own_hdf5_key(tmp_path, tiny_weights, suffix):
    scans = tmp_path / "scans"
    save_png8(scans / "a.png", 64, 64, seed=1)
    save_png8(scans / "a" / "b.png", 64, 64, seed=2)
    work = tmp_path / "w"
    if suffix == ".csv":
        res = _predict(scans, work / "r.csv", tiny_weights, "--hdf5", work / "r.h5")
    else:  # merged from shards: the same keys
        res = _merge(*_shards(scans, work, tiny_weights, suffix=".h5"), out=work / "r.h5")
    assert res.exit_code == 0, res.output
    with h5py.File(work / "r.h5") as h5:
        assert {k: ds.attrs["case_id"] for k, ds in h5["masks"].items()} == {"a": "a", "a%2Fb": "a/b"}


def test_a_full_disk_while_writing_hdf5_is_one_line_and_no_temp(tmp_path, scans, tiny_weights, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    res = _run("predict", scans, "--out", tmp_path / "r.h5", "-w", tiny_weights, "-q", "-j", "0")
    assert res.exit_code == 1, res.output
    message = " ".join(res.output.split())
    assert f"cannot write {tmp_path / 'r.h5'}: No space left on device" in message
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert not (tmp_path / "r.h5").exists()


def test_input_names_up_to_name_max(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    for length in (242, 250, 255):
        save_png8(scans / ("x" * (length - 4 - 3) + f"{length}.png"), 64, 64, seed=length)
    res = _predict(scans, tmp_path / "r.csv", tiny_weights)
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "r" / "masks").glob("*.png"))) == 3


def test_an_earlier_run_inside_the_inputs_adds_no_cases(tmp_path, scans, tiny_weights):
    _predict(scans, scans / "first.csv", tiny_weights)
    _predict(scans, scans / "second.csv", tiny_weights, "--shard", "0/1")
    assert len(_cells(scans / "first.csv")) == len(_cells(scans / "second.shard-0-of-1.csv")) == 6
    assert len(list((scans / "first" / "masks").glob("*.png"))) == 5
    assert os.path.exists(scans / "second.shard-0-of-1" / "run.json")


def test_anonymised_shards_record_the_ids_the_merge_holds(tmp_path, scans, tiny_weights):
    work, mapping = tmp_path / "w", tmp_path / "ids.json"
    reports = [_predict(scans, work / "r.csv", tiny_weights, "--shard", f"{k}/2", "--anonymize-ids", mapping)
               and work / f"r.shard-{k}-of-2.csv" for k in range(2)]
    res = _merge(*reports, out=work / "m.csv")
    assert res.exit_code == 0, res.output
    ids = [row[0] for row in _cells(work / "m.csv")[1:]]
    assert len(ids) == 5 and set(ids) == set(json.loads(mapping.read_text())["cases"])
