"""Refit a trained checkpoint's out-of-distribution statistics on every film it trained on, and measure.

``mmcli train`` fits the statistics on the images whose *labels* the classifier learnt
from (the flag guards the pneumonia answer). With several sources that leaves out the
films the network learnt masks from, or used unlabelled: weights v3 learnt lung masks on
adult COVID-19 films (seg-adult), and their training statistics flag a third of such
films. This script refits the mean and covariance on the bottleneck features of every
training image of the run (``splits.csv``, split ``train``) and the threshold on every
validation image (split ``val``) at the same false-alarm rate (2 %), and reports, per
held-out set of an ``mmcli evaluate`` run of the same weights, the share of films with
any flag before and after (the other flags are taken from the evaluation as they are).

    python benchmarks/ood_refit.py --run runs/v3/B-all/train --eval runs/v3/B-all/eval \\
        --out weights/multimix-cxr-v3.safetensors --json docs/results/ood-refit-v3.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from ood_stats import features  # noqa: E402

from mmcli.io.readers import read_radiograph  # noqa: E402
from mmcli.qa.flags import OUT_OF_DISTRIBUTION  # noqa: E402
from mmcli.qa.ood import FALSE_ALARM, OODStats, fit_ood  # noqa: E402
from mmcli.weights import load_checkpoint, save_checkpoint  # noqa: E402


def file_features(model: torch.nn.Module, pre, files: list[str]) -> torch.Tensor:
    """``features`` of ``ood_stats.py`` for files (the shared films are 256 px: all fit in memory)."""
    return features(model, pre, [read_radiograph(f).pixels for f in files])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the mmcli train folder")
    ap.add_argument("--eval", type=Path, required=True, help="an mmcli evaluate folder of its best.safetensors")
    ap.add_argument("--out", type=Path, required=True, help="where the checkpoint with the refitted statistics goes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.run / "best.safetensors")
    model = ckpt.build_model().eval()
    with open(args.run / "splits.csv", newline="", encoding="utf-8") as f:
        split = list(csv.DictReader(f))
    fit_files = sorted({r["file"] for r in split if r["split"] == "train"})
    val_files = sorted({r["file"] for r in split if r["split"] == "val"})
    stats = fit_ood(file_features(model, ckpt.preprocess, fit_files), file_features(model, ckpt.preprocess, val_files),
                    false_alarm=FALSE_ALARM)
    old = OODStats.from_checkpoint(ckpt.tensors, ckpt.extra)
    with open(args.eval / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    test = file_features(model, ckpt.preprocess, [r["source"] for r in rows])
    new_flag = (stats.distance(test) > stats.threshold).tolist()
    result: dict = {"n_fit": len(fit_files), "n_threshold": len(val_files), "threshold": stats.threshold,
                    "old": (old.info | {"threshold": old.threshold}) if old else None, "any_flag": {}}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["dataset"] == name]
        before = sum(bool(rows[i]["qa_flags"]) for i in idx)
        others = [[f for f in (rows[i]["qa_flags"] or "").split(";") if f and f != OUT_OF_DISTRIBUTION] for i in idx]
        after = sum(bool(o) or new_flag[i] for o, i in zip(others, idx, strict=True))
        result["any_flag"][name] = {"n": len(idx), "before": before / len(idx), "after": after / len(idx),
                                    "ood_after": sum(new_flag[i] for i in idx) / len(idx)}
        print(f"{name:20s} n={len(idx):4d}  any flag {before / len(idx):.3f} -> {after / len(idx):.3f}")
    stats.attach(ckpt, fitted_on="every training image of the run (splits.csv: train)",
                 threshold_on="every validation image of the run (splits.csv: val)")
    save_checkpoint(ckpt, args.out)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
