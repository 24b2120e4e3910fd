"""The default weights in weights/: they load, match their sha256 and behave on the shipped examples."""

from pathlib import Path

import pytest
from conftest import read_rows

from mmcli.predict import PredictConfig, run_predict
from mmcli.qa.ood import OODStats
from mmcli.weights import WEIGHTS_DIRS, file_sha256, load_weights, read_registry

ROOT = Path(__file__).parents[1]
registry = read_registry()
pytestmark = pytest.mark.skipif(registry is None or not registry[1].get("default"), reason="no default weights")


def test_default_weights_load_and_match_sha256():
    folder, reg = registry
    entry = reg["weights"][reg["default"]]
    assert file_sha256(folder / entry["file"]) == entry["sha256"]
    ckpt = load_weights()
    assert ckpt.sha256 == entry["sha256"] and ckpt.model_name == "multimix"
    assert ckpt.class_names == ("normal", "pneumonia") and ckpt.preprocess.image_size == 256
    assert folder in WEIGHTS_DIRS
    # the registry's description of the weights is the checkpoint's own
    assert entry["model"] == ckpt.model_name and tuple(entry["class_names"]) == ckpt.class_names
    assert entry["preprocess"] == ckpt.preprocess.to_dict()
    assert entry["temperature"] == pytest.approx(ckpt.temperature, abs=1e-6)
    # calibrated: a fitted temperature, or the reason the fit was not kept (it did not lower the validation ECE)
    assert ckpt.temperature != 1.0 or "did not lower the validation ECE" in ckpt.extra["calibration_kept"]
    assert (folder / entry["card"]).is_file()


def test_default_weights_on_the_examples(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCLI_WEIGHTS", raising=False)
    rows = {}
    cfg = PredictConfig(inputs=(str(ROOT / "examples" / "scans"),), out=tmp_path / "r.csv", workers=0)
    summary = run_predict(cfg, on_case=lambda row: rows.update({row["case_id"]: row}))
    assert summary.ok == 5 and summary.failed == 0
    for row in rows.values():  # lungs cover a plausible share of a chest radiograph
        assert 0.10 <= row["lung_fraction"] <= 0.60, row
    truth = {Path(r["file"]).stem: r["label"] for r in read_rows(ROOT / "examples" / "scans" / "labels.csv")}
    p = {lab: [rows[c]["p_pneumonia"] for c, t in truth.items() if t == lab] for lab in ("normal", "pneumonia")}
    assert min(p["pneumonia"]) > max(p["normal"])  # the labelled examples are ranked right
    for label in ("normal", "pneumonia"):  # and each class has an example labelled right
        assert any(rows[c]["label"] == label for c, lab in truth.items() if lab == label)


@pytest.mark.parametrize("name", sorted(registry[1]["weights"]) if registry else [])
def test_every_registered_weights_file_loads_by_name(name):
    folder, reg = registry
    entry = reg["weights"][name]
    ckpt = load_weights(name)
    assert ckpt.sha256 == entry["sha256"] == file_sha256(folder / entry["file"])
    assert entry["temperature"] == pytest.approx(ckpt.temperature, abs=1e-6)
    assert OODStats.from_checkpoint(ckpt.tensors, ckpt.extra) is not None  # quality control has its statistics
