"""Which site-shift augmentations help: one ``--site-aug`` op at a time against none.

Every row is the same ``mmcli train --init multimix-cxr-v1`` run on the training parts of
``benchmarks/adult_split.py`` with the recipe of the default weights v2 (JSRT and COVID-19
lung masks, Kermany labels, NIH films unlabelled, ``--balance-sources``, seed 0), shortened
to ``--epochs x --steps-per-epoch`` steps; row ``none`` has no site augmentation, each other
row exactly one op of ``mmcli.training.config.SITE_OPS``. Every row is evaluated by
``mmcli evaluate`` on the held-out NIH, Kermany, JSRT and COVID-19 patients.

Because the rows differ only in the op and are evaluated on the same films, each op is
compared with ``none`` **paired**: the 95 % interval of the difference comes from one
bootstrap that resamples the held-out cases and recomputes both rows' figure on the same
draw. The rule, fixed before the runs: an op helps when at least one difference has its
interval above 0 and no difference has its interval below 0.

    OMP_NUM_THREADS=1 python benchmarks/site_aug_ops.py --data runs/v2/data --out runs/site-ops

A row whose ``result.json`` exists is not run again and an interrupted training resumes;
``--rows`` runs some rows only (two processes with disjoint rows share a 2-core machine).
``table.md`` and ``table.json`` hold the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from paper_table import _cell as _format  # noqa: E402
from paper_table import _metric  # noqa: E402
from site_adaptation import TEST_SETS, _mmcli  # noqa: E402

from mmcli.io.writers import write_json  # noqa: E402
from mmcli.metrics import accuracy, bootstrap_ci, nanmean, roc_auc  # noqa: E402
from mmcli.training.config import SITE_OPS  # noqa: E402

ROWS = ("none", *SITE_OPS)

# (label, dataset, kind): the figures compared with row "none".
FIGURES = (
    ("NIH ROC AUC", "cls-cross-test", "auc"),
    ("Kermany accuracy", "cls-in-test", "accuracy"),
    ("Kermany ROC AUC", "cls-in-test", "auc"),
    ("JSRT Dice", "seg-in-test", "dice"),
    ("COVID-19 Dice", "seg-cross-test", "dice"),
)


def run_row(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    train_dir = out / name / "train"
    train = ["train", "--init", "multimix-cxr-v1",
             "--seg-data", str(data / "seg-in-train"), "--seg-data", str(data / "seg-cross-train"),
             "--cls-data", str(data / "cls-in-train"), "--unlabelled-data", str(data / "cls-cross-train"),
             "--balance-sources", "--site-aug", name, "--out", str(train_dir),
             "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lr-step", str(args.epochs),
             "--patience", "0", "--seed", str(args.seed), "-q"]
    if (train_dir / "state.pt").is_file():
        train.append("--resume")
    if not (train_dir / "best.safetensors").is_file() or "--resume" in train:
        _mmcli(*train)
    weights = train_dir / "best.safetensors"
    _mmcli("evaluate", *(str(data / s) for s in TEST_SETS), "--out", str(out / name / "eval"),
           "--weights", str(weights), "--overwrite", "--no-plots", "-q")
    summary = json.loads((out / name / "eval" / "summary.json").read_text())
    run = json.loads((train_dir / "run.json").read_text())
    result = {"row": name, "weights": str(weights), "site_augment": run.get("site_augment"),
              "train_seconds": run.get("seconds"), "datasets": summary["datasets"]}
    write_json(out / name / "result.json", result)
    return result


def per_case(eval_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{dataset: {case_id: row}}`` of an evaluation's per_case.csv (cases that were read)."""
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    with open(eval_dir / "per_case.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok":
                cases.setdefault(row["dataset"], {})[row["case_id"]] = row
    return cases


def _arrays(base: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], kind: str) -> tuple[np.ndarray, ...]:
    ids = sorted(set(base) & set(other))
    if kind == "dice":
        ids = [i for i in ids if base[i]["dice"] and other[i]["dice"]]
        return (np.array([float(base[i]["dice"]) for i in ids]), np.array([float(other[i]["dice"]) for i in ids]))
    ids = [i for i in ids if base[i]["true_label"]]
    y = np.array([int(base[i]["true_label"] == "pneumonia") for i in ids])
    if kind == "auc":
        return (y, np.array([float(base[i]["p_pneumonia"]) for i in ids]),
                np.array([float(other[i]["p_pneumonia"]) for i in ids]))
    return (y, np.array([int(base[i]["label"] == "pneumonia") for i in ids]),
            np.array([int(other[i]["label"] == "pneumonia") for i in ids]))


