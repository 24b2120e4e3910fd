"""Weights v3: every candidate recipe trained with ``mmcli train`` and judged by ``mmcli evaluate``.

Each candidate starts from ``multimix-cxr-v2`` (E and F: from ``multimix-cxr-v3``, which is C
with refitted out-of-distribution statistics) and trains on the training
parts of ``benchmarks/v3_split.py``: JSRT, COVID-19 and seg-adult masks; Kermany, NIH
(cls-cross) and adult NIH (cls-adult) labels; every folder drawn at the same rate
(``--balance-sources``), every film also unlabelled data for the task it has no label for.
The candidates differ in how the adult NIH labels are given (all of them, or balanced by
class within each view, the rest unlabelled), the schedule and the loss (label smoothing;
see ``CANDIDATES``). Rows ``v1`` and ``v2`` are the registered weights, not trained.

Every row is evaluated on the held-out patients of the six sets, the adult NIH test films
also within each view (AP, PA). ``table.md`` / ``table.json`` add the ROC AUC that the view
alone reaches on the adult NIH test films (score: PA 1, AP 0) and, per set, the share of
films with any quality-control flag.

    python benchmarks/v3_split.py --data ../shared/data --out runs/v3/data
    OMP_NUM_THREADS=1 python benchmarks/weights_v3.py --data runs/v3/data --out runs/v3 --rows A-vb

A row whose ``result.json`` exists is not run again, and an interrupted training resumes
(``--resume``): rerun the same command to finish the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from paper_table import cell, metric  # noqa: E402

from mmcli import metrics as M  # noqa: E402
from mmcli.io.writers import write_json  # noqa: E402

TEST_SETS = ("seg-in-test", "seg-cross-test", "seg-adult-test", "cls-in-test", "cls-cross-test",
             "cls-adult-test", "cls-adult-test-ap", "cls-adult-test-pa")
# the shortcut probes (benchmarks/brightness_shortcut.py make): the adult NIH test films
# histogram-matched (-hm; also softened to one local contrast: -hs), and the JSRT test films,
# none of which shows pneumonia
PROBE_SETS = ("cls-adult-test-hm", "cls-adult-test-ap-hm", "cls-adult-test-pa-hm", "cls-jsrt-test",
              "cls-adult-test-hs")
MASKS = ("--seg-data", "seg-in-train", "--seg-data", "seg-cross-train", "--seg-data", "seg-adult-train")
LABELS = ("--cls-data", "cls-in-train")
CROSS = ("--cls-data", "cls-cross-train")  # the NIH films of v2's split, with their labels
VIEW_BALANCED = ("--cls-data", "cls-adult-train-vb", "--unlabelled-data", "cls-adult-train-vb-rest")
MATCHED = ("--cls-data", "cls-adult-train-vb-hm", "--unlabelled-data", "cls-adult-train-vb-rest-hm")
# the matched films, the pneumonia films labelled Pneumonia alone unlabelled with as many normal
# films of their views (benchmarks/label_noise.py --make)
COLABEL = ("--cls-data", "cls-adult-train-vb-co-hm", "--unlabelled-data", "cls-adult-train-vb-alone-hm",
           "--unlabelled-data", "cls-adult-train-vb-rest-hm")
SOFTENED = ("--cls-data", "cls-adult-train-vb-hs", "--unlabelled-data", "cls-adult-train-vb-rest-hs")
ALL_ADULT = ("--cls-data", "cls-adult-train")
SCHEDULE = ("--epochs", "8", "--steps-per-epoch", "30", "--lr-step", "6", "--batch-size", "8", "--lr", "1e-4")
NO_CROSS = ("--unlabelled-data", "cls-cross-train")  # the NIH films of v2's split, without their labels
TWELVE = ("--epochs", "12", "--steps-per-epoch", "30", "--lr-step", "9", "--batch-size", "8", "--lr", "1e-4")
LONGER = ("--epochs", "8", "--steps-per-epoch", "30", "--lr-step", "6", "--batch-size", "8", "--lr", "5e-5")

# name -> (what it tries, the folders and options after the shared ones)
CANDIDATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "A-vb": ("from v2; adult NIH labels balanced by class within view, the rest unlabelled",
             ("--init", "multimix-cxr-v2", *CROSS, *VIEW_BALANCED, *SCHEDULE)),
    "B-all": ("from v2; every adult NIH label (the view imbalance left in)",
              ("--init", "multimix-cxr-v2", *CROSS, *ALL_ADULT, *SCHEDULE)),
    "C-vb-nocross": ("as A-vb, but the cls-cross NIH films (80 % normal, mostly PA) unlabelled, 12 epochs",
                     ("--init", "multimix-cxr-v2", *VIEW_BALANCED, *NO_CROSS, *TWELVE)),
    "D-all-nocross": ("as B-all, but the cls-cross NIH films unlabelled, 12 epochs",
                      ("--init", "multimix-cxr-v2", *ALL_ADULT, *NO_CROSS, *TWELVE)),
    "E-v3-longer": ("as C-vb-nocross, continued from v3 for 8 more epochs at half the learning rate",
                    ("--init", "multimix-cxr-v3", *VIEW_BALANCED, *NO_CROSS, *LONGER)),
    "F-v3-smooth": ("as E-v3-longer, with label smoothing 0.1 (for the text-mined NIH labels; v3.1)",
                    ("--init", "multimix-cxr-v3", *VIEW_BALANCED, *NO_CROSS, *LONGER, "--label-smoothing", "0.1")),
    "G-v3-hm": ("as F-v3-smooth, the adult NIH films histogram-matched to one grey-level distribution "
                "(no brightness shortcut)",
                ("--init", "multimix-cxr-v3", *MATCHED, *NO_CROSS, *LONGER, "--label-smoothing", "0.1")),
    "H-v3-hm-gamma": ("as G-v3-hm, with random windowing and gamma on every film (--site-aug window,gamma)",
                      ("--init", "multimix-cxr-v3", *MATCHED, *NO_CROSS, *LONGER, "--label-smoothing", "0.1",
                       "--site-aug", "window,gamma")),
    "K-v3-hs-gamma": ("as H-v3-hm-gamma, the adult NIH films also softened to one local contrast",
                      ("--init", "multimix-cxr-v3", *SOFTENED, *NO_CROSS, *LONGER, "--label-smoothing", "0.1",
                       "--site-aug", "window,gamma")),
    "I-v2-hm": ("as C-vb-nocross (v3's recipe, from v2), the adult NIH films histogram-matched "
                "(the same run as the semi-supervised 358-label point of adult_few_labels.py --matched)",
                ("--init", "multimix-cxr-v2", *MATCHED, *NO_CROSS, *TWELVE)),
    "L-v3-hm-gamma-jsrt": ("as H-v3-hm-gamma, the JSRT films also labelled: no pneumonia",
                           ("--init", "multimix-cxr-v3", *MATCHED, *NO_CROSS, *LONGER, "--label-smoothing", "0.1",
                            "--site-aug", "window,gamma", "--cls-data", "cls-jsrt-train")),
    "M-v3-hm-gamma-jsrt-colabel": ("as L-v3-hm-gamma-jsrt, the pneumonia films labelled Pneumonia alone (no other "
                                   "finding backs the label) unlabelled, with as many normal films of their views",
                                   ("--init", "multimix-cxr-v3", *COLABEL, *NO_CROSS, *LONGER, "--label-smoothing",
                                    "0.1", "--site-aug", "window,gamma", "--cls-data", "cls-jsrt-train")),
}
REGISTERED = ("v1", "v2")
ROWS = (*REGISTERED, *CANDIDATES)


def mmcli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmcli", *args], check=True)


def train_once(cmd: list[str], train_dir: Path) -> dict[str, Any]:
    """Run ``mmcli`` ``cmd`` (a training into ``train_dir``) unless it finished, resuming it if it
    was interrupted; its run.json."""
    run_json = train_dir / "run.json"
    if not (run_json.is_file() and json.loads(run_json.read_text()).get("status") == "finished"):
        mmcli(*cmd, *(["--resume"] if (train_dir / "state.pt").is_file() else []))
    return json.loads(run_json.read_text())


def train(name: str, data: Path, train_dir: Path) -> dict[str, Any]:
    """``mmcli train`` of candidate ``name`` into ``train_dir``, resumed if interrupted; its run.json."""
    _, options = CANDIDATES[name]
    folders = [str(data / a) if not a.startswith("-") and a.endswith(("-train", "-vb", "-rest", "-hm", "-hs")) else a
               for a in (*MASKS, *LABELS, *options)]
    cmd = ["train", *folders, "--balance-sources", "--patience", "0", "--seed", "0", "--precision", "bf16",
           "--out", str(train_dir), "-q"]
    return train_once(cmd, train_dir)


def view_auc(data: Path) -> dict[str, float]:
    """ROC AUC on the adult NIH test films of a score that knows only the view (PA 1, AP 0)."""
    with open(data / "cls-adult-test" / "meta.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["label"] == "pneumonia" for r in rows], dtype=int)
    s = np.array([r["view"] == "PA" for r in rows], dtype=float)
    low, high = M.bootstrap_ci(M.roc_auc, y, s)
    return {"value": M.roc_auc(y, s), "ci_low": low, "ci_high": high, "n": len(rows)}


def flag_rates(eval_dir: Path) -> dict[str, float]:
    """Per dataset, the share of evaluated films that carry any quality-control flag."""
    with open(eval_dir / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, float] = {}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name and r.get("status", "ok") == "ok"]
        out[name] = sum(bool(r.get("qa_flags")) for r in mine) / max(len(mine), 1)
    return out


def run_row(name: str, data: Path, out: Path) -> dict[str, Any]:
    row_dir = out / name
    result: dict[str, Any] = {"row": name}
    if name in REGISTERED:
        weights = f"multimix-cxr-{name}"
    else:
        result["recipe"] = CANDIDATES[name][0]
        result["train"] = train(name, data, row_dir / "train")
        result["history"] = (row_dir / "train" / "history.csv").read_text()
        weights = str(row_dir / "train" / "best.safetensors")
    result.update(weights=weights, datasets={}, any_flag={})
    return add_sets(result, data, row_dir, (*TEST_SETS, *PROBE_SETS), "eval")


def add_sets(result: dict[str, Any], data: Path, row_dir: Path, sets: tuple[str, ...], eval_name: str,
             ) -> dict[str, Any]:
    """``result`` with ``mmcli evaluate`` of its weights on ``sets`` (into ``row_dir/eval_name``) added; saved."""
    mmcli("evaluate", *(str(data / s) for s in sets), "--out", str(row_dir / eval_name), "--weights",
          result["weights"], "--precision", "fp32", "--overwrite", "--no-plots", "-q")
    summary = json.loads((row_dir / eval_name / "summary.json").read_text())
    result["datasets"].update(summary["datasets"])
    result["any_flag"].update(flag_rates(row_dir / eval_name))
    write_json(row_dir / "result.json", result)
    return result


CLS = (("cls-adult-test", "adult NIH"), ("cls-adult-test-ap", "adult NIH, AP"),
       ("cls-adult-test-pa", "adult NIH, PA"), ("cls-in-test", "Kermany"), ("cls-cross-test", "NIH (v2 split)"),
       ("cls-adult-test-hm", "adult NIH, matched"), ("cls-adult-test-ap-hm", "adult NIH, AP, matched"),
       ("cls-adult-test-pa-hm", "adult NIH, PA, matched"), ("cls-adult-test-hs", "adult NIH, matched, softened"),
       ("cls-jsrt-test", "JSRT (no pneumonia)"))
SEG = (("seg-in-test", "JSRT"), ("seg-cross-test", "COVID-19 (gb)"), ("seg-adult-test", "seg-adult (V7)"))


def write_table(out: Path, results: list[dict[str, Any]], view: dict[str, float]) -> str:
    lines = ["# Weights v3 candidates", "",
             f"ROC AUC of the view alone on the adult NIH test films (PA 1, AP 0): {cell(view)} (n={view['n']}).",
             "", "| row | set | ROC AUC | accuracy (majority class) | balanced accuracy | ECE | any QA flag |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for key, label in CLS:
            auc = metric(r, key, "classification", "roc_auc")
            acc = metric(r, key, "classification", "accuracy")
            lines.append(f"| {r['row']} | {label} | {cell(auc)} | {cell(acc)} ({cell(acc, 'baseline')}) | "
                         f"{cell(metric(r, key, 'classification', 'balanced_accuracy'))} | "
                         f"{cell(metric(r, key, 'classification', 'ece'))} | "
                         f"{r.get('any_flag', {}).get(key, float('nan')):.3f} |")
    lines += ["", "| row | set | Dice | any QA flag |", "|---|---|---|---|"]
    for r in results:
        for key, label in SEG:
            lines.append(f"| {r['row']} | {label} | {cell(metric(r, key, 'segmentation', 'dice'))} | "
                         f"{r.get('any_flag', {}).get(key, float('nan')):.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the folders of benchmarks/v3_split.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write every row's result here")
    args = p.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        if args.report_only:
            continue
        done = out / name / "result.json"
        result = json.loads(done.read_text()) if done.is_file() else run_row(name, data, out)
        if missing := tuple(s for s in PROBE_SETS if s not in result["datasets"]):  # a row from before the probes
            add_sets(result, data, out / name, missing, "eval-probes")
    results = [json.loads(f.read_text()) for r in ROWS if (f := out / r / "result.json").is_file()]
    view = view_auc(data)
    print(write_table(out, results, view))
    if args.json:
        write_json(args.json, {"view_only_auc": view, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
