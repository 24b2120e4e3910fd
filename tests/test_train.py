"""The training loop: variants, determinism, resume, calibration, the CLI, predict on the result."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_train_data import make_folders
from typer.testing import CliRunner

from mmcli import metrics as M
from mmcli.cli import app
from mmcli.config import PreprocessConfig
from mmcli.data.transforms import normalize
from mmcli.errors import UsageError
from mmcli.models import create_model
from mmcli.models.registry import ARCH_PRESETS
from mmcli.training import VARIANTS, TrainConfig, run_train
from mmcli.training.calibration import T_RANGE, calibrate_checkpoint, choose_temperature, fit_temperature
from mmcli.training.datasets import ImageTable
from mmcli.training.step import evaluate
from mmcli.weights import Checkpoint, load_checkpoint, save_checkpoint

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("data"))


def _cfg(folders, out, **kw):
    seg, cls = folders
    base = dict(out=str(out), seg_data=(str(seg),), cls_data=(str(cls),), arch="tiny", image_size=64,
                batch_size=2, steps_per_epoch=2, val_fraction=0.25, device="cpu", epochs=1)
    return TrainConfig(**{**base, **kw})


def _weights(path):
    return load_checkpoint(path).state_dict


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_one_step(folders, tmp_path, variant):
    summary = run_train(_cfg(folders, tmp_path / variant, variant=variant, steps_per_epoch=1, calibrate=False))
    row = summary.history[0]
    spec = VARIANTS[variant]
    assert ("dice" in row) == spec.seg and ("ce" in row) == spec.cls
    assert ("pseudo" in row) == spec.pseudo and ("consistency" in row) == spec.consistency
    assert ("val_dice" in row) == spec.seg and ("val_auc" in row) == spec.cls
    ckpt = load_checkpoint(tmp_path / variant / "best.safetensors")
    assert ckpt.model_name == spec.model and ckpt.extra["variant"] == variant
    assert ckpt.build_model().bridge == (spec.model in ("multimix", "umtls"))


def test_resume_equals_uninterrupted_run(folders, tmp_path):
    straight = run_train(_cfg(folders, tmp_path / "a", epochs=2, lr_step=1))
    run_train(_cfg(folders, tmp_path / "b", epochs=1, lr_step=1))
    resumed = run_train(_cfg(folders, tmp_path / "b", epochs=2, lr_step=1, resume=True))
    wa, wb = _weights(tmp_path / "a" / "last.safetensors"), _weights(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = pd.read_csv(tmp_path / "a" / "history.csv"), pd.read_csv(tmp_path / "b" / "history.csv")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))
    assert straight.best_score == resumed.best_score and list(ha["lr"]) == pytest.approx([1e-4, 1e-5])
    # same seed, same result; another seed, another result
    with pytest.raises(UsageError, match="--resume"):
        run_train(_cfg(folders, tmp_path / "a", epochs=2))
    with pytest.raises(UsageError, match="seed"):
        run_train(_cfg(folders, tmp_path / "a", epochs=3, seed=1, resume=True))


def test_other_seed_other_weights(folders, tmp_path):
    run_train(_cfg(folders, tmp_path / "s0", variant="enc", calibrate=False))
    run_train(_cfg(folders, tmp_path / "s1", variant="enc", seed=1, calibrate=False))
    w0, w1 = _weights(tmp_path / "s0" / "last.safetensors"), _weights(tmp_path / "s1" / "last.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_early_stopping(folders, tmp_path):
    summary = run_train(_cfg(folders, tmp_path / "es", variant="enc", epochs=6, lr=0.0, patience=1, calibrate=False))
    assert summary.stopped_early and summary.epochs_run == 2 and summary.best_epoch == 1
    assert json.loads((tmp_path / "es" / "run.json").read_text())["status"] == "stopped early"


def test_temperature_recovers_a_known_scale():
    torch.manual_seed(0)
    true_logits = torch.randn(2000, 2) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1)[:, 0]
    t = fit_temperature(true_logits * 3, labels)  # over-confident by a factor 3
    assert t == pytest.approx(3.0, rel=0.15)
    ece_raw = M.expected_calibration_error(torch.softmax(true_logits * 3, 1).numpy(), labels.numpy())
    assert M.expected_calibration_error(torch.softmax(true_logits * 3 / t, 1).numpy(), labels.numpy()) < ece_raw


def _small_table(n=8, size=64):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g)
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.5).to(torch.uint8)
    masks[0] = 0  # an empty reference
    labels = torch.arange(n) % 2
    return ImageTable(images, masks, torch.ones(n, dtype=torch.bool), labels)


def test_validation_and_calibration_numbers_are_those_of_mmcli_metrics(tmp_path):
    torch.manual_seed(0)
    model = create_model("multimix_tiny")
    table, pre = _small_table(), PreprocessConfig(image_size=64)
    val = list(range(len(table.labels)))
    opts = {"batch_size": 3, "device": torch.device("cpu"), "precision": "fp32"}
    got, logits, labels = evaluate(model, table, val, val, pre, **opts)
    model.eval()
    with torch.no_grad():
        out = model(normalize(table.images, pre))
    pred = (out.seg_logits >= 0).numpy()
    dice = [M.overlap_metrics(p[0], r[0])["dice"] for p, r in zip(pred, table.masks.numpy(), strict=True)]
    probs, y = torch.softmax(out.cls_logits, 1).numpy(), table.labels.numpy()
    assert got["val_dice"] == pytest.approx(np.mean(dice), abs=1e-12)
    assert got["val_acc"] == M.accuracy(y, probs.argmax(1))
    assert got["val_auc"] == pytest.approx(M.roc_auc(y, probs[:, 1]), abs=1e-12)
    assert torch.allclose(logits, out.cls_logits, atol=1e-5) and torch.equal(labels, table.labels)
    # the ECE stored by calibration is the one of mmcli.metrics
    path = tmp_path / "m.safetensors"
    save_checkpoint(Checkpoint(model_name="multimix_tiny", model_kwargs=model.init_kwargs,
                               state_dict=model.state_dict(), preprocess=pre), path)
    t, before, after, _ = calibrate_checkpoint(path, table, val, pre, **opts, min_cases=0, min_per_class=0)
    assert before == pytest.approx(M.expected_calibration_error(torch.softmax(logits, 1).numpy(), y), abs=1e-12)
    assert after == pytest.approx(M.expected_calibration_error(torch.softmax(logits / t, 1).numpy(), y), abs=1e-12)


def test_finish_computes_checkpoints_with_the_same_weights_once(tmp_path, monkeypatch):
    from mmcli.training import calibration

    torch.manual_seed(0)
    model = create_model("multimix_tiny")
    table, pre = _small_table(), PreprocessConfig(image_size=64)
    paths = [tmp_path / "last.safetensors", tmp_path / "best.safetensors", tmp_path / "other.safetensors"]
    for path in paths[:2]:
        save_checkpoint(Checkpoint(model_name="multimix_tiny", model_kwargs=model.init_kwargs,
                                   state_dict=model.state_dict(), preprocess=pre), path)
    other = create_model("multimix_tiny")  # other random weights
    save_checkpoint(Checkpoint(model_name="multimix_tiny", model_kwargs=other.init_kwargs,
                               state_dict=other.state_dict(), preprocess=pre), paths[2])
    calls = {"evaluate": 0, "fit_ood": 0}

    def counted(name):
        real = getattr(calibration, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(calibration, name, counted(name))
    fit, val = list(range(6)), [6, 7]
    done = calibration.finish_checkpoints(paths, table, pre, val_cls=val, ood=(fit, val, "a test"), batch_size=3,
                                          device=torch.device("cpu"), min_cases=0, min_per_class=0)
    assert calls == {"evaluate": 2, "fit_ood": 2}  # last and best share their weights
    assert done[0] == done[1] and done[0]["ood"]["fitted_on"] == "training split (a test)"
    last, best = (load_checkpoint(p) for p in paths[:2])
    assert last.temperature == best.temperature == done[1]["calibration"][0]
    assert last.extra["ood"] == best.extra["ood"] and torch.equal(last.tensors["ood.mean"], best.tensors["ood.mean"])
    assert load_checkpoint(paths[2]).extra["ood"]["threshold"] != best.extra["ood"]["threshold"]


def test_tiny_arch_is_the_registry_preset(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "t")
    assert cfg.model_overrides() == dict(ARCH_PRESETS["tiny"])
    assert create_model("multimix", **cfg.model_overrides()).init_kwargs == create_model("multimix_tiny").init_kwargs
    with pytest.raises(UsageError, match="base or tiny"):
        _cfg(folders, tmp_path / "t", arch="huge")


def test_cli_train_then_predict(folders, tmp_path):
    seg, cls = folders
    out = tmp_path / "run"
    args = ["train", "--seg-data", seg, "--cls-data", cls, "--out", out, "--arch", "tiny", "--image-size", "64",
            "--epochs", "1", "--batch-size", "2", "--val-fraction", "0.25", "--cls-labels", "4", "--seg-labels", "2",
            "--device", "cpu", "-j", "0"]
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "best epoch 1" in res.output and "ECE" in res.output
    for name in ("best.safetensors", "last.safetensors", "state.pt", "history.csv", "splits.csv", "run.json"):
        assert (out / name).is_file(), name
    splits = pd.read_csv(out / "splits.csv")
    assert (splits["cls_role"] == "labelled").sum() == 4 and (splits["seg_role"] == "labelled").sum() == 2
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["settings"]["cls_labels"] == 4 and run["ece_after"] is not None
    ckpt = load_checkpoint(out / "best.safetensors")
    assert ckpt.temperature == run["temperature"] and ckpt.train_config["variant"] == "multimix"
    assert ckpt.preprocess.image_size == 64
    report = tmp_path / "pred.csv"
    res = runner.invoke(app, ["predict", str(seg / "s0.png"), "--out", str(report), "--weights",
                              str(out / "best.safetensors"), "-q", "-j", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = pd.read_csv(report)
    assert list(rows["status"]) == ["ok"]


def test_cli_usage_errors(folders, tmp_path):
    seg, _ = folders
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--cls-data" in res.output
    res = runner.invoke(app, ["train", "--seg-data", str(seg), "--out", str(tmp_path / "r"), "--variant", "unet",
                              "--seg-labels", "many"])
    assert res.exit_code == 2 and "'all'" in res.output


@pytest.mark.slow
def test_torchrun_two_cpu_processes(folders, tmp_path):
    import os
    import subprocess
    import sys

    seg, cls = folders
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mmcli", "train",
           "--seg-data", str(seg), "--cls-data", str(cls), "--out", str(out), "--arch", "tiny", "--image-size", "64",
           "--epochs", "1", "--batch-size", "2", "--val-fraction", "0.25", "--device", "cpu", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "finished"
    assert load_checkpoint(out / "best.safetensors").build_model() is not None
    assert len(pd.read_csv(out / "history.csv")) == 1


def test_bf16_autocast_step_gives_float32_losses():
    from mmcli.models import create_model
    from mmcli.runtime import autocast
    from mmcli.training.losses import LossWeights
    from mmcli.training.step import StepBatch, train_step

    torch.manual_seed(0)
    model = create_model("multimix_tiny")
    g = torch.Generator().manual_seed(0)
    b = StepBatch(seg_l=torch.randn(2, 1, 32, 32, generator=g), seg_l_masks=torch.ones(2, 1, 32, 32),
                  seg_u=torch.randn(2, 1, 32, 32, generator=g), cls_l=torch.randn(2, 1, 32, 32, generator=g),
                  cls_l_labels=torch.tensor([0, 1]), cls_weak=torch.randn(2, 1, 32, 32, generator=g),
                  cls_strong=torch.randn(2, 1, 32, 32, generator=g))
    loss, stats = train_step(model, b, VARIANTS["multimix"], LossWeights(threshold=0.0),
                             autocast(torch.device("cpu"), "bf16"))
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(stats["loss"]) and stats["mask_rate"] == 1.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_set_schedule_after_first_epoch_equals_that_schedule_from_the_start(folders, tmp_path):
    want = run_train(_cfg(folders, tmp_path / "a", epochs=3, lr_step=2, calibrate=False))
    trainers = []

    def on_epoch(row):
        if row["epoch"] == 1:
            trainers[0].set_schedule(3, 2)

    got = run_train(_cfg(folders, tmp_path / "b", epochs=50, lr_step=50, calibrate=False),
                    on_start=trainers.append, on_epoch=on_epoch)
    assert got.epochs_run == 3
    assert [r["lr"] for r in got.history] == [r["lr"] for r in want.history]
    for k, v in _weights(tmp_path / "a" / "last.safetensors").items():
        assert torch.equal(v, _weights(tmp_path / "b" / "last.safetensors")[k]), k
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["settings"]["epochs"] == 3 and run["settings"]["lr_step"] == 2
    with pytest.raises(UsageError, match="stepped"):
        trainers[0].set_schedule(5, 1)


def test_voi_lut_reaches_the_training_reader(folders, tmp_path, monkeypatch):
    import mmcli.training.trainer as trainer_module

    seen = []
    real = trainer_module.load_table

    def spy(*args, **kwargs):
        seen.append(kwargs.get("voi_lut"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "load_table", spy)
    run_train(_cfg(folders, tmp_path / "run", voi_lut=True, epochs=1))
    assert seen == [True]


def test_resume_treats_a_setting_the_old_run_lacks_as_its_default(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run")
    old = {k: v for k, v in cfg.to_dict().items() if k != "voi_lut"}  # a run from before --voi-lut existed
    assert cfg.differences(old) == []
    assert _cfg(folders, tmp_path / "run", voi_lut=True).differences(old) == ["voi_lut"]
    older = {k: v for k, v in old.items() if k not in ("site_aug", "freeze")}  # before those lists existed
    assert cfg.differences(older) == []
    assert _cfg(folders, tmp_path / "run", site_aug=("blur",)).differences(older) == ["site_aug"]


def test_init_starts_from_a_checkpoint_and_records_it(folders, tmp_path):
    first = run_train(_cfg(folders, tmp_path / "a", epochs=1))
    base = load_checkpoint(first.out / "best.safetensors")
    second = run_train(_cfg(folders, tmp_path / "b", epochs=1, init=str(first.out / "best.safetensors"),
                            lr=0.0))  # no learning: the weights stay those it started from
    after = load_checkpoint(second.out / "last.safetensors")
    for key, value in base.state_dict.items():
        assert torch.equal(after.state_dict[key], value), key
    # weights given by path are named by their sha256
    assert after.extra["init"] == {"weights": f"sha256:{base.sha256[:12]}",
                                   "file": str(first.out / "best.safetensors"), "sha256": base.sha256}
    assert after.trained_image_size == 64
    with pytest.raises(UsageError, match="is not this run's"):
        run_train(_cfg(folders, tmp_path / "c", epochs=1, variant="unet", init=str(first.out / "best.safetensors")))


@pytest.fixture(scope="module")
def start_weights(folders, tmp_path_factory):
    """A one-epoch tiny checkpoint (no calibration) for the runs that start from one."""
    run = run_train(_cfg(folders, tmp_path_factory.mktemp("start"), epochs=1, calibrate=False))
    return run.out / "best.safetensors"


def test_freeze_keeps_the_frozen_parts_exactly_and_trains_the_rest(folders, start_weights, tmp_path):
    start = load_checkpoint(start_weights).state_dict
    run = run_train(_cfg(folders, tmp_path / "b", init=str(start_weights), lr=1e-2,
                         freeze=("encoder", "classifier"), calibrate=False))
    after = load_checkpoint(run.out / "last.safetensors").state_dict
    frozen = [k for k in start if k.startswith(("encoder.", "classifier."))]
    trained = [k for k in start if k.startswith(("decoder.", "seg_out."))]
    assert frozen and trained and len(frozen) + len(trained) == len(start)
    for key in frozen:
        assert torch.equal(after[key], start[key]), key
    assert sum(not torch.equal(after[k], start[k]) for k in trained) == len(trained)
    manifest = json.loads((run.out / "run.json").read_text())
    model = create_model("multimix_tiny")
    assert manifest["frozen"] == {"encoder": sum(p.numel() for p in model.encoder.parameters()),
                                  "classifier": sum(p.numel() for p in model.classifier.parameters())}
    assert manifest["settings"]["freeze"] == ["encoder", "classifier"]
    assert manifest["temperature"] == 1.0 and manifest["temperature_from_init"] is True


def test_freezing_encoder_and_classifier_keeps_the_probabilities_of_init(folders, start_weights, tmp_path):
    init = load_checkpoint(start_weights)
    init.temperature = 0.6180  # as if fitted: it must be carried over, not refitted
    save_checkpoint(init, tmp_path / "init.safetensors")
    run = run_train(_cfg(folders, tmp_path / "b", init=str(tmp_path / "init.safetensors"), lr=1e-2,
                         freeze=("encoder", "classifier")))
    manifest = json.loads((run.out / "run.json").read_text())
    assert manifest["temperature"] == 0.6180 and manifest["temperature_from_init"] is True
    assert manifest["ece_before"] is None and manifest["temperature_kept_at_1"] is None
    for name in ("best", "last"):
        after = load_checkpoint(run.out / f"{name}.safetensors")
        assert after.temperature == 0.6180 and after.extra["temperature_from_init"] is True
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        want = torch.softmax(init.build_model()(x).cls_logits / init.temperature, 1)
        got = torch.softmax(after.build_model()(x).cls_logits / after.temperature, 1)
    assert torch.equal(got, want)
    # freezing the encoder alone refits the temperature as usual
    alone = run_train(_cfg(folders, tmp_path / "c", init=str(tmp_path / "init.safetensors"), freeze=("encoder",)))
    assert json.loads((alone.out / "run.json").read_text())["temperature_from_init"] is False


def test_freeze_refuses_what_cannot_be_frozen(folders, start_weights, tmp_path):
    init = str(start_weights)
    with pytest.raises(UsageError, match="--init"):
        _cfg(folders, tmp_path / "b", freeze=("encoder",))
    with pytest.raises(UsageError, match="unknown bridge"):
        _cfg(folders, tmp_path / "b", init=init, freeze=("bridge",))
    with pytest.raises(UsageError, match="nothing of model"):
        run_train(_cfg(folders, tmp_path / "c", init=init, freeze=("encoder", "classifier", "decoder")))
    unet = run_train(_cfg(folders, tmp_path / "u", epochs=1, variant="unet", calibrate=False))
    with pytest.raises(UsageError, match="has no classifier"):
        run_train(_cfg(folders, tmp_path / "d", variant="unet", init=str(unet.out / "best.safetensors"),
                       freeze=("classifier",)))


def test_unlabelled_data_feeds_both_unlabelled_streams(folders, tmp_path):
    from conftest import save_png8

    site = tmp_path / "site"
    for i in range(3):
        save_png8(site / f"u{i}.png", 64, 64, seed=50 + i)
    (site / "labels.csv").write_text("file,label\nu0.png,pneumonia\n")  # ignored: these are unlabelled
    run_train(_cfg(folders, tmp_path / "run", epochs=1, unlabelled_data=(str(site),)))
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    mine = splits[splits.source == str(site)]
    assert len(mine) == 3 and set(mine.split) == {"train"}
    assert set(mine.seg_role) == {"unlabelled"} and set(mine.cls_role) == {"unlabelled"}
    assert mine.label.isna().all() and (mine.has_mask == 0).all()


def test_calibration_keeps_temperature_1_on_a_small_validation_split():
    logits = torch.tensor([[3.0, -3.0], [-3.0, 3.0]] * 14)  # 28 images: under 30
    labels = torch.tensor([0, 1] * 14)
    t, before, after, kept = choose_temperature(logits, labels)
    assert t == 1.0 and after == before and "28 images, fewer than 30" in kept
    logits, labels = torch.cat([logits, logits[:4]]), torch.cat([labels, torch.zeros(4, dtype=torch.long)])
    labels[1:28:2][:11] = 0  # 32 images, 3 of class 1
    t, _, _, kept = choose_temperature(logits, labels)
    assert t == 1.0 and "3 images of a class, fewer than 5" in kept


def test_calibration_keeps_temperature_1_when_the_fit_does_not_lower_the_ece():
    # Two groups already calibrated (confidence 0.8 right 80 % of the time, 0.6 right 60 %): ECE 0,
    # and T = 1 is where the NLL is least, so no temperature can lower the ECE.
    z8, z6 = math.log(0.8 / 0.2), math.log(0.6 / 0.4)
    logits, labels = [], []
    for z, right in ((z8, 20), (z6, 15)):
        for k in range(25):
            predicted = k % 2
            logits.append([z / 2, -z / 2] if predicted == 0 else [-z / 2, z / 2])
            labels.append(predicted if k < right else 1 - predicted)
    logits, labels = torch.tensor(logits), torch.tensor(labels)
    t, before, after, kept = choose_temperature(logits, labels)
    assert before == pytest.approx(0.0, abs=1e-6)
    assert t == 1.0 and after == before and "did not lower the validation ECE" in kept


def test_calibration_fits_a_bounded_temperature_that_lowers_the_ece():
    torch.manual_seed(0)
    true_logits = torch.randn(400, 2) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1)[:, 0]
    t, before, after, kept = choose_temperature(true_logits * 3, labels)
    assert kept is None and t == pytest.approx(3.0, rel=0.2) and after < before
    # Labels that contradict every prediction would want T -> 0 (flip): the fit stops at the bound.
    assert fit_temperature(torch.tensor([[5.0, -5.0], [-5.0, 5.0]] * 20), torch.tensor([1, 0] * 20)) == (
        pytest.approx(T_RANGE[1], rel=1e-6))


def test_run_json_records_sampling_site_augmentation_and_calibration(folders, tmp_path):
    seg, cls = folders
    run_train(_cfg(folders, tmp_path / "r", cls_data=(str(cls), str(seg)), balance_sources=True,
                   site_aug=("gamma", "rotate")))
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["settings"]["site_aug"] == ["gamma", "rotate"] and run["settings"]["balance_sources"] is True
    assert run["site_augment"] == {"gamma": {"p": 0.3, "range": [-0.4, 0.4], "unit": "log of the gamma exponent"},
                                   "rotate": {"p": 0.3, "range": [-10.0, 10.0], "unit": "degrees"}}
    # seg images have no labels: they are unlabelled classification images next to cls's
    assert run["sampling"]["cls_u"] == {str(seg): 1.0}
    assert set(run["sampling"]["seg_u"]) == {str(cls)}
    # 2 validation labels: too few to fit a temperature
    assert run["temperature"] == 1.0 and "fewer than 30" in run["temperature_kept_at_1"]
    assert load_checkpoint(tmp_path / "r" / "best.safetensors").extra["calibration_kept"].startswith("validation")
    with pytest.raises(UsageError, match="--site-aug: unknown sharpen"):
        _cfg(folders, tmp_path / "x", site_aug=("sharpen",))


def test_bf16_training_fits_its_temperature_on_float32_logits(folders, tmp_path, monkeypatch):
    # predict's classifier runs in float32 (fp32 and mixed alike), so calibration does too
    from mmcli.training import trainer

    seen = []
    real = trainer.finish_checkpoints

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "finish_checkpoints", spy)
    summary = run_train(_cfg(folders, tmp_path / "bf16", precision="bf16"))
    assert seen == ["fp32"]
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["precision"] == "bf16"
    assert summary.epochs_run == 1
