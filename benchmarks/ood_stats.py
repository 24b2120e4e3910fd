"""Fit the out-of-distribution statistics of a checkpoint on its training split, and measure them.

For weights trained before the statistics existed (``multimix-cxr-v1``): the mean and
covariance come from the features of every image the weights were trained on (``part ==
train`` in ``docs/results/holdout.csv``). The threshold must come from images the weights
never saw (training images lie closer to their own statistics: a threshold fixed on them
flagged 8.6-9.4 % of unseen in-domain films at a nominal 5 %), so the held-out patients
are split in two by a stable hash of the patient: one half fixes the threshold at the
stated false-alarm rate, the other half measures it. The cross-domain sets and synthetic
negatives (inverted and rotated films) show what the flag catches. ``--write`` stores
the statistics in the checkpoint. (``mmcli train`` does the same with its own split:
mean and covariance from the training images, threshold from the validation images.)

    python benchmarks/ood_stats.py --data ../shared/data --weights weights/multimix-cxr-v1.safetensors --write
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmcli.data.transforms import preprocess
from mmcli.io.readers import read_radiograph
from mmcli.qa.ood import FALSE_ALARM, SHRINKAGE, bottleneck_features, fit_ood
from mmcli.weights import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def features(model: torch.nn.Module, pre, arrays: list[np.ndarray], batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(arrays), batch):
        x = torch.stack([preprocess(a, pre) for a in arrays[i : i + batch]])
        out.append(bottleneck_features(model, x))
    return torch.cat(out)


def read_set(folder: Path, names: list[str] | None = None) -> list[np.ndarray]:
    files = [folder / n for n in names] if names is not None else sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    return [read_radiograph(f).pixels for f in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "multimix-cxr-v1.safetensors")
    ap.add_argument("--holdout", type=Path, default=ROOT / "docs" / "results" / "holdout.csv")
    ap.add_argument("--false-alarm", type=float, nargs="+", default=[FALSE_ALARM, 0.01, 0.05])
    ap.add_argument("--shrinkage", type=float, nargs="+", default=[SHRINKAGE, 0.03, 0.1])
    ap.add_argument("--write", action="store_true",
                    help=f"store the statistics (shrinkage {SHRINKAGE}, the first --false-alarm) in --weights")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    ckpt = load_checkpoint(args.weights)
    model = ckpt.build_model().eval()
    with open(args.holdout, newline="") as f:
        split = list(csv.DictReader(f))

    def part(name: str, which: str) -> list[dict[str, str]]:
        return [r for r in split if r["set"] == name and r["part"] == which]

    def calibration(row: dict[str, str]) -> bool:  # half of the held-out patients, by a stable hash
        who = f"{row['set']}:{row['patient'] or row['file']}"
        return int(hashlib.sha1(who.encode()).hexdigest(), 16) % 2 == 0

    fit_rows = part("seg-in", "train") + part("cls-in", "train")
    held = part("seg-in", "test") + part("cls-in", "test")
    cal_rows = [r for r in held if calibration(r)]
    load = {r["set"]: None for r in split}
    arrays = {}
    for name in load:
        rows = [r for r in split if r["set"] == name]
        pixels = read_set(args.data / name, [r["file"] for r in rows])
        arrays.update({(name, r["file"]): p for r, p in zip(rows, pixels, strict=True)})
    feats = dict(zip(arrays, features(model, ckpt.preprocess, list(arrays.values())), strict=True))
    pick = lambda rows: torch.stack([feats[(r["set"], r["file"])] for r in rows])  # noqa: E731
    test = {f"{n} test": pick([r for r in part(n, "test") if not calibration(r)]) for n in ("seg-in", "cls-in")}
    cross = {n: features(model, ckpt.preprocess, read_set(args.data / n)) for n in ("seg-cross", "cls-cross",
                                                                                    "native-jpeg")}
    real_test = [arrays[(r["set"], r["file"])] for r in part("seg-in", "test") + part("cls-in", "test")]
    synthetic = {
        "inverted": features(model, ckpt.preprocess, [1.0 - a for a in real_test]),
        "rotated 90": features(model, ckpt.preprocess, [np.ascontiguousarray(np.rot90(a)) for a in real_test]),
        "upside down": features(model, ckpt.preprocess, [np.ascontiguousarray(a[::-1]) for a in real_test]),
    }
    results = {"weights": str(args.weights), "n_fit": len(fit_rows), "n_calibration": len(cal_rows), "rows": {}}
    results["n"] = {n: int(f.shape[0]) for n, f in {**test, **cross, **synthetic}.items()}
    groups = {**test, **cross, **synthetic}
    print(f"mean and covariance of {len(fit_rows)} training images; threshold on {len(cal_rows)} held-out images; "
          f"rates on the other {sum(int(test[n].shape[0]) for n in test)} held-out images and the sets below\n")
    print("| false alarm | shrinkage | " + " | ".join(f"{n} (n={int(f.shape[0])})" for n, f in groups.items()) + " |")
    print("|---|---|" + "---|" * len(groups))
    chosen = None
    for fa in args.false_alarm:
        for s in args.shrinkage:
            stats = fit_ood(pick(fit_rows), pick(cal_rows), false_alarm=fa, shrinkage=s)
            rates = {n: float((stats.distance(f) > stats.threshold).float().mean()) for n, f in groups.items()}
            results["rows"][f"{fa}/{s}"] = {"false_alarm": fa, "shrinkage": s, "threshold": stats.threshold,
                                            "flagged": rates, "n": {n: int(f.shape[0]) for n, f in groups.items()}}
            print(f"| {fa:.0%} | {s} | " + " | ".join(f"{rates[n]:.1%}" for n in rates) + " |")
            if s == SHRINKAGE and fa == args.false_alarm[0]:
                chosen = stats
    print(f"\n(share of images flagged out_of_distribution; {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write and chosen is not None:
        chosen.attach(ckpt, fitted_on="training patients of docs/results/holdout.csv",
                      threshold_on="half of its held-out patients (sha1 of set:patient even)")
        sha = save_checkpoint(ckpt, args.weights)
        print(f"wrote the statistics into {args.weights}: sha256 {sha}")


if __name__ == "__main__":
    main()
