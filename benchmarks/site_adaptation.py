"""Site adaptation: start from v1 and adapt to NIH films with 0, 10, 25 or all of their labels.

Each row is one ``mmcli train --init multimix-cxr-v1`` run on the training parts of
``benchmarks/adult_split.py`` (JSRT masks and Kermany labels, as v1 had) plus the NIH
training films: ``N`` of them with their labels (stratified by class, seed 0) and the
rest with none (``--unlabelled-data``), all folders drawn at equal rates
(``--balance-sources``). Row ``v1`` is the starting point, not trained. Every row is
evaluated by ``mmcli evaluate`` on the held-out NIH, Kermany, JSRT and COVID-19 patients.

    python benchmarks/site_adaptation.py --data runs/v2/data --out runs/adapt

A row whose ``result.json`` exists is not run again, and an interrupted training resumes
(``--resume``): rerun the same command to finish the table. ``table.md`` and
``table.json`` hold the results (NIH ROC AUC and accuracy against always-normal, and the
in-domain figures, each with its 95 % bootstrap interval).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from adult_split import nih_patient  # noqa: E402
from paper_table import cell as _format  # noqa: E402
from paper_table import metric, read_csv  # noqa: E402

from mmcli.io.writers import write_json  # noqa: E402

ROWS = ("v1", "nih-0", "nih-10", "nih-25", "nih-all")
TEST_SETS = ("cls-cross-test", "cls-in-test", "seg-in-test", "seg-cross-test")


def nih_folders(train: Path, out: Path, n: int | None, seed: int = 0) -> tuple[Path | None, Path | None]:
    """Folders of NIH training films with ``n`` labels (None: all) and of the rest without labels.

    The ``n`` labelled films are drawn stratified by class (at least one of each class when
    ``n`` >= 2). Either folder is None when it would be empty.
    """
    labels = {k: v["label"] for k, v in read_csv(train / "labels.csv")[1].items()}
    if n is None:
        return train, None
    rng = np.random.default_rng(seed)
    by_class = {c: sorted(f for f, v in labels.items() if v == c) for c in sorted(set(labels.values()))}
    share = {c: len(v) / len(labels) for c, v in by_class.items()}
    take = {c: (max(1, round(n * share[c])) if n >= 2 else round(n * share[c])) for c in by_class}
    biggest = max(by_class, key=lambda c: len(by_class[c]))
    take[biggest] = n - sum(v for c, v in take.items() if c != biggest)
    picked = sorted(f for c, files in by_class.items() for f in rng.permutation(files)[: take[c]].tolist())
    rest = sorted(set(labels) - set(picked))
    lab, free = out / f"nih-{n}-labelled", out / f"nih-{n}-unlabelled"
    for folder, files in ((lab, picked), (free, rest)):
        if not files or folder.is_dir():
            continue
        folder.mkdir(parents=True)
        for f in files:
            (folder / f).symlink_to((train / f).resolve())
    if picked:
        with open(lab / "labels.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "label", "patient"])
            w.writerows([name, labels[name], nih_patient(name)] for name in picked)
    return (lab if picked else None), (free if rest else None)


def _mmcli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmcli", *args], check=True)


def train_from_v1(train_dir: Path, data_args: list[str], args: argparse.Namespace, *, site_aug: str,
                  lr_step: int, seed: int) -> dict[str, Any]:
    """``mmcli train --init multimix-cxr-v1`` with ``data_args`` (the folders) and the study's
    schedule (``args``) into ``train_dir``, resumed if it was interrupted and skipped if it
    finished; returns its run.json."""
    train = ["train", "--init", "multimix-cxr-v1", *data_args, "--balance-sources", "--site-aug", site_aug,
             "--out", str(train_dir), "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--lr-step", str(lr_step),
             "--patience", "0", "--seed", str(seed), "-q"]
    if (train_dir / "state.pt").is_file():
        train.append("--resume")
    if not (train_dir / "best.safetensors").is_file() or "--resume" in train:
        _mmcli(*train)
    return json.loads((train_dir / "run.json").read_text())


def evaluate_row(row_dir: Path, data: Path, weights: str, result: dict[str, Any]) -> dict[str, Any]:
    """``mmcli evaluate`` of ``weights`` on the held-out sets into ``row_dir/eval``; writes and returns
    ``result`` with the weights and the evaluation's datasets added (``row_dir/result.json``)."""
    _mmcli("evaluate", *(str(data / s) for s in TEST_SETS), "--out", str(row_dir / "eval"), "--weights", weights,
           "--overwrite", "--no-plots", "-q")
    summary = json.loads((row_dir / "eval" / "summary.json").read_text())
    result = {**result, "weights": weights, "datasets": summary["datasets"]}
    write_json(row_dir / "result.json", result)
    return result


