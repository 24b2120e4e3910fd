"""Errors at the edge: bad outputs found before any work, a full disk mid-run, bad checkpoint
metadata, locked run folders, and one line (no traceback) for every failure."""

import errno
import hashlib
import hmac
import json
import math
import sys
from pathlib import Path

import h5py
import pytest
import torch
from conftest import make_checkpoint, rows_by_case, save_png8
from typer.testing import CliRunner

import mmcli.io.runfolder as runfolder
from mmcli.cli import app
from mmcli.config import PreprocessConfig
from mmcli.errors import WeightsError
from mmcli.models import create_model, model_kwargs
from mmcli.weights import Checkpoint, load_checkpoint, save_checkpoint

runner = CliRunner()


@pytest.fixture()
def scans(tmp_path):
    for i in range(3):
        save_png8(tmp_path / "scans" / f"s{i}.png", 64, 64, seed=i)
    return tmp_path / "scans"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(res):
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert "Traceback" not in res.output
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_an_out_whose_parent_is_a_file_fails_before_any_work(tmp_path, scans, tiny_weights):
    (tmp_path / "file").write_text("x")
    res = _run("predict", scans, "--out", tmp_path / "file" / "r.csv", "-w", tiny_weights)
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "cannot write the outputs to" in line and str(tmp_path / "file") in line
    res = _run("explain", scans, "--out", tmp_path / "file" / "e", "-w", tiny_weights)
    assert res.exit_code == 2 and "cannot write the outputs to" in _one_error_line(res)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc, where nothing can be created")
def test_an_out_that_cannot_be_created_fails_before_any_work(tmp_path, scans, tiny_weights):
    res = _run("predict", scans, "--out", "/proc/mmcli-test/r.csv", "-w", tiny_weights)
    assert res.exit_code == 2 and "cannot write the outputs to /proc/mmcli-test" in _one_error_line(res)


def test_a_full_disk_mid_run_is_one_line_and_a_rerun_finishes(tmp_path, scans, tiny_weights, monkeypatch):
    real = runfolder.Journal.append
    calls = []

    def full_after_one(self, row):
        calls.append(row["case_id"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, row)

    monkeypatch.setattr(runfolder.Journal, "append", full_after_one)
    out = tmp_path / "r.csv"
    res = _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0", "-b", "1")
    assert res.exit_code == 1
    line = _one_error_line(res)
    assert "No space left on device" in line and "journal.jsonl" in line and "run the same command again" in line
    assert not out.exists()
    monkeypatch.setattr(runfolder.Journal, "append", real)
    res = _run("predict", scans, "--out", out, "-w", tiny_weights, "-j", "0")
    assert res.exit_code == 0 and "(1 resumed)" in res.output


def test_an_unexpected_error_is_one_line_unless_verbose(tmp_path, scans, tiny_weights, monkeypatch):
    import mmcli.batch

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(mmcli.batch, "discover_inputs", broken)
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights)
    assert res.exit_code == 1
    assert _one_error_line(res) == ("Error: unexpected RuntimeError: something nobody expected "
                                    "(run with -v for the traceback)")
    res = runner.invoke(app, ["-v", "predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights)])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)


def _bad_checkpoint(path, **changes):
    kwargs = model_kwargs("multimix_tiny")
    ckpt = Checkpoint("multimix_tiny", {**kwargs, **changes.pop("kwargs", {})},
                      create_model("multimix_tiny").state_dict(), preprocess=PreprocessConfig(image_size=64))
    for key, value in changes.items():
        setattr(ckpt, key, value)
    save_checkpoint(ckpt, path)
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"kwargs": {"wings": 2}}, "do not fit model 'multimix_tiny'"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0, got 0.0"),
    ({"temperature": math.nan}, "temperature must be a finite number > 0, got nan"),
    ({"preprocess": PreprocessConfig(image_size=4096)}, "model image size 4096 is outside 64..1024"),
    ({"model_name": "no_such_model"}, "unknown model 'no_such_model'"),
])
def test_bad_checkpoint_metadata_is_refused_on_load(tmp_path, scans, changes, message):
    path = _bad_checkpoint(tmp_path / "bad.safetensors", **changes)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(path)
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", path)
    assert res.exit_code == 2 and message in _one_error_line(res)


