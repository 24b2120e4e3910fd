"""Messages and option names as a person reads them: training errors that name the folder and what
it lacks, one meaning per option name across commands, the training ETA and its workers default."""

import json
import shutil

import pytest
from conftest import save_png8
from test_train_data import make_folders
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.cli.train import duration, run_eta
from mmcli.runtime import default_workers
from mmcli.training.config import TrainConfig, option_for

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("data"), n_seg=4, n_cls=6)


def _train(out, *args):
    return runner.invoke(app, ["train", "--out", str(out), "--arch", "tiny", "--image-size", "64", "--batch-size",
                               "2", "--steps-per-epoch", "1", "--epochs", "1", "--val-fraction", "0.34", "--device",
                               "cpu", "-j", "0", "--no-calibrate", "-q", *map(str, args)])


def _error(res):
    """The one error line of a refused command."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


# ---- training errors in the words of folders and options ----

def test_seg_folder_without_masks_names_the_folder_and_the_fix(folders, tmp_path):
    _, cls = folders
    line = _error(_train(tmp_path / "r", "--variant", "unet", "--seg-data", cls))
    assert f"--seg-data {cls} has no masks/ folder: each image needs masks/<stem>.png" in line
    assert "or pass the folder as --unlabelled-data" in line and "learns lung masks" in line
    assert "seg_l" not in line and not (tmp_path / "r" / "state.pt").exists()


def test_cls_folder_without_labels_csv_names_the_folder_and_the_fix(folders, tmp_path):
    seg, _ = folders
    line = _error(_train(tmp_path / "r", "--variant", "enc", "--cls-data", seg))
    assert f"--cls-data {seg} has no labels.csv: it needs one with the columns file,label" in line
    assert "or pass the folder as --unlabelled-data" in line and "cls_l" not in line


def test_masks_that_name_no_image_are_named(tmp_path):
    seg, _ = make_folders(tmp_path, n_seg=3, n_cls=2)
    for mask in (seg / "masks").iterdir():
        mask.rename(mask.with_name("x" + mask.name))
    line = _error(_train(tmp_path / "r", "--variant", "unet", "--seg-data", seg))
    assert f"--seg-data {seg}: no image has its mask in {seg / 'masks'}" in line
    assert f"the mask of s0.png is {seg / 'masks' / 's0'}.png" in line


def test_labels_csv_that_names_no_image_is_named(tmp_path):
    _, cls = make_folders(tmp_path, n_seg=1, n_cls=4)
    (cls / "labels.csv").write_text("file,label\nother/c0.png,normal\nother/c1.png,pneumonia\n")
    line = _error(_train(tmp_path / "r", "--variant", "enc", "--cls-data", cls))
    assert f"{cls / 'labels.csv'} names none of the images of {cls}" in line


def test_label_budgets_of_zero_and_too_many_say_so(folders, tmp_path):
    seg, _ = folders
    line = _error(_train(tmp_path / "r", "--variant", "unet", "--seg-data", seg, "--seg-labels", "0"))
    assert "--seg-labels 0 keeps no mask for training" in line
    line = _error(_train(tmp_path / "r", "--variant", "unet", "--seg-data", seg, "--seg-labels", "9"))
    assert "--seg-labels 9: only 3 training images have a mask" in line and "--val-fraction 0.34" in line


def test_streams_of_images_without_a_mask_or_label_say_what_to_add(tmp_path):
    seg, cls = make_folders(tmp_path, n_seg=4, n_cls=4)
    both = tmp_path / "both"  # every image with a mask and a label
    shutil.copytree(seg, both)
    (both / "labels.csv").write_text("file,label\n" + "".join(f"s{i}.png,{('normal', 'pneumonia')[i % 2]}\n"
                                                              for i in range(4)))
    line = _error(_train(tmp_path / "r", "--seg-data", both, "--cls-data", both))
    assert "compares its masks of training images that have none" in line
    assert "every training image has a mask: pass images without masks with --unlabelled-data DIR" in line
    line = _error(_train(tmp_path / "r", "--variant", "enc-ssl", "--cls-data", cls))
    assert "every training image has a class label: pass images without labels with --unlabelled-data DIR" in line
    assert "cls_u" not in line


def test_missing_folders_and_options_are_named(tmp_path):
    line = _error(_train(tmp_path / "r", "--variant", "unet", "--seg-data", tmp_path / "nope"))
    assert line == f"Error: --seg-data {tmp_path / 'nope'}: folder not found"
    (tmp_path / "empty").mkdir()
    line = _error(_train(tmp_path / "r", "--variant", "enc", "--cls-data", tmp_path / "empty"))
    assert line.startswith(f"Error: --cls-data {tmp_path / 'empty'}: Found 0 images")
    line = _error(_train(tmp_path / "r", "--variant", "unet"))
    assert "--variant unet learns lung masks: pass --seg-data DIR" in line and "masks/<stem>.png" in line


def test_a_folder_without_masks_beside_others_is_warned_about(folders, tmp_path, caplog):
    from mmcli.config import CLASS_NAMES
    from mmcli.training.datasets import scan_folders

    seg, cls = folders
    scan_folders([seg, cls], [], CLASS_NAMES)
    assert f"--seg-data {cls} has no masks/ folder: its images train without masks" in caplog.text


# ---- one meaning per option name ----

def _config(out):
    return json.loads((out / "run.json").read_text())["settings"]


def test_train_dice_and_consistency_weights_and_their_old_names(folders, tmp_path):
    seg, cls = folders
    data = ("--seg-data", seg, "--cls-data", cls)
    res = _train(tmp_path / "new", *data, "--dice-weight", "2", "--consistency-weight", "0.5")
    assert res.exit_code == 0, res.output
    assert "deprecated" not in res.output
    config = _config(tmp_path / "new")
    assert (config["alpha"], config["beta"]) == (2.0, 0.5)  # stored under the paper's (and older runs') names
    res = _train(tmp_path / "old", *data, "--alpha", "2", "--beta", "0.5")
    assert res.exit_code == 0, res.output
    assert (_config(tmp_path / "old")["alpha"], _config(tmp_path / "old")["beta"]) == (2.0, 0.5)
    warnings = [line for line in res.output.splitlines() if "deprecated" in line]
    assert len(warnings) == 2
    assert "--alpha is deprecated for train" in warnings[0] and "use --dice-weight" in warnings[0]
    assert "--beta is deprecated for train" in warnings[1] and "use --consistency-weight" in warnings[1]
    res = _train(tmp_path / "both", *data, "--alpha", "2", "--dice-weight", "3")
    assert "--alpha is the old name of --dice-weight: pass only --dice-weight" in _error(res)


def test_a_run_started_with_the_old_names_resumes_with_the_new_ones(folders, tmp_path):
    seg, cls = folders
    data = ("--seg-data", seg, "--cls-data", cls)
    assert _train(tmp_path / "r", *data, "--beta", "0", "--lambda-u", "0").exit_code == 0
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--arch", "tiny", "--image-size", "64",
                              "--batch-size", "2", "--steps-per-epoch", "1", "--epochs", "2", "--val-fraction",
                              "0.34", "--device", "cpu", "-j", "0", "--no-calibrate", "-q", "--resume",
                              "--consistency-weight", "0", "--lambda-u", "0", *map(str, data)])
    assert res.exit_code == 0, res.output
    assert _config(tmp_path / "r")["epochs"] == 2
    # and the old spelling resumes too (what benchmark scripts pass)
    res = _train(tmp_path / "r", *data, "--beta", "0", "--lambda-u", "0", "--resume")
    assert res.exit_code == 0, res.output
    line = _error(_train(tmp_path / "r", *data, "--dice-weight", "1", "--lambda-u", "0", "--resume"))
    assert "these settings differ" in line and "--dice-weight 5.0 -> 1.0" in line and "--consistency-weight" in line


def test_resume_names_options_not_stored_keys(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), seg_data=("s",), cls_data=("c",), alpha=1.0, threshold=0.9, seed=3)
    old = TrainConfig(out=str(tmp_path), seg_data=("s",), cls_data=("c",)).to_dict()
    assert cfg.describe_differences(old) == "--seed 0 -> 3, --pseudo-threshold 0.7 -> 0.9, --dice-weight 5.0 -> 1.0"
    assert option_for("beta") == "--consistency-weight" and option_for("lambda_u") == "--lambda-u"


def test_train_help_lists_the_new_names_and_says_the_old_are_deprecated():
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "--dice-weight" in res.output and "--consistency-weight" in res.output
    options = res.output[res.output.index("Options"):]
    for old in ("--alpha ", "--beta ", "--threshold "):
        assert old not in options  # hidden options
    assert "Deprecated option names" in res.output and "--alpha (now --dice-weight)" in res.output
    assert "--threshold (now --pseudo-threshold)" in res.output


def test_explain_overlay_opacity_and_its_old_name(tmp_path, tiny_weights):
    save_png8(tmp_path / "s" / "a.png", 64, 64)
    common = [str(tmp_path / "s"), "-w", str(tiny_weights), "-j", "0", "--precision", "fp32"]
    res = runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "new"), "--overlay-opacity", "0.3", "-q"])
    assert res.exit_code == 0, res.output
    assert "deprecated" not in res.output
    assert json.loads((tmp_path / "new" / "run.json").read_text())["settings"]["alpha"] == 0.3
    res = runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "old"), "--alpha", "0.4", "-q"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if "deprecated" in line]
    assert len(warnings) == 1 and "--alpha is deprecated for explain: use --overlay-opacity" in warnings[0]
    # a run made with the old name resumes under the new one
    res = runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "old"), "--overlay-opacity", "0.4"])
    assert res.exit_code == 0 and "(1 resumed)" in res.output, res.output
    line = _error(runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "x"), "--alpha", "0.4",
                                      "--overlay-opacity", "0.5"]))
    assert "pass only --overlay-opacity" in line
    res = runner.invoke(app, ["explain", *common, "--out", str(tmp_path / "x"), "--overlay-opacity", "2"])
    assert res.exit_code == 2 and "Invalid value for '--overlay-opacity'" in res.output
    res = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "200"})
    assert "--overlay-opacity" in res.output and "--alpha " not in res.output[res.output.index("Options"):]


# ---- the ETA of a training run ----

def test_duration_and_eta():
    assert [duration(s) for s in (0.4, 40, 89, 90, 12 * 60, 89 * 60, 3 * 3600 + 5 * 60)] == [
        "0 s", "40 s", "89 s", "2 min", "12 min", "89 min", "3 h 05 min"]
    assert run_eta(300.0, 3, 9) == 900.0  # 100 s an epoch, 9 epochs left
    assert run_eta(300.0, 0, 9) is None and run_eta(300.0, 3, 0) == 0.0


def test_plain_epoch_lines_say_how_long_the_run_still_takes(folders, tmp_path):
    seg, cls = folders
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(tmp_path / "r"),
                              "--arch", "tiny", "--image-size", "64", "--batch-size", "2", "--steps-per-epoch", "1",
                              "--epochs", "3", "--device", "cpu", "-j", "0", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if ": loss" in line]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert lines[0].endswith(" for the run)") and "; ETA " in lines[0] and "; ETA " in lines[1]
    assert "ETA" not in lines[2]  # nothing left after the last epoch
    assert "epoch 2/3: step 1/1, loss" in res.output


# ---- --workers: one default rule for every command ----

def test_train_workers_default_is_that_of_the_other_commands(folders, tmp_path, monkeypatch):
    import torch

    from mmcli.training import datasets

    seen = []
    real = datasets.load_table

    def spy(samples, size, workers=0, **kw):
        seen.append(workers)
        return real(samples, size, 0, **kw)

    monkeypatch.setattr(datasets, "load_table", spy)
    monkeypatch.setattr("mmcli.training.trainer.load_table", spy)
    monkeypatch.delenv("MMCLI_WORKERS", raising=False)
    seg, cls = folders
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(tmp_path / "r"),
                              "--arch", "tiny", "--image-size", "64", "--batch-size", "2", "--steps-per-epoch", "1",
                              "--epochs", "1", "--device", "cpu", "--no-calibrate", "-q"])
    assert res.exit_code == 0, res.output
    assert seen == [default_workers(torch.device("cpu"))]
    assert _config(tmp_path / "r")["workers"] == seen[0]  # run.json records the number used
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(tmp_path / "r"),
                              "--arch", "tiny", "--image-size", "64", "--batch-size", "2", "--steps-per-epoch", "1",
                              "--epochs", "2", "--device", "cpu", "--no-calibrate", "-q", "--resume", "-j", "0"])
    assert res.exit_code == 0 and seen[-1] == 0, res.output  # a resume may change it


def test_init_of_another_model_or_size_says_which_options_fit(folders, tmp_path):
    seg, cls = folders
    assert _train(tmp_path / "a", "--seg-data", seg, "--cls-data", cls).exit_code == 0
    start = tmp_path / "a" / "best.safetensors"
    line = _error(_train(tmp_path / "b", "--variant", "unet", "--seg-data", seg, "--init", start))
    assert line == (f"Error: --init {start} holds a 'multimix' model (--arch tiny), which is not this run's 'unet' "
                    "model (--arch tiny): pass --variant multimix and --arch tiny")
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(tmp_path / "c"),
                              "--arch", "tiny", "--image-size", "128", "--init", str(start), "-q"])
    assert _error(res).endswith("was made for --image-size 64, this run uses 128: pass --image-size 64")
