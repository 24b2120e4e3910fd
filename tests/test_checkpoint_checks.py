"""Checkpoints that cannot lie: what load refuses, and how outputs name weights."""

import json
import math

import h5py
import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mmcli.weights as W
from mmcli.cli import app
from mmcli.errors import WeightsError
from mmcli.weights import load_checkpoint, read_registry, weights_name

runner = CliRunner()


def _tamper(src, dst, *, tensors=None, **meta_changes):
    """A copy of checkpoint ``src`` at ``dst`` with its metadata (and tensors) changed as given."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["mmcli"])
    for key, value in meta_changes.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        elif value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    state = load_file(str(src))
    if tensors is not None:
        tensors(state)
    save_file(state, str(dst), metadata={"mmcli": json.dumps(meta)})
    return dst


@pytest.fixture()
def good(tmp_path):
    return make_checkpoint(tmp_path / "good.safetensors")


def _nan_weight(state):
    key = next(k for k in state if state[k].is_floating_point() and state[k].numel() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = math.nan


@pytest.mark.parametrize(("change", "message"), [
    ({"tensors": _nan_weight}, "holds NaN or infinite values"),
    ({"temperature": 1e-300}, "temperature 1e-300 is outside 0.05..20.0"),
    ({"temperature": 0.05}, "temperature 0.05 is outside"),
    ({"temperature": 25.0}, "temperature 25.0 is outside"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0, got -1.0"),
    ({"class_names": ["pneumonia", "normal"]}, "class names ['pneumonia', 'normal'] are not mmcli's"),
    ({"class_names": ["normal", "covid"]}, "class names ['normal', 'covid'] are not mmcli's"),
    ({"class_names": ["normal", "pneumonia", "covid"]}, "are not mmcli's ['normal', 'pneumonia']"),
    ({"preprocess": {"std": math.nan}}, "std nan must be finite numbers"),
    ({"preprocess": {"image_size": 128}}, "preprocessing image size 128 is not the 64 the weights were trained at"),
    ({"model_kwargs": {"widths": [16, 32, 64, 128, 10**7]}}, "widths must be 5 integers in 1..1024"),
    ({"model_kwargs": {"in_chans": 10**6}}, "in_chans must be in 1..4"),
    ({"model_kwargs": {"widths": [8, 16, 32, 64, 128]}}, "weights do not fit model 'multimix_tiny'"),
    ({"model_kwargs": {"num_classes": 3}}, "the classifier has 3 outputs for 2 classes"),
])
def test_lying_checkpoints_are_refused_on_load_and_by_predict(tmp_path, good, change, message):
    bad = _tamper(good, tmp_path / "bad.safetensors", **change)
    with pytest.raises(WeightsError, match="bad.safetensors: ") as err:
        load_checkpoint(bad)
    assert message in str(err.value) and "\n" not in str(err.value)
    res = runner.invoke(app, ["predict", str(good), "--out", str(tmp_path / "r.csv"), "-w", str(bad), "-q"])
    assert res.exit_code == 2 and message in " ".join(res.output.split())


def test_model_arguments_are_checked_before_anything_is_allocated(tmp_path, good, monkeypatch):
    # absurd widths once tried to allocate tens of GB in build_model; now load refuses them on the meta device
    real = W.create_model

    def only_on_meta(*args, **kwargs):
        assert torch.empty(0).device.type == "meta", "a model was built on a real device"
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "create_model", only_on_meta)
    bad = _tamper(good, tmp_path / "wide.safetensors", model_kwargs={"widths": [4096] * 5})
    with pytest.raises(WeightsError, match="widths must be"):
        load_checkpoint(bad)


def test_older_checkpoints_compare_with_the_training_configuration(tmp_path, good):
    # no trained_image_size recorded (checkpoints from before it was): the training configuration's size counts
    older = _tamper(good, tmp_path / "old.safetensors", trained_image_size=None, train_config={"image_size": 64})
    assert load_checkpoint(older).trained_image_size == 64
    wrong = _tamper(older, tmp_path / "wrong.safetensors", preprocess={"image_size": 1024})
    with pytest.raises(WeightsError, match="image size 1024 is not the 64 the weights were trained at"):
        load_checkpoint(wrong)
    unknown = _tamper(good, tmp_path / "unknown.safetensors", trained_image_size=None)
    assert load_checkpoint(unknown).trained_image_size is None  # nothing to compare with: accepted


def test_shipped_weights_with_a_lying_image_size_are_refused(tmp_path):
    found = read_registry()
    if found is None:
        pytest.skip("no shipped weights")
    folder, reg = found
    shipped = folder / reg["weights"][reg["default"]]["file"]
    bad = _tamper(shipped, tmp_path / "v2-1024.safetensors", preprocess={"image_size": 1024})
    with pytest.raises(WeightsError, match="image size 1024 is not the 256 the weights were trained at"):
        load_checkpoint(bad)


def test_weights_are_named_by_their_bytes(tmp_path, good, monkeypatch):
    ckpt = load_checkpoint(good)
    assert weights_name(ckpt) == f"sha256:{ckpt.sha256[:12]}"
    registered = tmp_path / "reg"
    registered.mkdir()
    (registered / "tiny.safetensors").write_bytes(good.read_bytes())
    (registered / "registry.json").write_text(json.dumps(
        {"default": "tiny-v1", "weights": {"tiny-v1": {"file": "tiny.safetensors", "sha256": ckpt.sha256}}}))
    monkeypatch.setattr(W, "WEIGHTS_DIRS", (registered,))
    # the registered bytes, wherever they lie, carry the registered name
    assert weights_name(load_checkpoint(good)) == "tiny-v1"
    assert weights_name(load_checkpoint(registered / "tiny.safetensors")) == "tiny-v1"
    # other bytes at the registered file's path do not
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    (registered / "tiny.safetensors").write_bytes(other.read_bytes())
    swapped = load_checkpoint(registered / "tiny.safetensors")
    assert weights_name(swapped) == f"sha256:{swapped.sha256[:12]}" != "tiny-v1"


def test_outputs_record_the_weights_by_their_sha256(tmp_path, good):
    from conftest import save_png8

    scan = save_png8(tmp_path / "scans" / "a.png", 64, 64)
    sha = W.file_sha256(good)
    res = runner.invoke(app, ["predict", str(scan), "--out", str(tmp_path / "r.csv"), "-w", str(good), "-q",
                              "-j", "0", "--hdf5", str(tmp_path / "r.h5")])
    assert res.exit_code == 0, res.output
    provenance = json.loads((tmp_path / "r" / "run.json").read_text())["provenance"]
    assert provenance["weights"] == f"sha256:{sha[:12]}" and provenance["weights_sha256"] == sha
    with h5py.File(tmp_path / "r.h5") as h5:
        assert h5.attrs["weights"] == f"sha256:{sha[:12]}" and h5.attrs["weights_sha256"] == sha


def test_a_case_whose_output_is_not_finite_has_no_answer():
    from mmcli.inference import NONFINITE_REASON, BatchPrediction

    probs = torch.tensor([[0.9, 0.1], [math.nan, math.nan], [0.2, 0.8]])
    masks = torch.zeros(3, 1, 4, 4)
    masks[2, 0, 1, 1] = math.inf
    pred = BatchPrediction(probs, masks, None)
    assert [pred.failure(k) for k in range(3)] == [None, NONFINITE_REASON, NONFINITE_REASON]
    assert pred.case(1).failure(0) == NONFINITE_REASON and pred.case(0).failure(0) is None


@pytest.mark.usefixtures("one_thread")
def test_predict_and_explain_give_error_rows_for_outputs_that_overflow(tmp_path, good):
    from conftest import read_rows, save_png8

    # finite weights that overflow to infinity in the forward pass: the checks on load cannot see it
    huge = _tamper(good, tmp_path / "huge.safetensors",
                   tensors=lambda state: state.update({"classifier.3.weight": state["classifier.3.weight"] * 1e38}))
    scans = tmp_path / "scans"
    for i in range(2):
        save_png8(scans / f"s{i}.png", 64, 64, seed=i)
    for command, out, report in (("predict", tmp_path / "r.csv", tmp_path / "r.csv"),
                                 ("explain", tmp_path / "why", tmp_path / "why" / "explain.csv")):
        res = runner.invoke(app, [command, str(scans), "--out", str(out), "-w", str(huge), "-q", "-j", "0"])
        assert res.exit_code == 1, res.output
        rows = read_rows(report)
        assert len(rows) == 2
        for row in rows:
            assert row["status"] == "error" and row["error"] == "the model's output is not finite", row
            assert row["label"] == "" and row["p_pneumonia"] == ""
