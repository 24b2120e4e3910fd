"""How far ``--precision mixed`` and ``bf16`` move predict's results from ``fp32``.

Runs ``mmcli predict`` on the CPU over real radiographs from the shared data (the first
``--n`` files of each set, in name order) once per precision, with the given weights, and
compares each case with its ``fp32`` result:

* ``|dp|``: the change of p(pneumonia), max over cases;
* mask pixels: the share of native-size mask pixels that differ, max and median over
  cases, for the delivered (anatomical) mask and, in a second run with ``--raw-masks``,
  the network's own mask;
* flags: cases whose quality-control flags differ, and cases whose label differs.

The tolerances of ``--precision`` are 2e-3 in probability and 0.1 % of the mask pixels;
a precision meets them when every case does. Then, on the same films at the model's size:

* batching: each precision's outputs one image at a time on one thread against batches
  of 8 on two threads (max change of probability and mask logit, max share of mask
  pixels flipped per image);
* timing on this CPU (one thread, batch 2, the precisions alternating ``--repeats``
  times), of the whole model and of its two parts: the float32 encoder with the saliency
  backward, and the decoder at each precision. Whether bf16 pays depends on the CPU
  (:func:`mmcli.runtime.cpu_has_fast_bf16`).

Prints markdown; ``--json`` writes the figures.

    python benchmarks/precision_agreement.py --json docs/results/precision-agreement-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmcli.data.transforms import preprocess
from mmcli.errors import MMCLIError
from mmcli.inference import Predictor
from mmcli.io.readers import read_radiograph
from mmcli.io.writers import read_mask_png
from mmcli.models.multimix import EncoderFeatures
from mmcli.predict import PredictConfig, run_predict
from mmcli.runtime import cpu_has_fast_bf16
from mmcli.weights import Checkpoint, load_weights

SETS = ("seg-in", "seg-cross", "cls-in", "cls-cross", "native-jpeg", "dicom")
PRECISIONS = ("fp32", "mixed", "bf16")
TOL_P, TOL_MASK = 2e-3, 1e-3


def _pick(data: Path, n: int) -> list[Path]:
    files = []
    for name in SETS:
        found = sorted(p for p in (data / name).iterdir() if p.suffix.lower() in (".png", ".jpeg", ".jpg", ".dcm"))
        files += found[:n]
    return files


def _run(files: list[Path], out: Path, weights: str, precision: str, raw: bool) -> pd.DataFrame:
    folder = out / "in"
    if not folder.exists():
        folder.mkdir(parents=True)
        for f in files:  # one flat folder, names made unique by their set
            (folder / f"{f.parent.name}__{f.name}").symlink_to(f.resolve())
    cfg = PredictConfig(inputs=(str(folder),), out=out / f"{precision}-{raw}.csv", weights=weights,
                        device="cpu", precision=precision, raw_masks=raw, overwrite=True)
    run_predict(cfg)
    return pd.read_csv(cfg.out).set_index("case_id")


def _compare(ref: pd.DataFrame, other: pd.DataFrame, base: Path) -> dict[str, float]:
    ok = ref.index[(ref["status"] == "ok") & (other.loc[ref.index, "status"] == "ok")]
    dp = (ref.loc[ok, "p_pneumonia"] - other.loc[ok, "p_pneumonia"]).abs()
    share = []
    for case in ok:
        a, b = (read_mask_png(base / t.loc[case, "mask"]) for t in (ref, other))
        share.append(float((a != b).mean()))
    flags_a, flags_b = (t.loc[ok, "qa_flags"].fillna("") for t in (ref, other))
    return {
        "cases": len(ok), "max_dp": float(dp.max()), "max_mask_share": max(share),
        "median_mask_share": statistics.median(share),
        "flags_differ": int((flags_a != flags_b).sum()),
        "labels_differ": int((ref.loc[ok, "label"] != other.loc[ok, "label"]).sum()),
    }


def _model_inputs(files: list[Path], ckpt: Checkpoint) -> torch.Tensor:
    pre = ckpt.preprocess
    images = []
    for f in files:
        try:
            images.append(preprocess(read_radiograph(f).pixels, pre))
        except MMCLIError:
            continue  # the reader's refusals are reported by the predict runs
    return torch.stack(images)


def _batching(x: torch.Tensor, ckpt: Checkpoint) -> dict[str, dict[str, float]]:
    report = {}
    for p in PRECISIONS:
        predictor = Predictor(ckpt, device="cpu", precision=p)
        torch.set_num_threads(1)
        alone = [predictor.predict(x[i : i + 1]) for i in range(len(x))]
        torch.set_num_threads(2)
        grouped = [predictor.predict(x[i : i + 8]) for i in range(0, len(x), 8)]
        a_p, g_p = (torch.cat([b.probabilities for b in r]) for r in (alone, grouped))
        a_m, g_m = (torch.cat([b.mask_logits for b in r]) for r in (alone, grouped))
        flipped = ((a_m >= 0) != (g_m >= 0)).float().mean(dim=(1, 2, 3))
        report[p] = {"images": len(x), "max_dp": float((a_p - g_p).abs().max()),
                     "max_dlogit": float((a_m - g_m).abs().max()), "max_mask_share": float(flipped.max())}
    torch.set_num_threads(1)
    return report


def _time_model(x: torch.Tensor, ckpt: Checkpoint, repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    predictors = {p: Predictor(ckpt, device="cpu", precision=p) for p in PRECISIONS}
    model = predictors["fp32"].model

    def encoder() -> tuple[EncoderFeatures, torch.Tensor]:
        """The float32 part of every precision: encoder, classifier, saliency backward."""
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            f = model.encode(leaf)
            return f.detach(), model.saliency(leaf, model.classify(f.bottleneck), retain_graph=False)

    features, saliency = encoder()
    bridge = model.bridge_input(x, saliency, size=features.skips[-1].shape[-2:])

    def decoder(dtype: torch.dtype | None) -> None:
        with torch.no_grad():
            model._decode(features, bridge, dtype)

    calls = {f"model {p}": (lambda pr=predictor: pr.predict(x)) for p, predictor in predictors.items()}
    calls["encoder and saliency fp32"] = encoder
    calls["decoder fp32"] = lambda: decoder(None)
    calls["decoder bf16"] = lambda: decoder(torch.bfloat16)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(repeats + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(t), 1) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--n", type=int, default=40, help="files per set")
    parser.add_argument("--weights", nargs="+", default=["multimix-cxr-v1", "multimix-cxr-v2"])
    parser.add_argument("--repeats", type=int, default=10, help="model timings per precision")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    files = _pick(args.data, args.n)
    report: dict[str, object] = {
        "files": len(files), "sets": list(SETS), "n_per_set": args.n, "cpu": platform.processor() or platform.machine(),
        "fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__, "agreement": {},
    }
    for weights in args.weights:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            for raw in (False, True):
                runs = {p: _run(files, out, weights, p, raw) for p in PRECISIONS}
                for p in PRECISIONS[1:]:
                    row = _compare(runs["fp32"], runs[p], out)
                    row["meets"] = row["max_dp"] <= TOL_P and row["max_mask_share"] <= TOL_MASK
                    report["agreement"][f"{weights} {'raw' if raw else 'anatomical'} {p}"] = row  # type: ignore[index]
    ckpt = load_weights(args.weights[-1])
    x = _model_inputs(files, ckpt)
    report["batching"] = _batching(x, ckpt)
    report["ms_per_call_of_2"] = _time_model(x[:2], ckpt, args.repeats)
    print(f"{len(files)} files, CPU fast bf16: {report['fast_bf16']}\n")
    print("| weights, mask, precision | cases | max abs dp | max / median mask pixels differing | flags differ "
          "| labels differ | within 2e-3 and 0.1 % |")
    print("|---|---|---|---|---|---|---|")
    for key, row in report["agreement"].items():  # type: ignore[attr-defined]
        print(f"| {key} | {row['cases']} | {row['max_dp']:.2e} | {100 * row['max_mask_share']:.3f} % / "
              f"{100 * row['median_mask_share']:.3f} % | {row['flags_differ']} | {row['labels_differ']} "
              f"| {'yes' if row['meets'] else 'no'} |")
    print(f"\nbatching, {args.weights[-1]}: one image on one thread against batches of 8 on two threads")
    for p, row in report["batching"].items():  # type: ignore[attr-defined]
        print(f"  {p}: {row['images']} images, max |dp| {row['max_dp']:.1e}, max |dlogit| {row['max_dlogit']:.1e}, "
              f"max mask pixels flipped {100 * row['max_mask_share']:.3f} %")
    print("ms per call of 2 (one thread):", report["ms_per_call_of_2"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