def run_row(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    row_dir = out / name
    if name == "v1":
        return evaluate_row(row_dir, data, "multimix-cxr-v1", {"row": name})
    budget = name.split("-", 1)[1]
    n = None if budget == "all" else int(budget)
    labelled, unlabelled = nih_folders(data / "cls-cross-train", out / "data", n)
    folders = ["--seg-data", str(data / "seg-in-train"), "--cls-data", str(data / "cls-in-train")]
    folders += ["--cls-data", str(labelled)] if labelled else []
    folders += ["--unlabelled-data", str(unlabelled)] if unlabelled else []
    run = train_from_v1(row_dir / "train", folders, args, site_aug=args.site_aug, lr_step=args.epochs - 1,
                        seed=args.seed)
    return evaluate_row(row_dir, data, str(row_dir / "train" / "best.safetensors"),
                        {"row": name, "nih_labels": n, "train": run})


def cell(r: dict[str, Any], dataset: str, task: str, key: str, field: str = "value") -> str:
    return _format(metric(r, dataset, task, key), field)


def _nih_given(r: dict[str, Any]) -> int:
    """NIH films given with their label (validation ones included)."""
    if r.get("nih_labels") is not None:
        return int(r["nih_labels"])
    with open(Path(r["weights"]).parent / "splits.csv", newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.DictReader(f) if "cls-cross" in row["source"] and row["label"])


def write_curve(path: Path, results: list[dict[str, Any]]) -> None:
    """NIH and Kermany ROC AUC (95 % intervals) against the number of NIH labels; v1 as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = [r for r in results if r["row"] != "v1"]
    xs = [_nih_given(r) for r in rows]
    for dataset, name, colour in (("cls-cross-test", "NIH (adult), held out", "tab:red"),
                                  ("cls-in-test", "Kermany (children), held out", "tab:blue")):
        ms = [metric(r, dataset, "classification", "roc_auc") for r in rows]
        pts = [(x, m) for x, m in zip(xs, ms, strict=True) if m is not None]
        if pts:
            ax.errorbar([x for x, _ in pts], [m["value"] for _, m in pts],
                        yerr=[[m["value"] - m["ci_low"] for _, m in pts], [m["ci_high"] - m["value"] for _, m in pts]],
                        marker="o", capsize=3, color=colour, label=name)
        v1 = [r for r in results if r["row"] == "v1"]
        if v1 and (m := metric(v1[0], dataset, "classification", "roc_auc")) is not None:
            ax.axhline(m["value"], color=colour, linestyle="--", linewidth=1, label=f"{name.split(',')[0]}: v1")
    ax.axhline(0.75, color="grey", linestyle=":", linewidth=1, label="NIH target 0.75")
    ax.set_xlabel("NIH training labels (the other NIH training films unlabelled)")
    ax.set_ylabel("ROC AUC (95 % interval)")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def write_table(out: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    write_json(out / "table.json", {**meta, "rows": results})
    if len(results) > 1:
        write_curve(out / "curve.png", results)
    lines = ["| row | NIH labels | NIH ROC AUC | NIH accuracy | always normal | Kermany accuracy | Kermany ROC AUC "
             "| JSRT Dice | COVID-19 Dice |", "|" + "---|" * 9]
    for r in results:
        n = "-" if r["row"] == "v1" else ("all" if r.get("nih_labels") is None else str(r["nih_labels"]))
        lines.append(" | ".join([
            f"| {r['row']}", n, cell(r, "cls-cross-test", "classification", "roc_auc"),
            cell(r, "cls-cross-test", "classification", "accuracy"),
            cell(r, "cls-cross-test", "classification", "accuracy", "baseline"),
            cell(r, "cls-in-test", "classification", "accuracy"),
            cell(r, "cls-in-test", "classification", "roc_auc"),
            cell(r, "seg-in-test", "segmentation", "dice"), cell(r, "seg-cross-test", "segmentation", "dice"),
        ]) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def study_parser(description: str, rows: tuple[str, ...], epochs: int) -> argparse.ArgumentParser:
    """The options both studies share: data, out, rows and the training schedule."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, required=True, help="the folders of benchmarks/adult_split.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rows", nargs="*", default=list(rows), choices=rows)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true")
    return p


def run_rows(args: argparse.Namespace, rows: tuple[str, ...],
             run: Callable[[str, Path, Path, argparse.Namespace], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each of ``args.rows`` that has no result.json yet (none with ``--report-only``); every
    finished row's result, in the order of ``rows``."""
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        if not args.report_only and not (args.out / name / "result.json").is_file():
            run(name, args.data.resolve(), args.out.resolve(), args)
    return [json.loads(f.read_text()) for r in rows if (f := args.out / r / "result.json").is_file()]


def study_meta(args: argparse.Namespace, *keys: str) -> dict[str, Any]:
    """The settings a study's table.json records, with the threads the runs were given."""
    meta = {k: getattr(args, k) for k in ("epochs", "steps_per_epoch", "batch_size", "lr", *keys, "seed")}
    return {**meta, "threads": os.environ.get("OMP_NUM_THREADS")}


def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__.splitlines()[0], ROWS, epochs=3)
    p.add_argument("--site-aug", default="none")
    args = p.parse_args(argv)
    results = run_rows(args, ROWS, run_row)
    write_table(args.out, results, study_meta(args, "site_aug"))
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
