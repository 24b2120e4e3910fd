"""--precision: what auto picks, and that mixed keeps its word against float32."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_png8

from mmcli import runtime
from mmcli.data.transforms import preprocess
from mmcli.errors import UsageError
from mmcli.inference import Predictor
from mmcli.io.readers import read_radiograph
from mmcli.io.writers import read_mask_png
from mmcli.predict import PredictConfig, run_predict
from mmcli.weights import load_checkpoint, load_weights, read_registry

ROOT = Path(__file__).parents[1]
CPU = torch.device("cpu")


@pytest.mark.parametrize(("fast", "expected"), [(True, "mixed"), (False, "fp32")])
def test_auto_is_mixed_only_where_the_cpu_has_native_bf16(monkeypatch, fast, expected):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    assert runtime.resolve_precision("auto", CPU) == expected
    # training keeps float32 on every CPU, and forced precisions are kept as given
    assert runtime.resolve_precision("auto", CPU, training=True) == "fp32"
    assert [runtime.resolve_precision(p, CPU) for p in ("fp32", "mixed", "bf16")] == ["fp32", "mixed", "bf16"]


def test_mixed_is_refused_for_training_and_unknown_precisions_everywhere():
    with pytest.raises(UsageError, match=r"--precision mixed is for predict, explain and evaluate; training takes "
                                         r"auto, fp32, bf16"):
        runtime.resolve_precision("mixed", CPU, training=True)
    with pytest.raises(UsageError, match=r"Unknown precision 'fp16': use auto, fp32, mixed, bf16"):
        runtime.resolve_precision("fp16", CPU)
    assert runtime.decoder_dtype("mixed") is torch.bfloat16
    assert runtime.decoder_dtype("fp32") is None and runtime.decoder_dtype("bf16") is None


def test_mixed_keeps_probabilities_and_saliency_of_fp32_bit_for_bit(tiny_weights):
    ckpt = load_checkpoint(tiny_weights)
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    fp32 = Predictor(ckpt, device="cpu", precision="fp32").predict(x)
    mixed = Predictor(ckpt, device="cpu", precision="mixed").predict(x)
    assert torch.equal(fp32.probabilities, mixed.probabilities)
    assert torch.equal(fp32.saliency, mixed.saliency)
    assert mixed.mask_logits.dtype == torch.float32
    assert not torch.equal(fp32.mask_logits, mixed.mask_logits)  # the decoder did run in bf16
    assert (fp32.mask_logits - mixed.mask_logits).abs().max() < 0.05
    # explain: the same probabilities; its decoder runs in the graph (other kernels, as in
    # float32), so its mask logits are within bf16 rounding of predict's
    explained = Predictor(ckpt, device="cpu", precision="mixed").explain(x)
    assert torch.equal(explained.probabilities, fp32.probabilities)
    assert (explained.mask_logits - mixed.mask_logits).abs().max() < 0.05


@pytest.mark.skipif(read_registry() is None, reason="no shipped weights")
@pytest.mark.skipif(not runtime.cpu_has_fast_bf16(), reason="auto picks mixed only on CPUs with native bf16")
def test_mixed_stays_within_the_tolerances_on_the_example_films(tmp_path):
    # probabilities within 2e-3 (here: equal) and every mask within 0.1 % of the pixels of
    # float32, with the default weights on the shipped films at their native size
    rows = {}
    for precision in ("fp32", "mixed"):
        cfg = PredictConfig(inputs=(str(ROOT / "examples" / "scans"),), out=tmp_path / f"{precision}.csv",
                            device="cpu", precision=precision, workers=0, raw_masks=True)
        assert run_predict(cfg).ok == 5
        rows[precision] = pd.read_csv(cfg.out).set_index("case_id")
    a, b = rows["fp32"], rows["mixed"].loc[rows["fp32"].index]
    np.testing.assert_array_equal(a["p_pneumonia"], b["p_pneumonia"])
    assert list(a["label"]) == list(b["label"])
    for case in a.index:
        ma, mb = (read_mask_png(tmp_path / t.loc[case, "mask"]) for t in (a, b))
        assert ma.shape == mb.shape and (ma != mb).mean() < 1e-3, case


@pytest.mark.skipif(read_registry() is None, reason="no shipped weights")
@pytest.mark.skipif(not runtime.cpu_has_fast_bf16(), reason="auto picks mixed only on CPUs with native bf16")
def test_mixed_does_not_depend_on_batch_size_or_threads(one_thread):
    ckpt = load_weights()
    pre = ckpt.preprocess
    files = sorted(f for f in (ROOT / "examples" / "scans").iterdir() if f.suffix != ".csv")
    x = torch.cat([preprocess(read_radiograph(f).pixels, pre) for f in files]).reshape(-1, 1, pre.image_size,
                                                                                           pre.image_size)
    predictor = Predictor(ckpt, device="cpu", precision="mixed")
    alone = [predictor.predict(x[i : i + 1]) for i in range(len(x))]
    torch.set_num_threads(2)
    together = predictor.predict(x)
    np.testing.assert_allclose(torch.cat([a.probabilities for a in alone]), together.probabilities, atol=1e-5)
    flipped = (torch.cat([a.mask_logits for a in alone]) >= 0) != (together.mask_logits >= 0)
    assert flipped.float().mean(dim=(1, 2, 3)).max() < 1e-3


@pytest.mark.parametrize("precision", ["mixed", "bf16"])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_slow(tmp_path, tiny_weights, monkeypatch, caplog,
                                                                 precision):
    scans = tmp_path / "scans"
    save_png8(scans / "a.png", 64, 64)
    for fast in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda fast=fast: fast)
        caplog.clear()
        cfg = PredictConfig(inputs=(str(scans),), out=tmp_path / f"{fast}.csv", weights=str(tiny_weights),
                            device="cpu", precision=precision, workers=0)
        assert run_predict(cfg).ok == 1
        slow = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
        assert slow == ([] if fast else [f"--precision {precision}: cpu has no native bf16 that mmcli knows of, so "
                                         "bf16 may be emulated there and many times slower than --precision fp32"])
