"""Out-of-distribution statistics: fitting, the threshold's false-alarm rate, the checkpoint
round trip, the Predictor's distances, and training storing them."""

import math

import pandas as pd
import pytest
import torch
from conftest import make_checkpoint

from mmcli.errors import WeightsError
from mmcli.inference import Predictor
from mmcli.io.image import ImageFacts
from mmcli.qa.flags import OUT_OF_DISTRIBUTION
from mmcli.qa.ood import OODStats, fit_ood
from mmcli.qa.policy import case_flags
from mmcli.weights import load_checkpoint, save_checkpoint


def _gaussian(n, dim=8, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * torch.linspace(0.5, 2.0, dim) + shift


def test_the_threshold_flags_the_stated_share_of_calibration_images():
    stats = fit_ood(_gaussian(2000), _gaussian(5000, seed=1), false_alarm=0.05, shrinkage=0.0)
    fresh = stats.distance(_gaussian(20000, seed=2))
    assert float((fresh > stats.threshold).float().mean()) == pytest.approx(0.05, abs=0.01)
    far = stats.distance(_gaussian(200, shift=3.0, seed=3))
    assert float((far > stats.threshold).float().mean()) > 0.99
    # without shrinkage the distance is the exact squared Mahalanobis distance (chi-square, dim 8)
    assert float(fresh.mean()) == pytest.approx(8.0, rel=0.05)
    assert stats.info == {"feature": "bottleneck mean", "false_alarm": 0.05, "shrinkage": 0.0, "n_fit": 2000,
                          "n_calibration": 5000}


def test_statistics_round_trip_through_a_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "w.safetensors")
    ckpt = load_checkpoint(path)
    assert OODStats.from_checkpoint(ckpt.tensors, ckpt.extra) is None  # weights from before
    stats = fit_ood(_gaussian(100, dim=64), _gaussian(50, dim=64, seed=1))
    tensors, meta = stats.to_checkpoint()
    ckpt.tensors, ckpt.extra = tensors, {**ckpt.extra, "ood": meta}
    save_checkpoint(ckpt, path)
    back = load_checkpoint(path)
    assert set(back.state_dict) == set(ckpt.state_dict)  # the statistics are not model weights
    again = OODStats.from_checkpoint(back.tensors, back.extra)
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.precision, stats.precision)
    assert again.threshold == stats.threshold and again.info == stats.info
    back.build_model()  # and the model still loads strictly
    back.extra["ood"] = {"threshold": "x"}
    with pytest.raises(WeightsError, match="incomplete"):
        OODStats.from_checkpoint(back.tensors, back.extra)


def test_the_predictor_gives_distances_and_the_flag(tmp_path):
    path = make_checkpoint(tmp_path / "w.safetensors")
    ckpt = load_checkpoint(path)
    model = ckpt.build_model().eval()
    images = torch.randn(6, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.encode(images).bottleneck.mean(dim=(2, 3))
    stats = fit_ood(feats[:4], feats[4:5])
    tensors, meta = stats.to_checkpoint()
    ckpt.tensors, ckpt.extra = tensors, {"ood": meta}
    save_checkpoint(ckpt, path)
    predictor = Predictor(load_checkpoint(path), device="cpu", precision="fp32")
    pred = predictor.predict(images)
    torch.testing.assert_close(pred.ood_distance, stats.distance(feats), rtol=1e-4, atol=1e-4)
    assert pred.ood_threshold == stats.threshold
    far = pred.ood_distance > stats.threshold
    for k in range(6):
        flags = case_flags(ImageFacts(64, 64), None, pred, k, "warn")
        assert (OUT_OF_DISTRIBUTION in flags) == bool(far[k])
        assert case_flags(ImageFacts(64, 64), None, pred, k, "off") == []
    explained = predictor.explain(images)
    torch.testing.assert_close(explained.ood_distance, pred.ood_distance, rtol=1e-4, atol=1e-4)


def test_training_stores_the_statistics(tmp_path):
    from test_train import _cfg
    from test_train_data import make_folders

    from mmcli.training import run_train

    folders = make_folders(tmp_path / "data")
    summary = run_train(_cfg(folders, tmp_path / "run", epochs=1))
    for name in ("best", "last"):
        ckpt = load_checkpoint(tmp_path / "run" / f"{name}.safetensors")
        stats = OODStats.from_checkpoint(ckpt.tensors, ckpt.extra)
        assert stats is not None and math.isfinite(stats.threshold)
        assert ckpt.extra["ood"]["threshold_on"] == "validation split" and ckpt.extra["ood"]["n_fit"] >= 2
    assert summary.out == tmp_path / "run"
    # The flag guards the pneumonia answer: fitted on the films whose labels the classifier learnt from.
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    meta = load_checkpoint(tmp_path / "run" / "best.safetensors").extra["ood"]
    assert meta["n_fit"] == (splits["cls_role"] == "labelled").sum() < (splits["split"] == "train").sum()
    assert meta["n_calibration"] == (splits["cls_role"] == "val").sum()
    assert meta["fitted_on"] == "training split (labelled classification images)"
    run_train(_cfg(folders, tmp_path / "unet", epochs=1, variant="unet"))  # no classifier: every image
    meta = load_checkpoint(tmp_path / "unet" / "best.safetensors").extra["ood"]
    splits = pd.read_csv(tmp_path / "unet" / "splits.csv")
    assert meta["fitted_on"] == "training split (all images)" and meta["n_fit"] == (splits["split"] == "train").sum()