def test_train_and_evaluate_run_folders_are_locked(tmp_path, scans, tiny_weights):
    from mmcli.io.runfolder import RunLock

    (scans / "labels.csv").write_text("file,label\ns0.png,normal\ns1.png,pneumonia\n")
    with RunLock(tmp_path / "ev" / ".lock", tmp_path / "ev"):
        res = _run("evaluate", scans, "--out", tmp_path / "ev", "-w", tiny_weights, "--bootstrap", "0")
        assert res.exit_code == 2 and "another mmcli run (pid" in _one_error_line(res)
    res = _run("evaluate", scans, "--out", tmp_path / "ev", "-w", tiny_weights, "--bootstrap", "0", "--no-plots")
    assert res.exit_code == 0, res.output
    with RunLock(tmp_path / "run" / ".lock", tmp_path / "run"):
        res = _run("train", "--cls-data", scans, "--variant", "enc", "--arch", "tiny", "--image-size", "64",
                   "--epochs", "1", "--out", tmp_path / "run")
        assert res.exit_code == 2 and "another mmcli run (pid" in _one_error_line(res)


def test_reruns_write_identical_hdf5(tmp_path, scans, tiny_weights):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out in (a, b):
        assert _run("predict", scans, "--out", out, "-w", tiny_weights, "-q").exit_code == 0
    with h5py.File(a) as h5:
        assert "created" not in h5.attrs  # the time of a run is in run.json only
    # the reports differ only in where their masks live (a/masks vs b/masks)
    assert a.read_bytes().replace(b"a/masks", b"b/masks") == b.read_bytes()
    assert "created" in json.loads((tmp_path / "a" / "run.json").read_text())


def test_checkpoints_written_by_training_still_load(tmp_path):
    path = make_checkpoint(tmp_path / "ok.safetensors")
    ckpt = load_checkpoint(path)
    assert ckpt.temperature == 1.0 and ckpt.preprocess.image_size == 64
    assert isinstance(ckpt.build_model()(torch.zeros(1, 1, 64, 64)).cls_logits, torch.Tensor)


def test_bombs_get_error_rows_and_max_pixels_sets_the_budget(tmp_path, scans, tiny_weights):
    from test_readers import dicom_bomb, png_bomb

    png_bomb(scans / "bomb.png", 13000, 13000)
    dicom_bomb(scans / "bomb.dcm")
    out = tmp_path / "r.csv"
    res = _run("predict", scans, "--out", out, "-w", tiny_weights, "-q", "-j", "0")
    assert res.exit_code == 1
    rows = rows_by_case(out)
    assert rows["bomb.png"]["error"] == "image of 13000 x 13000 pixels exceeds the 60 MP limit"
    assert rows["bomb.dcm"]["error"] == "image of 16000 x 16000 pixels exceeds the 60 MP limit"
    assert [rows[f"s{i}"]["status"] for i in range(3)] == ["ok"] * 3
    res = _run("predict", scans / "s0.png", "--out", tmp_path / "small.csv", "-w", tiny_weights, "-q",
               "--max-pixels", "4000")
    assert res.exit_code == 1
    (row,) = rows_by_case(tmp_path / "small.csv").values()
    assert row["error"] == "image of 64 x 64 pixels exceeds the 0.004 MP limit"
    manifest = json.loads((tmp_path / "small" / "run.json").read_text())
    assert manifest["settings"]["max_pixels"] == 4000


