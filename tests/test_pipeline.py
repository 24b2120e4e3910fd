import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_png8

import mmcli.pipeline as pipeline
from mmcli.inference import Predictor
from mmcli.predict import PredictConfig, run_predict
from mmcli.weights import load_checkpoint


@pytest.fixture()
def folder(tmp_path):
    for i in range(5):
        save_png8(tmp_path / "scans" / f"img{i}.png", 70 + i, 60, seed=i)
    save_png8(tmp_path / "scans" / "crash.png", 64, 64)
    return tmp_path / "scans"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers inherit the patched reader")
def test_a_crashing_worker_costs_only_its_file(tmp_path, folder, tiny_weights, monkeypatch):
    real = pipeline.load_case

    def crashing(file, *args, **kwargs):
        if file.path.name == "crash.png":
            os._exit(3)  # a decoder that takes the whole process down
        return real(file, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_case", crashing)
    cfg = PredictConfig(inputs=(str(folder),), out=tmp_path / "r.csv", weights=str(tiny_weights),
                        device="cpu", workers=2, batch_size=3)
    rows = {}
    summary = run_predict(cfg, on_case=lambda row: rows.update({row["case_id"]: row}))
    assert summary.ok == 5 and summary.failed == 1
    assert rows["crash"]["error"] == pipeline.CRASH_REASON
    assert all(rows[f"img{i}"]["status"] == "ok" for i in range(5))


def test_process_and_loader_engines_agree(tmp_path, folder, tiny_weights):
    files = sorted(p for p in folder.iterdir() if p.name != "crash.png")
    results = {}
    for engine, workers in (("processes", 2), ("loader", 0)):
        cfg = PredictConfig(inputs=tuple(map(str, files)), out=tmp_path / f"{engine}.csv",
                            weights=str(tiny_weights), device="cpu", workers=workers)
        rows = []
        run_predict(cfg, on_case=rows.append)
        results[engine] = {r["case_id"]: r for r in rows}
    for case_id, row in results["processes"].items():
        other = results["loader"][case_id]
        assert row["p_pneumonia"] == pytest.approx(other["p_pneumonia"], abs=1e-5)
        assert row["lung_fraction"] == pytest.approx(other["lung_fraction"], abs=2e-3)


def test_bf16_autocast_stays_close_to_fp32(tiny_weights):
    ckpt = load_checkpoint(tiny_weights)
    torch.manual_seed(0)
    x = torch.randn(4, 1, 64, 64)
    fp32 = Predictor(ckpt, device="cpu", precision="fp32").predict(x)
    bf16 = Predictor(ckpt, device="cpu", precision="bf16").predict(x)
    assert bf16.probabilities.dtype == torch.float32
    assert torch.allclose(fp32.probabilities, bf16.probabilities, atol=0.05)
    agree = ((fp32.mask_logits >= 0) == (bf16.mask_logits >= 0)).float().mean()
    assert agree > 0.9


def test_imports_point_one_way():
    root = Path(pipeline.__file__).parent
    rules = {"io": ("torch", "mmcli.data", "mmcli.models", "mmcli.cli"), "models": ("mmcli.io", "mmcli.cli")}
    for sub, banned in rules.items():
        for path in (root / sub).glob("*.py"):
            text = path.read_text()
            for name in banned:
                assert f"import {name}" not in text and f"from {name}" not in text, (path, name)
    for path in root.rglob("*.py"):
        if "cli" not in path.relative_to(root).parts and path.name != "__main__.py":
            text = path.read_text()
            assert "from mmcli.cli" not in text and "import typer" not in text and "import rich" not in text, path


def test_loader_engine_with_decoding_workers(tmp_path, folder, tiny_weights):
    # the GPU path (DataLoader workers decode, the main process predicts), run on the CPU
    from mmcli.io.discover import discover_inputs

    files = [f for f in discover_inputs([folder]) if f.case_id != "crash"]
    files.append(type(files[0])(path=tmp_path / "missing.png", case_id="missing"))
    predictor = Predictor(load_checkpoint(tiny_weights), device="cpu", precision="fp32")
    rs = pipeline.RowSettings(0.5, tmp_path / "masks", tmp_path, ("normal", "pneumonia"))
    rows = list(pipeline.iter_rows_loader(predictor, files, rs, batch_size=2, workers=2))
    assert [r["case_id"] for r in rows] == [f.case_id for f in files]  # input order kept
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["error"]
    direct = pipeline.predict_files(predictor, files[:5], rs)
    for a, b in zip(rows, direct, strict=False):
        assert a["p_pneumonia"] == pytest.approx(b["p_pneumonia"], abs=1e-5)


def test_spawned_workers_after_cuda_use(tmp_path, folder, tiny_weights, monkeypatch):
    # A process that has used CUDA must not fork model workers (autograd refuses to run in
    # the child): the engine spawns them instead, with the same results.
    files = sorted(p for p in folder.iterdir() if p.name != "crash.png")[:2]
    rows = {}
    for name in ("fork", "spawn"):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda name=name: name == "spawn")
        assert pipeline._mp_context().get_start_method() == (name if sys.platform.startswith("linux") else "spawn")
        cfg = PredictConfig(inputs=tuple(map(str, files)), out=tmp_path / f"{name}.csv", weights=str(tiny_weights),
                            device="cpu", workers=2, batch_size=1)
        got = []
        run_predict(cfg, on_case=got.append)
        rows[name] = {r["case_id"]: r for r in got}
    assert rows["spawn"].keys() == rows["fork"].keys() and len(rows["spawn"]) == 2
    for case_id, row in rows["spawn"].items():
        assert row["status"] == "ok"
        assert row["p_pneumonia"] == rows["fork"][case_id]["p_pneumonia"]
