"""CUDA paths: training with the image table on the GPU, and predict on the GPU against the CPU.

Skipped without a CUDA device (run them with ``pytest -m gpu`` on a GPU machine).
"""

import numpy as np
import pytest
import torch
from conftest import save_png8
from test_train_data import make_folders

from mmcli.config import PreprocessConfig
from mmcli.inference import Predictor
from mmcli.training import TrainConfig, run_train
from mmcli.weights import load_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_train_on_gpu_then_predict_matches_cpu(tmp_path):
    seg, cls = make_folders(tmp_path / "data")
    cfg = TrainConfig(out=str(tmp_path / "run"), seg_data=(str(seg),), cls_data=(str(cls),), arch="tiny",
                      image_size=64, batch_size=2, steps_per_epoch=3, val_fraction=0.25, device="cuda", epochs=2)
    summary = run_train(cfg)
    assert summary.epochs_run == 2 and all(np.isfinite(r["loss"]) for r in summary.history)
    assert 0.0 <= summary.history[-1]["val_dice"] <= 1.0
    ckpt = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert ckpt.preprocess == PreprocessConfig(image_size=64)
    x = torch.rand(3, 1, 64, 64)
    cpu = Predictor(ckpt, device="cpu", precision="fp32").predict(x)
    gpu = Predictor(ckpt, device="cuda", precision="fp32").predict(x)
    torch.testing.assert_close(gpu.probabilities, cpu.probabilities, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpu.mask_logits, cpu.mask_logits, atol=1e-2, rtol=1e-3)
    bf16 = Predictor(ckpt, device="cuda", precision="bf16").predict(x)
    assert (torch.sigmoid(bf16.mask_logits) - torch.sigmoid(cpu.mask_logits)).abs().max() < 0.05


def test_predict_cli_on_gpu(tmp_path, tiny_weights):
    from typer.testing import CliRunner

    from mmcli.cli import app

    for i in range(3):
        save_png8(tmp_path / "scans" / f"s{i}.png", 120, 100, seed=i)
    cpu = CliRunner().invoke(app, ["predict", str(tmp_path / "scans"), "--out", str(tmp_path / "cpu.csv"),
                                   "--weights", str(tiny_weights), "--device", "cpu", "--precision", "fp32",
                                   "-q"])  # auto would pick mixed on a CPU with native bf16
    gpu = CliRunner().invoke(app, ["predict", str(tmp_path / "scans"), "--out", str(tmp_path / "gpu.csv"),
                                   "--weights", str(tiny_weights), "--device", "cuda", "--precision", "fp32", "-q"])
    assert cpu.exit_code == 0 and gpu.exit_code == 0, (cpu.output, gpu.output)
    import pandas as pd

    a, b = pd.read_csv(tmp_path / "cpu.csv"), pd.read_csv(tmp_path / "gpu.csv")
    assert list(a["case_id"]) == list(b["case_id"])
    np.testing.assert_allclose(a["p_pneumonia"], b["p_pneumonia"], atol=1e-4)  # fp32: no TF32
    np.testing.assert_allclose(a["lung_fraction"], b["lung_fraction"], atol=0.01)


def test_auto_on_the_gpu_keeps_the_tolerances_of_fp32(tmp_path):
    # --precision auto is mixed on CUDA GPUs from Ampere on (bf16 decoder only, TF32 off for
    # the rest): probabilities those of the GPU's float32 and within 2e-3 of the CPU's, masks
    # within 0.1 % of the pixels of the GPU's float32, with the default weights on the
    # shipped example films. auto runs first, so that no earlier fp32 run has turned TF32 off.
    from pathlib import Path

    import pandas as pd

    from mmcli.io.writers import read_mask_png
    from mmcli.predict import PredictConfig, run_predict
    from mmcli.runtime import has_fast_bf16, resolve_precision

    if not has_fast_bf16(torch.device("cuda")):
        pytest.skip("auto is fp32 on GPUs without native bf16")
    assert resolve_precision("auto", torch.device("cuda")) == "mixed"
    scans = Path(__file__).parents[1] / "examples" / "scans"
    rows = {}
    for name, device, precision in (("auto", "cuda", "auto"), ("fp32", "cuda", "fp32"), ("cpu", "cpu", "fp32")):
        cfg = PredictConfig(inputs=(str(scans),), out=tmp_path / f"{name}.csv", device=device,
                            precision=precision, qa="off", raw_masks=True)
        assert run_predict(cfg).ok == 5
        rows[name] = pd.read_csv(tmp_path / f"{name}.csv").set_index("case_id")
    a = rows["fp32"]
    np.testing.assert_allclose(a["p_pneumonia"], rows["auto"].loc[a.index, "p_pneumonia"], atol=1e-6)
    np.testing.assert_allclose(a["p_pneumonia"], rows["cpu"].loc[a.index, "p_pneumonia"], atol=2e-3)
    for case in a.index:
        ma, mb = (read_mask_png(tmp_path / rows[p].loc[case, "mask"]) for p in ("fp32", "auto"))
        assert (ma != mb).mean() < 1e-3, case


def test_gpu_pipeline_matches_the_cpu_engine(tmp_path, tiny_weights):
    # masks at native size from the device, cases finished in processes: the same rows and masks
    import pandas as pd

    from mmcli.io.writers import read_mask_png
    from mmcli.predict import PredictConfig, run_predict

    for i in range(6):
        save_png8(tmp_path / "scans" / f"s{i}.png", 300 + 7 * i, 260, seed=i)
    frames = {}
    for device in ("cpu", "cuda"):
        cfg = PredictConfig(inputs=(str(tmp_path / "scans"),), out=tmp_path / device / "r.csv",
                            weights=str(tiny_weights), device=device, precision="fp32", workers=2)
        assert run_predict(cfg).ok == 6
        frames[device] = pd.read_csv(tmp_path / device / "r.csv").set_index("case_id")
    a, b = frames["cpu"], frames["cuda"]
    np.testing.assert_allclose(a["p_pneumonia"], b.loc[a.index, "p_pneumonia"], atol=1e-4)
    for case in a.index:
        ma = read_mask_png(tmp_path / "cpu" / a.loc[case, "mask"])
        mb = read_mask_png(tmp_path / "cuda" / b.loc[case, "mask"])
        assert ma.shape == mb.shape and (ma != mb).mean() < 1e-3, case


def test_the_loader_pins_a_batch_of_cases(tmp_path):
    """CaseBatch knows pin_memory, so the images copy to the GPU asynchronously."""
    from mmcli.config import ReadOptions
    from mmcli.data.datasets import RadiographDataset, collate_cases
    from mmcli.io.discover import InputFile

    files = [InputFile(save_png8(tmp_path / f"s{i}.png", 80, 72, seed=i), f"s{i}") for i in range(2)]
    loader = torch.utils.data.DataLoader(RadiographDataset(files, PreprocessConfig(image_size=64), ReadOptions()),
                                         batch_size=2, collate_fn=collate_cases, pin_memory=True)
    batch = next(iter(loader))
    assert batch.images.is_pinned() and [c.index for c in batch.cases] == [0, 1]
