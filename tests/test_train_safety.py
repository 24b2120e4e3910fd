"""Training safety: a diverging run stops and keeps only finite checkpoints; a resume refuses changed data."""

import json
import math

import pytest
import torch
from test_train import _cfg
from test_train_data import make_folders
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.errors import UsageError
from mmcli.training import run_train
from mmcli.weights import load_checkpoint

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("data"))


def test_cli_train_stops_at_the_first_loss_that_is_not_finite(folders, tmp_path):
    seg, cls = folders
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(out), "--arch",
                              "tiny", "--image-size", "64", "--epochs", "2", "--batch-size", "2", "--steps-per-epoch",
                              "3", "--val-fraction", "0.25", "--device", "cpu", "-j", "0", "--lr", "1e9", "-q"])
    assert res.exit_code == 1, res.output
    line = " ".join(res.output.split())
    assert line.startswith("Error: epoch 1, step ") and "the loss is nan" in line and "training diverged" in line
    assert not list(out.glob("*.safetensors"))  # no checkpoint with weights that are not finite
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "diverged" and run["error"] in line


def test_divergence_keeps_the_checkpoints_of_earlier_epochs(folders, tmp_path, monkeypatch):
    import mmcli.training.trainer as trainer_module
    from mmcli.training import TrainingDiverged

    calls = {"n": 0}
    real = trainer_module.train_step

    def nan_from_epoch_2(model, *args, **kwargs):
        loss, stats = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:  # two steps per epoch
            loss, stats = loss * math.nan, {**stats, "loss": math.nan}
        return loss, stats

    monkeypatch.setattr(trainer_module, "train_step", nan_from_epoch_2)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1/2: the loss is nan.*epoch 1 and best epoch 1"):
        run_train(_cfg(folders, tmp_path / "run", epochs=3, calibrate=False))
    best = load_checkpoint(tmp_path / "run" / "best.safetensors")  # loads: every tensor finite
    assert best.extra["epoch"] == 1 and load_checkpoint(tmp_path / "run" / "last.safetensors").extra["epoch"] == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "diverged"


def test_weights_that_stop_being_finite_at_an_epochs_last_step_are_not_saved(folders, tmp_path, monkeypatch):
    import mmcli.training.trainer as trainer_module
    from mmcli.training import TrainingDiverged

    real = trainer_module.train_step

    def poisoned(model, *args, **kwargs):
        loss, stats = real(model, *args, **kwargs)
        with torch.no_grad():
            model.seg_out.bias.fill_(math.inf)  # the loss was finite: only the weights say it
        return loss, stats

    monkeypatch.setattr(trainer_module, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 1, after its last step the weight 'seg_out.bias' is not finite"):
        run_train(_cfg(folders, tmp_path / "run", steps_per_epoch=1, calibrate=False))
    assert not list((tmp_path / "run").glob("*.safetensors"))


def _copy_folders(folders, root):
    import shutil

    return tuple(shutil.copytree(f, root / f.name) for f in folders)


def test_resume_refuses_data_that_changed_naming_what(folders, tmp_path):
    seg, cls = _copy_folders(folders, tmp_path)
    mine = (seg, cls)
    out = tmp_path / "run"
    run_train(_cfg(mine, out, calibrate=False))
    run = json.loads((out / "run.json").read_text())
    assert len(run["data"]["sha256"]) == 64 and run["data"]["files"] == 14
    # nothing changed: the run resumes
    run_train(_cfg(mine, out, epochs=2, calibrate=False, resume=True))
    (seg / "s5.png").unlink()
    (cls / "c7.png").unlink()
    rows = (cls / "labels.csv").read_text().replace("c0.png,normal", "c0.png,pneumonia")
    (cls / "labels.csv").write_text(rows.replace("c1.png,pneumonia", "c1.png,normal"))
    with pytest.raises(UsageError, match=r"the training data changed since the run in .* started: 2 files deleted, "
                                         r"2 labels changed \(first: .*c7.png\)"):
        run_train(_cfg(mine, out, epochs=3, calibrate=False, resume=True))
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(out), "--arch",
                              "tiny", "--image-size", "64", "--epochs", "3", "--batch-size", "2", "--steps-per-epoch",
                              "2", "--val-fraction", "0.25", "--device", "cpu", "--no-calibrate", "--resume", "-q"])
    assert res.exit_code == 2 and "2 files deleted, 2 labels changed" in " ".join(res.output.split())


def test_data_changes_names_every_kind_of_change():
    from mmcli.training.fingerprint import data_changes, data_digest

    old = {"a": ["normal", None, None, 10, 1, None, None], "b": [None, "m/b.png", "P1", 20, 2, 5, 3],
           "c": ["pneumonia", None, None, 30, 3, None, None]}
    assert data_changes(old, dict(old)) is None and data_digest(old) == data_digest(dict(reversed(old.items())))
    new = {"a": ["normal", None, None, 11, 1, None, None], "b": [None, "m/b.png", "P2", 20, 2, 6, 3],
           "d": [None, None, None, 1, 1, None, None]}
    assert data_changes(old, new) == ("1 file deleted, 1 file added, 1 file modified, 1 mask changed, "
                                      "1 patient id changed (first: c)")
    assert data_digest(new) != data_digest(old)


def test_a_run_from_before_the_data_record_still_resumes(folders, tmp_path, caplog):
    out = tmp_path / "run"
    run_train(_cfg(folders, out, calibrate=False))
    state = torch.load(out / "state.pt", weights_only=True)
    del state["data"]
    torch.save(state, out / "state.pt")
    assert run_train(_cfg(folders, out, epochs=2, calibrate=False, resume=True)).epochs_run == 2
    assert "does not record its training data" in caplog.text