_DIFFERENCES = {
    "dice": lambda a, b: nanmean(b) - nanmean(a),
    "auc": lambda y, a, b: roc_auc(y, b) - roc_auc(y, a),
    "accuracy": lambda y, a, b: accuracy(y, b) - accuracy(y, a),
}


def paired_difference(base: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], kind: str,
                      n_bootstrap: int = 2000, seed: int = 0) -> dict[str, float]:
    """``other - base`` of one figure on the cases both have, with its paired bootstrap interval."""
    arrays = _arrays(base, other, kind)
    fn = _DIFFERENCES[kind]
    low, high = bootstrap_ci(fn, *arrays, n_resamples=n_bootstrap, seed=seed)
    return {"value": float(fn(*arrays)), "ci_low": low, "ci_high": high, "n": int(len(arrays[0]))}


def verdict(differences: dict[str, dict[str, float]]) -> str:
    """``helps``, ``hurts`` or ``no difference`` by the rule in the module docstring."""
    if any(d["ci_high"] < 0 for d in differences.values()):
        return "hurts"
    if any(d["ci_low"] > 0 for d in differences.values()):
        return "helps"
    return "no difference"


def compare(out: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each op's paired differences from row ``none`` and its verdict, added to its result."""
    base = per_case(out / "none" / "eval")
    for r in results:
        if r["row"] == "none":
            continue
        cases = per_case(out / r["row"] / "eval")
        r["vs_none"] = {label: paired_difference(base.get(ds, {}), cases.get(ds, {}), kind)
                        for label, ds, kind in FIGURES}
        r["verdict"] = verdict(r["vs_none"])
    return results


def _signed(d: dict[str, float]) -> str:
    return f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def write_table(out: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    write_json(out / "table.json", {**meta, "rows": results})
    kinds = {"auc": "roc_auc", "accuracy": "accuracy", "dice": "dice"}
    head = "| row | " + " | ".join(label for label, _, _ in FIGURES) + " | verdict |"
    lines = ["Held-out figures (95 % bootstrap intervals):", "", head, "|" + "---|" * (len(FIGURES) + 2)]
    for r in results:
        cells = [_format(_metric(r, ds, "segmentation" if kind == "dice" else "classification", kinds[kind]), "value")
                 for _, ds, kind in FIGURES]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r.get('verdict', '-')} |")
    lines += ["", "Paired difference from row `none` (95 % paired bootstrap interval):", "",
              head, "|" + "---|" * (len(FIGURES) + 2)]
    for r in results:
        if "vs_none" in r:
            lines.append(f"| {r['row']} | " + " | ".join(_signed(r["vs_none"][label]) for label, _, _ in FIGURES)
                         + f" | {r['verdict']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the folders of benchmarks/adult_split.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    for name in args.rows:
        if not args.report_only and not (args.out / name / "result.json").is_file():
            run_row(name, data, args.out.resolve(), args)
    results = [json.loads(f.read_text()) for r in ROWS if (f := args.out / r / "result.json").is_file()]
    if any(r["row"] == "none" for r in results):
        results = compare(args.out, results)
    meta = {k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "batch_size", "lr", "seed")}
    meta["threads"] = os.environ.get("OMP_NUM_THREADS")
    write_table(args.out, results, meta)
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
