"""``mmcli explain`` end to end, and the Adebayo et al. (2018) model-randomisation sanity check."""

import csv

import h5py
import numpy as np
import pytest
import torch
from conftest import radiograph_like, save_png8
from PIL import Image
from typer.testing import CliRunner

from mmcli.cli import app
from mmcli.config import PreprocessConfig
from mmcli.data.datasets import load_case
from mmcli.data.transforms import preprocess
from mmcli.explain import mass_inside
from mmcli.inference import Predictor
from mmcli.io.discover import InputFile
from mmcli.models import create_model, model_kwargs
from mmcli.weights import Checkpoint, load_checkpoint, save_checkpoint

runner = CliRunner()


def _run(args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _rows(path):
    with open(path, newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def test_explain_end_to_end_and_resume(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    save_png8(scans / "a.png", 64, 64, seed=1)
    save_png8(scans / "sub" / "b.png", 90, 70, seed=2)
    (scans / "bad.png").write_text("not an image")
    out = tmp_path / "why"
    # float32, so that the lungs below are those of a plain float32 forward
    res = _run(["explain", scans, "--out", out, "-w", tiny_weights, "-b", "2", "-q", "--raw-masks",
                "--precision", "fp32"])
    assert res.exit_code == 1  # the bad file fails alone
    rows = _rows(out / "explain.csv")
    assert rows["bad"]["status"] == "error" and "not an image" in rows["bad"]["error"]
    for case_id, (h, w) in {"a": (64, 64), "sub/b": (90, 70)}.items():
        row = rows[case_id]
        # synthetic images: quality control may call them doubtful, and then the label says so
        assert row["status"] == "ok" and row["label"] in ("normal", "pneumonia", "uncertain")
        assert (row["label"] == "uncertain") <= bool(row["qa_flags"])
        assert 0 <= float(row["saliency_in_lungs"]) <= 1 and 0 <= float(row["gradcam_in_lungs"]) <= 1
        for view in ("saliency", "gradcam"):
            with Image.open(out / row[f"{view}_png"]) as img:
                assert img.mode == "RGB" and img.size == (w, h)  # native resolution
    # the HDF5 saliency is exactly the tensor the model's forward feeds its decoder
    ckpt = load_checkpoint(tiny_weights)
    model = ckpt.build_model().eval()
    item = load_case(InputFile(scans / "sub" / "b.png", "sub/b"), ckpt.preprocess)
    with torch.no_grad():
        forward = model(item["image"][None])
    with h5py.File(out / "maps.h5") as h5:
        saliency, cam = h5["saliency/sub/b"][()], h5["gradcam/sub/b"][()]
        assert set(h5["saliency"]) == {"a", "sub"}
    assert saliency.shape == cam.shape == (64, 64) and saliency.dtype == np.float32
    np.testing.assert_allclose(saliency, forward.saliency[0, 0].numpy(), atol=1e-6)
    assert cam.max() == pytest.approx(1.0) and cam.min() >= 0
    lungs = forward.seg_logits[0, 0].numpy() >= 0
    assert float(rows["sub/b"]["saliency_in_lungs"]) == pytest.approx(mass_inside(saliency, lungs), abs=1e-5)
    assert not (out / ".partial").exists()

    before = (out / "saliency" / "a.png").stat().st_mtime_ns
    res = _run(["explain", scans, "--out", out, "-w", tiny_weights, "--raw-masks", "--precision", "fp32"])
    assert res.exit_code == 1 and "(2 resumed)" in res.output
    assert (out / "saliency" / "a.png").stat().st_mtime_ns == before
    with h5py.File(out / "maps.h5") as h5:  # resumed cases keep their maps
        np.testing.assert_array_equal(h5["saliency/sub/b"][()], saliency)


def test_explain_usage_errors(tmp_path, tiny_weights):
    save_png8(tmp_path / "x.png", 64, 64)
    res = _run(["explain", tmp_path / "x.png", "--out", tmp_path / "r.csv", "-w", tiny_weights])
    assert res.exit_code == 2 and "folder" in res.output
    kwargs = model_kwargs("multimix_tiny", bridge=False)
    no_bridge = tmp_path / "nobridge.safetensors"
    save_checkpoint(Checkpoint("multimix_tiny", kwargs, create_model("multimix_tiny", **kwargs).state_dict(),
                               preprocess=PreprocessConfig(image_size=64)), no_bridge)
    res = _run(["explain", tmp_path / "x.png", "--out", tmp_path / "r", "-w", no_bridge])
    assert res.exit_code == 2 and "saliency bridge" in res.output


def _rank_correlations(a, b):
    """Spearman correlation of each pair of maps in (B, 1, S, S) batches."""
    def ranks(t):
        return np.argsort(np.argsort(t.ravel().numpy())).astype(float)

    return [np.corrcoef(ranks(a[i]), ranks(b[i]))[0, 1] for i in range(a.shape[0])]


def test_saliency_changes_when_weights_are_randomised(tiny_weights):
    """Adebayo et al. 2018: a map that survives randomising the model explains nothing about it."""
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    model = predictor.model
    x = torch.stack([preprocess(radiograph_like(64, 64, seed), predictor.preprocess) for seed in range(3)])
    trained = predictor.explain(x)
    again = predictor.explain(x)
    assert torch.equal(trained.saliency, again.saliency) and torch.equal(trained.gradcam, again.gradcam)

    torch.manual_seed(123)  # cascading randomisation: the classifier head first, then everything
    for module in model.classifier.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    head = predictor.explain(x)
    assert max(_rank_correlations(trained.saliency, head.saliency)) < 0.6
    assert max(_rank_correlations(trained.gradcam, head.gradcam)) < 0.9
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    everything = predictor.explain(x)
    assert max(_rank_correlations(trained.saliency, everything.saliency)) < 0.6


def test_mass_inside():
    heat = np.array([[1.0, 3.0], [0.0, 0.0]])
    mask = np.array([[True, False], [True, False]])
    assert mass_inside(heat, mask) == pytest.approx(0.25)
    assert np.isnan(mass_inside(np.zeros((2, 2)), mask))