@pytest.mark.slow
def test_peak_memory_of_one_worker_on_a_59_megapixel_image(tmp_path, tiny_weights):
    import resource
    import subprocess

    import numpy as np
    from PIL import Image

    ramp = (np.arange(7760, dtype=np.uint32) * 65535 // 7759).astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (7600, 7760)))).save(tmp_path / "big.png")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = subprocess.run([sys.executable, "-m", "mmcli", "predict", str(tmp_path / "big.png"), "--out",
                          str(tmp_path / "r.csv"), "-w", str(tiny_weights), "-j", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib > before or before < 1.5 * 2**20  # the largest child so far is this run or one smaller
    assert peak_kib < 1.5 * 2**20, f"peak {peak_kib / 2**20:.2f} GiB"


def test_the_id_mapping_is_private_from_its_creation(tmp_path, monkeypatch):
    import os

    import mmcli.io.identity as identity
    from mmcli.io.discover import InputFile

    chmod = os.chmod

    def no_chmod(*args, **kwargs):
        raise AssertionError("the mapping must be created 0600, not made so afterwards")

    monkeypatch.setattr(identity.os, "chmod", no_chmod)
    old = os.umask(0)  # the most open umask: the mode must come from the creation itself
    try:
        mapping = tmp_path / "private" / "ids.json"
        identity.anonymize([InputFile(tmp_path / "a.png", "a")], mapping)
        assert mapping.stat().st_mode & 0o777 == 0o600
        chmod(mapping, 0o644)  # a copy someone left readable is replaced by a private file
        identity.anonymize([InputFile(tmp_path / "b.png", "b")], mapping)
        assert mapping.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert {v["case_id"] for v in json.loads(mapping.read_text())["cases"].values()} == {"a", "b"}
    assert sorted(p.name for p in mapping.parent.iterdir()) == ["ids.json", "ids.json.lock"]  # no temporary file
    assert (mapping.parent / "ids.json.lock").stat().st_mode & 0o777 == 0o600


def _anonymize_shard(mapping, shard, barrier, queue):
    import time

    import mmcli.io.identity as identity
    from mmcli.io.discover import InputFile

    write = identity.write_private_json

    def slow_write(path, data):  # a slow disk: the read-extend-write of every shard overlaps
        time.sleep(0.2)
        write(path, data)

    identity.write_private_json = slow_write
    barrier.wait()
    files = identity.anonymize([InputFile(Path(f"s{shard}_{i}.png"), f"s{shard}_{i}") for i in range(3)], mapping)
    queue.put({f.case_id: str(f.path) for f in files})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked processes")
def test_shards_started_at_once_share_one_salt_and_one_mapping(tmp_path):
    import multiprocessing

    mapping = tmp_path / "private" / "ids.json"
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_anonymize_shard, args=(mapping, k, barrier, queue)) for k in range(n)]
    for proc in procs:
        proc.start()
    ids = {}
    for _ in procs:
        ids.update(queue.get(timeout=60))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    data = json.loads(mapping.read_text())
    assert len(ids) == 3 * n
    assert {k: v["source"] for k, v in data["cases"].items()} == ids  # every shard's ids
    salt = bytes.fromhex(data["salt"])
    assert all(hmac.new(salt, Path(src).stem.encode(), hashlib.sha256).hexdigest()[:20] == k
               for k, src in ids.items())  # all made with the salt that the mapping keeps


@pytest.mark.parametrize("inside", ["r/ids.json", "r/private/ids.json", "r.csv"])
def test_an_id_mapping_among_the_outputs_is_refused(tmp_path, scans, tiny_weights, inside):
    mapping = tmp_path / inside
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights, "-j", "0",
               "--anonymize-ids", mapping)
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert f"--anonymize-ids {mapping}" in line and "kept apart from the outputs" in line
    assert not mapping.exists() and not (tmp_path / "r.csv").exists()


def test_an_id_mapping_inside_an_explain_folder_is_refused(tmp_path, scans, tiny_weights):
    res = _run("explain", scans, "--out", tmp_path / "e", "-w", tiny_weights, "-j", "0",
               "--anonymize-ids", tmp_path / "e" / "ids.json")
    assert res.exit_code == 2 and "kept apart from the outputs" in _one_error_line(res)


@pytest.mark.parametrize("text", [
    '{"salt": "00112233445566778899aabbccddeeff", "cases": {"abc": {"case_id": "s0", "sou',  # cut short
    '{"salt": "00112233445566778899aabbccddeeff"}',  # no cases
    '{"salt": "00112233445566778899aabbccddeeff", "cases": ["s0"]}',
    '{"salt": "0011", "cases": {}}',
    "",
])
def test_a_corrupt_id_mapping_is_refused_and_kept(tmp_path, scans, tiny_weights, text):
    mapping = tmp_path / "ids.json"
    mapping.write_text(text)
    res = _run("predict", scans, "--out", tmp_path / "r.csv", "-w", tiny_weights, "-j", "0",
               "--anonymize-ids", mapping)
    assert res.exit_code == 2
    assert f"--anonymize-ids {mapping}: not a mapping file written by mmcli" in _one_error_line(res)
    assert mapping.read_text() == text  # older mappings are never written over
