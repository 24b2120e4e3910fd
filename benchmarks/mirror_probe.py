"""Can a left-right mirrored film be told from a normal one? Two linear probes, measured.

A mirrored film (heart on the image's left) is a real error: the classifier's answer on
it means nothing. This script tries the two cheapest detectors that would fit into
quality control, each a logistic regression trained on the training films of
``docs/results/holdout-v3.csv`` and their mirror images, and measured on the held-out films
of every set: the false-alarm rate (original films called mirrored) and the catch rate
(mirrored films called mirrored).

* ``pixels``: the antisymmetric part of the film at 24 x 24 (``a - mirror(a)``, left half).
* ``bottleneck``: the space-averaged bottleneck features of the weights (what the
  out-of-distribution statistics use, so free at predict time).

    python benchmarks/mirror_probe.py --data ../shared/data --weights multimix-cxr-v2 \\
        --json docs/results/mirror-probe-v2.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from mmcli.data.transforms import preprocess
from mmcli.inference import Predictor
from mmcli.io.readers import read_radiograph
from mmcli.qa.ood import bottleneck_features
from mmcli.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
SETS = ("seg-in", "seg-cross", "seg-adult", "cls-in", "cls-adult", "cls-cross")
SIDE = 24


def pixel_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(Image.open(path).convert("L").resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32)
    a = (a - a.mean()) / (a.std() + 1e-6)
    d = (a - a[:, ::-1])[:, : SIDE // 2].ravel()
    return d, -d  # the mirror image's antisymmetric part is the negative


def bottleneck(predictor: Predictor, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    x = torch.stack([preprocess(read_radiograph(f).pixels, predictor.preprocess) for f in files])
    orig, flip = [], []
    for i in range(0, len(x), 32):
        batch = x[i : i + 32]
        orig.append(bottleneck_features(predictor.model, batch))
        flip.append(bottleneck_features(predictor.model, torch.flip(batch, dims=[3])))
    return torch.cat(orig).numpy(), torch.cat(flip).numpy()


def probe(features: dict[str, dict[str, np.ndarray]], c: float) -> dict[str, dict[str, float]]:
    train_o = np.vstack([f["orig"][f["part"] == "train"] for f in features.values()])
    train_f = np.vstack([f["flip"][f["part"] == "train"] for f in features.values()])
    x = np.vstack([train_o, train_f])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    y = np.r_[np.zeros(len(train_o)), np.ones(len(train_f))]
    clf = LogisticRegression(C=c, max_iter=5000).fit((x - mu) / sd, y)
    out = {}
    for name, f in features.items():
        test = f["part"] == "test"
        out[name] = {"n": int(test.sum()),
                     "false_alarm": float(np.mean(clf.predict((f["orig"][test] - mu) / sd) == 1)),
                     "catch": float(np.mean(clf.predict((f["flip"][test] - mu) / sd) == 1))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with the six shared sets")
    p.add_argument("--weights", default="multimix-cxr-v2")
    p.add_argument("--holdout", type=Path, default=ROOT / "docs" / "results" / "holdout-v3.csv")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.holdout, newline="", encoding="utf-8") as f:
        parts = {(r["set"], r["file"]): r["part"] for r in csv.DictReader(f)}
    predictor = Predictor(load_weights(args.weights), device="cpu", precision="fp32")
    feats: dict[str, dict[str, dict[str, np.ndarray]]] = {"pixels": {}, "bottleneck": {}}
    for name in SETS:
        files = sorted((args.data / name).glob("*.png"))
        part = np.array([parts[(name, f.name)] for f in files])
        px = [pixel_features(f) for f in files]
        feats["pixels"][name] = {"orig": np.array([a for a, _ in px]), "flip": np.array([b for _, b in px]),
                                 "part": part}
        orig, flip = bottleneck(predictor, files)
        feats["bottleneck"][name] = {"orig": orig, "flip": flip, "part": part}
        print(f"{name}: {len(files)} films", flush=True)
    result = {"weights": args.weights, "probes": {}}
    for kind, f in feats.items():
        for c in (0.01, 0.1, 1.0):
            result["probes"][f"{kind} C={c}"] = r = probe(f, c)
            print(kind, c, "; ".join(f"{k}: false alarm {v['false_alarm']:.3f}, catch {v['catch']:.3f} (n={v['n']})"
                                     for k, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
