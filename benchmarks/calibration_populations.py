"""Can one temperature calibrate children's and adults' films? ECE per population against the temperature.

Reads the predictions of an ``mmcli evaluate`` run (``per_case.csv``) and the weights'
temperature ``T``. The pneumonia probability is ``sigmoid(d / T)`` for the logit
difference ``d``, so ``d`` comes back from each probability and any other temperature can
be tried. For each dataset the script gives the expected calibration error (10 bins, as
``evaluate``) at the weights' temperature and the temperature that would minimise it on
those very films (an oracle: it shows how far apart the populations' best temperatures
lie, not a temperature to ship).

    python benchmarks/calibration_populations.py --eval runs/v3/B-all/eval \\
        --weights runs/v3/B-all/train/best.safetensors
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from mmcli import metrics as M
from mmcli.weights import load_weights

GRID = np.round(np.exp(np.linspace(np.log(0.25), np.log(4.0), 81)), 4)


def ece_at(d: np.ndarray, y: np.ndarray, t: float) -> float:
    p = 1 / (1 + np.exp(-d / t))
    return M.expected_calibration_error(np.stack([1 - p, p], axis=1), y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--datasets", nargs="*", default=["cls-in-test", "cls-adult-test"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = float(load_weights(args.weights).temperature)
    with open(args.eval / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok" and r["true_label"] and r["p_pneumonia"]]
    out = {"weights": args.weights, "temperature": t0, "datasets": {}}
    for name in args.datasets:
        mine = [r for r in rows if r["dataset"] == name]
        p = np.clip(np.array([float(r["p_pneumonia"]) for r in mine]), 1e-7, 1 - 1e-7)
        y = np.array([r["true_label"] == "pneumonia" for r in mine], dtype=int)
        d = np.log(p / (1 - p)) * t0
        eces = np.array([ece_at(d, y, t) for t in GRID])
        best = int(np.argmin(eces))
        out["datasets"][name] = {"n": len(mine), "ece_at_weights_temperature": ece_at(d, y, t0),
                                 "oracle_temperature": float(GRID[best]), "oracle_ece": float(eces[best])}
    names = list(out["datasets"])
    for name in names:  # each population at the other's oracle temperature
        for other in names:
            if other != name:
                t = out["datasets"][other]["oracle_temperature"]
                mine = [r for r in rows if r["dataset"] == name]
                p = np.clip(np.array([float(r["p_pneumonia"]) for r in mine]), 1e-7, 1 - 1e-7)
                y = np.array([r["true_label"] == "pneumonia" for r in mine], dtype=int)
                out["datasets"][name][f"ece_at_{other}_oracle"] = ece_at(np.log(p / (1 - p)) * t0, y, t)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
