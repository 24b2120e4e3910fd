"""The few-label claim on adults: adult NIH ROC AUC against the number of adult labels.

For each budget N, N adult NIH training films keep their label (drawn from the
view-balanced part of ``benchmarks/v3_split.py``, balanced by class within view, seeded);
two runs start from ``multimix-cxr-v2`` with the masks and the Kermany labels of weights v3
and, under ``--schedule short`` (the default), the small NIH set's (cls-cross) labels too;
``--schedule v3`` trains as weights v3 was trained (12 epochs of 30 steps, the small NIH
set unlabelled):

* ``semi``: MultiMix as the paper trains it, the other adult NIH films as unlabelled
  data (pseudo labels and the foreground consistency on);
* ``sup``: the same network, labels and schedule with the semi-supervised losses off
  (``--lambda-u 0 --consistency-weight 0``) and no unlabelled adult films: supervised on the same labels.

Both arms share initialisation, architecture and schedule, so the difference is what the
unlabelled adult films add. Every run is judged by ``mmcli evaluate`` on the held-out adult
NIH patients (overall and within AP and PA).

    OMP_NUM_THREADS=1 python benchmarks/adult_few_labels.py --data runs/v3/data --out runs/v3-few
    OMP_NUM_THREADS=1 python benchmarks/adult_few_labels.py --data runs/v3/data --out runs/v3-few-long \
        --schedule v3 --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/adult_few_labels.py --data runs/v3/data --out runs/v3-few-hm \
        --schedule v3 --matched --budgets 25 100 358

``--matched`` trains on the histogram-matched adult films, without the brightness shortcut
(``benchmarks/brightness_shortcut.py``); every run is also judged on the matched test films
where they exist.

A run whose ``result.json`` exists is not run again; an interrupted training resumes.
``table.md`` and ``table.json`` hold the curve.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from brightness_shortcut import build_folder, linked_folder  # noqa: E402
from paper_table import cell, metric  # noqa: E402
from weights_v3 import mmcli, train_once  # noqa: E402

from mmcli.io.writers import write_json  # noqa: E402

BUDGETS = (25, 50, 100, 200, 358)  # 358: every view-balanced adult label
ARMS = ("semi", "sup")
TEST = ("cls-adult-test", "cls-adult-test-ap", "cls-adult-test-pa")
# the same test films histogram-matched (benchmarks/brightness_shortcut.py make)
MATCHED_TEST = ("cls-adult-test-hm", "cls-adult-test-ap-hm", "cls-adult-test-pa-hm")
SCHEDULE = ("--epochs", "4", "--steps-per-epoch", "25", "--lr-step", "3", "--batch-size", "8", "--lr", "1e-4")
# name -> (training options, whether the small NIH set (cls-cross) keeps its labels)
SCHEDULES: dict[str, tuple[tuple[str, ...], bool]] = {
    "short": (SCHEDULE, True),  # the first protocol: 100 steps, the small NIH set's labels included
    "v3": (("--epochs", "12", "--steps-per-epoch", "30", "--lr-step", "9", "--batch-size", "8", "--lr", "1e-4"),
           False),  # weights v3's schedule, the small NIH set unlabelled (about 40 core-minutes a run on a CPU)
}


def budget_folders(data: Path, out: Path, n: int, seed: int, suffix: str = "") -> tuple[Path, Path]:
    """Folders with ``n`` labelled adult NIH films (balanced by class within view) and the others unlabelled.

    ``suffix`` ``-hm``: the histogram-matched copies of the films (the same films are picked).
    """
    src, rest = data / f"cls-adult-train-vb{suffix}", data / f"cls-adult-train-vb-rest{suffix}"
    with open(src / "meta.csv", newline="", encoding="utf-8") as f:
        meta = {r["file"]: r for r in csv.DictReader(f)}
    rng = np.random.default_rng([seed, n])
    strata: dict[tuple[str, str], list[str]] = {}
    for name, row in sorted(meta.items()):
        strata.setdefault((row["view"], row["label"]), []).append(name)
    picked: list[str] = []
    for names in strata.values():  # the same share of every (view, class) stratum
        k = round(n * len(names) / len(meta))
        picked += [names[j] for j in rng.permutation(len(names))[:k]]
    picked.sort()
    every = {p.name: p for p in rest.glob("*.png")} | {name: src / name for name in meta}
    labels = [{"file": name, "label": meta[name]["label"], "patient": meta[name]["patient"]} for name in picked]
    out.mkdir(parents=True, exist_ok=True)
    lab = build_folder(out / f"adult-{n}-s{seed}{suffix}-labelled",
                       linked_folder({name: every[name] for name in picked}, {"labels.csv": labels}))
    free = out / f"adult-{n}-s{seed}{suffix}-unlabelled"
    if others := sorted(set(every) - set(picked)):
        build_folder(free, linked_folder({name: every[name] for name in others}, {}))
    return lab, free


def run(data: Path, out: Path, n: int, arm: str, seed: int, schedule: str = "short", matched: bool = False,
        ) -> dict[str, Any]:
    row_dir = out / f"{arm}-{n}-s{seed}"
    options, cross_labels = SCHEDULES[schedule]
    lab, free = budget_folders(data, out / "data", n, seed, "-hm" if matched else "")
    train_dir = row_dir / "train"
    cmd = ["train", "--init", "multimix-cxr-v2",
           *(a for s in ("seg-in", "seg-cross", "seg-adult") for a in ("--seg-data", str(data / f"{s}-train"))),
           *(a for s in ("cls-in", "cls-cross") if s == "cls-in" or cross_labels
             for a in ("--cls-data", str(data / f"{s}-train"))),
           *(() if cross_labels else ("--unlabelled-data", str(data / "cls-cross-train"))),
           "--cls-data", str(lab), *options, "--balance-sources", "--patience", "0", "--seed", str(seed),
           "--precision", "bf16", "--out", str(train_dir), "-q"]
    cmd += ["--unlabelled-data", str(free)] if arm == "semi" else ["--lambda-u", "0", "--consistency-weight", "0"]
    train_once(cmd, train_dir)
    tests = (*TEST, *MATCHED_TEST) if (data / MATCHED_TEST[0]).is_dir() else TEST
    mmcli("evaluate", *(str(data / s) for s in tests), "--out", str(row_dir / "eval"), "--weights",
           str(train_dir / "best.safetensors"), "--precision", "fp32", "--overwrite", "--no-plots", "-q")
    summary = json.loads((row_dir / "eval" / "summary.json").read_text())
    result = {"arm": arm, "labels": n, "seed": seed, "matched": matched, "datasets": summary["datasets"]}
    write_json(row_dir / "result.json", result)
    return result


def write_table(out: Path, results: list[dict[str, Any]]) -> str:
    lines = ["# Adult NIH ROC AUC against the number of adult labels", "",
             "| adult labels | seed | arm | ROC AUC | AUC within AP | AUC within PA | balanced accuracy "
             "| AUC, films matched | within AP, matched | within PA, matched |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["labels"], r["seed"], r["arm"])):
        cells = [cell(metric(r, t, "classification", "roc_auc")) for t in TEST]
        matched = [cell(metric(r, t, "classification", "roc_auc")) for t in MATCHED_TEST]
        bal = cell(metric(r, "cls-adult-test", "classification", "balanced_accuracy"))
        lines.append(f"| {r['labels']} | {r['seed']} | {r['arm']} | {' | '.join(cells)} | {bal} | "
                     f"{' | '.join(matched)} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    return text


def write_curve(path: Path, results: list[dict[str, Any]]) -> None:
    """ROC AUC (95 % intervals) against the adult labels, per arm: the held-out films as they are, and matched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.4), dpi=120)
    FigureCanvasAgg(fig)
    panels = (("cls-adult-test", "held-out adult films as they are"),
              ("cls-adult-test-hm", "the same films histogram-matched"))
    for i, (dataset, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for arm, name, colour, shift in (("semi", "MultiMix, other adult films unlabelled", "tab:red", 0.97),
                                         ("sup", "same network, semi-supervised losses off", "tab:blue", 1.03)):
            rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: (r["labels"], r["seed"]))
            pts = [(r["labels"], m) for r in rows if (m := metric(r, dataset, "classification", "roc_auc"))]
            if not pts:
                continue
            ax.errorbar([n * shift for n, _ in pts], [m["value"] for _, m in pts],
                        yerr=[[m["value"] - m["ci_low"] for _, m in pts], [m["ci_high"] - m["value"] for _, m in pts]],
                        marker="o", linestyle="none", capsize=3, color=colour, label=name)
            budgets = sorted({n for n, _ in pts})
            means = [float(np.mean([m["value"] for k, m in pts if k == n])) for n in budgets]
            ax.plot([n * shift for n in budgets], means, color=colour, linewidth=1)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.75, color="grey", linestyle="--", linewidth=1, label="target 0.75")
        ax.set_xscale("log")
        ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("adult training labels")
        ax.set_ylabel("adult NIH ROC AUC (95 % interval)")
        ax.set_ylim(0.3, 1.0)
        ax.set_title(title, fontsize=9)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the folders of benchmarks/v3_split.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budgets", type=int, nargs="*", default=list(BUDGETS))
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--schedule", choices=SCHEDULES, default="short",
                   help="short: 100 steps with the small NIH set's labels; v3: weights v3's (use another --out)")
    p.add_argument("--matched", action="store_true",
                   help="train on the histogram-matched adult films (benchmarks/brightness_shortcut.py make)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="also draw the curve into this PNG")
    args = p.parse_args(argv)
    data, out = args.data.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for n in args.budgets:
                for arm in args.arms:
                    if not (out / f"{arm}-{n}-s{seed}" / "result.json").is_file():
                        run(data, out, n, arm, seed, args.schedule, args.matched)
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*/result.json"))]
    print(write_table(out, results))
    if args.plot:
        write_curve(args.plot, results)
    if args.json:
        write_json(args.json, {"schedule": SCHEDULES[args.schedule][0], "cross_labels": SCHEDULES[args.schedule][1],
                               "matched": args.matched, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
