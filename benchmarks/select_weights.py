"""Choose between weights candidates on their common validation films, never on the test films.

Candidates of ``benchmarks/weights_v3.py`` that share a seed share their validation split
(``train/splits.csv``) unless their labelled folders differ. This script takes the films
that are validation films in every row (none of the rows trained on them), links them into
folders (``--data``/``val-<digest>/val-*``; the adult NIH films both as they are and
histogram-matched, :mod:`brightness_shortcut`), runs ``mmcli evaluate`` of each row's
weights on them, and scores each row as ``mmcli train`` scores an epoch: the mean of the
mean Dice over the validation masks and the ROC AUC over the labelled validation films
pooled. The adult films enter the score histogram-matched, so a row cannot win by the
brightness shortcut; the score with the films as they are is reported beside it.

    python benchmarks/select_weights.py --data runs/v3/data --runs runs/v3 --rows F-v3-smooth G-v3-hm H-v3-hm-gamma \\
        --out docs/results/select-v3.2.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from paper_table import link_folder, read_csv  # noqa: E402

from mmcli import metrics as M  # noqa: E402
from mmcli.io.writers import write_json  # noqa: E402

# validation folder -> the training folder its films come from (the -hm ones: matched copies)
VAL_SETS = {"val-seg-in": "seg-in-train", "val-seg-cross": "seg-cross-train", "val-seg-adult": "seg-adult-train",
            "val-cls-in": "cls-in-train", "val-cls-adult": "cls-adult-train-vb",
            "val-cls-adult-hm": "cls-adult-train-vb-hm"}
SCORED = ("val-seg-in", "val-seg-cross", "val-seg-adult", "val-cls-in", "val-cls-adult-hm")
RAW = ("val-seg-in", "val-seg-cross", "val-seg-adult", "val-cls-in", "val-cls-adult")


def val_folders(root: Path, data: Path, val: set[str]) -> dict[str, Path]:
    """Link the films named in ``val`` into ``root``/val-* folders, from the training folders of ``data``."""
    out: dict[str, Path] = {}
    for name, source in VAL_SETS.items():
        src, dst = data / source, root / name
        if not dst.is_dir():
            fields, meta = read_csv(src / "meta.csv")
            _, label_rows = read_csv(src / "labels.csv")
            files = sorted(p for p in src.glob("*.png") if p.name in val)
            link_folder(dst, src, [f.resolve() for f in files], meta, fields,
                        {k: v["label"] for k, v in label_rows.items()})
        out[name] = dst
    return out


def _split_of(splits: Path) -> list[tuple[str, str]]:
    with open(splits, newline="", encoding="utf-8") as f:
        return sorted((Path(r["file"]).name, r["split"]) for r in csv.DictReader(f))


def score(per_case: Path, sets: tuple[str, ...]) -> dict[str, float]:
    with open(per_case, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] in sets and r["status"] == "ok"]
    dice = [float(r["dice"]) for r in rows if r["dice"] not in ("", "nan")]
    cls = [r for r in rows if r["true_label"] in ("normal", "pneumonia")]
    y = np.array([r["true_label"] == "pneumonia" for r in cls], dtype=int)
    p = np.array([float(r["p_pneumonia"]) for r in cls])
    auc = M.roc_auc(y, p)
    return {"dice": float(np.mean(dice)), "auc": auc, "score": (float(np.mean(dice)) + auc) / 2,
            "n_masks": len(dice), "n_labels": len(cls)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the folders of benchmarks/v3_split.py")
    p.add_argument("--runs", type=Path, required=True, help="the --out of benchmarks/weights_v3.py")
    p.add_argument("--rows", nargs="+", required=True)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    data, runs = args.data.resolve(), args.runs.resolve()
    splits = [_split_of(runs / r / "train" / "splits.csv") for r in args.rows]
    val = set.intersection(*({name for name, part in s if part == "val"} for s in splits))
    digest = hashlib.sha256("\n".join(sorted(val)).encode()).hexdigest()[:8]
    folders = val_folders(data / f"val-{digest}", data, val)
    result: dict[str, Any] = {"command": "python benchmarks/select_weights.py " + " ".join(argv or sys.argv[1:]),
                              "validation_films": len(val), "rows": {}}
    print(f"{len(val)} films are validation films of every row")
    for row in args.rows:
        out = runs / row / f"eval-val-{digest}"
        if not (out / "per_case.csv").is_file():
            weights = json.loads((runs / row / "result.json").read_text())["weights"] \
                if (runs / row / "result.json").is_file() else str(runs / row / "train" / "best.safetensors")
            subprocess.run([sys.executable, "-m", "mmcli", "evaluate", *map(str, folders.values()), "--out", str(out),
                            "--weights", weights, "--precision", "fp32", "--overwrite", "--no-plots", "-q"],
                           check=True)
        result["rows"][row] = {"matched": score(out / "per_case.csv", SCORED), "raw": score(out / "per_case.csv", RAW)}
        m, r = result["rows"][row]["matched"], result["rows"][row]["raw"]
        print(f"{row:16s} score {m['score']:.4f} (Dice {m['dice']:.4f}, AUC {m['auc']:.4f})   films as they are: "
              f"score {r['score']:.4f} (AUC {r['auc']:.4f})")
    best = max(result["rows"], key=lambda k: result["rows"][k]["matched"]["score"])
    result["chosen"] = best
    print(f"chosen: {best}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
