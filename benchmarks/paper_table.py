"""The paper's ablation table, rerun on real data from one command.

Rows: the variants ``unet, enc, enc-ssl, umtl, umtls, umtl-ssl, multimix`` at the label
budgets (seg 10 / cls 100) and (seg 50 / cls all), plus ``multimix`` with every label.
Each row is trained with ``mmcli train`` code and evaluated with ``mmcli evaluate`` code
(every metric of the paper, bootstrap 95 % intervals, the majority-class baseline):

* in-domain: a held-out part of ``seg-in`` (JSRT) and ``cls-in`` (Kermany), split off
  here by patient (``--test-fraction``, ``--seed``) and never trained on or used to pick
  a checkpoint (each run draws its own validation split from the training part);
* cross-domain: all of ``seg-cross`` and ``cls-cross``.

Every run gets the same wall-clock budget (``--budget`` seconds; ``--budget-all`` for the
all-labels multimix row): its first epoch is timed, and the run is then given as many
epochs as fit, with the learning rate stepped down x0.1 after three quarters of them. The
run is exactly ``mmcli train ... --epochs E --lr-step L`` for the E and L it got (both are
in ``table.json``), so a faster machine trains longer from the same command.

    python benchmarks/paper_table.py --data ../shared/data --out runs/paper-table --budget 600

The output folder holds ``data/`` (the patient-disjoint train/test folders, as symbolic
links, and ``holdout.csv``), ``runs/<row>/`` (the training run and ``eval/``), and the
results: ``table.json`` (everything) and ``table.md``. A row whose ``result.json`` exists
is not run again: rerun the same command to finish an interrupted table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mmcli.config import CLASS_NAMES
from mmcli.evaluation import EvaluateConfig, run_evaluate
from mmcli.io.writers import write_json
from mmcli.training import TrainConfig, run_train
from mmcli.training.datasets import make_splits, scan_folders

logger = logging.getLogger("paper_table")

VARIANT_ORDER = ("unet", "enc", "enc-ssl", "umtl", "umtls", "umtl-ssl", "multimix")
BUDGETS = ((10, 100), (50, None))  # (seg labels, cls labels); None: all
SEG_ONLY, CLS_ONLY = {"unet"}, {"enc", "enc-ssl"}

# ISBI 2021 Table 2 as quoted in MULTIMIX.md (in = CheX + JSRT, cross = NIH + Montgomery).
PAPER: dict[str, dict[str, float]] = {
    "U-Net, seg all": {"dice_in": 0.915, "dice_cross": 0.838},
    "Enc, cls all": {"acc_in": 0.737, "f1n_in": 0.534, "f1p_in": 0.838, "acc_cross": 0.434},
    "MultiMix, seg 10 / cls 100": {"acc_in": 0.800, "f1n_in": 0.594, "f1p_in": 0.856, "dice_in": 0.954,
                                   "acc_cross": 0.440, "dice_cross": 0.857},
    "MultiMix, seg 50 / cls all": {"acc_in": 0.854, "f1n_in": 0.760, "f1p_in": 0.890, "dice_in": 0.972,
                                   "acc_cross": 0.560, "dice_cross": 0.935},
    "MultiMix, seg all / cls all": {"acc_in": 0.843, "f1n_in": 0.740, "f1p_in": 0.890, "dice_in": 0.975,
                                    "acc_cross": 0.520, "dice_cross": 0.943},
}


def _label(n: int | None) -> str:
    return "all" if n is None else str(n)


def table_rows() -> list[dict[str, Any]]:
    """The rows, all-labels multimix first (it gives the default weights)."""
    rows = [{"name": "multimix-all-all", "variant": "multimix", "seg_labels": None, "cls_labels": None}]
    for seg, cls in BUDGETS:
        for v in VARIANT_ORDER:
            rows.append({"name": f"{v}-{_label(seg)}-{_label(cls)}", "variant": v, "seg_labels": seg,
                         "cls_labels": cls})
    return rows


# ---- patient-disjoint held-out split ----


def link_folder(dst: Path, src: Path, files: list[Path], meta: dict[str, dict[str, str]], fields: list[str],
                 labels: dict[str, str]) -> None:
    """``dst`` with links to ``files`` (and their masks), plus the matching rows of labels.csv and meta.csv."""
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    for f in files:
        (dst / f.name).symlink_to(f)
        mask = src / "masks" / f"{f.stem}.png"
        if mask.is_file():
            (dst / "masks" / mask.name).symlink_to(mask.resolve())
    if not any((dst / "masks").iterdir()):
        (dst / "masks").rmdir()
    if labels:
        with open(dst / "labels.csv", "w", newline="", encoding="utf-8") as out:
            w = csv.writer(out)
            w.writerow(["file", "label"])
            w.writerows([f.name, labels[f.name]] for f in files if f.name in labels)
    if meta:
        with open(dst / "meta.csv", "w", newline="", encoding="utf-8") as out:
            w = csv.DictWriter(out, fieldnames=fields)
            w.writeheader()
            w.writerows(meta[f.name] for f in files if f.name in meta)


def read_csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    if not path.is_file():
        return [], {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or ()), {row["file"]: row for row in reader}


def split_holdout(data: Path, out: Path, *, seed: int, fraction: float) -> dict[str, Path]:
    """Split ``seg-in`` and ``cls-in`` of ``data`` into patient-disjoint train and test folders.

    The split is mmcli's own validation split (by patient, stratified by class) drawn
    with ``seed`` and ``fraction``; its validation part becomes the test folders. Returns
    the folders by name: seg-in-train, seg-in-test, cls-in-train, cls-in-test, seg-cross,
    cls-cross.
    """
    missing = [n for n in ("seg-in", "cls-in", "seg-cross", "cls-cross") if not (data / n).is_dir()]
    if missing:  # fail before hours of training, not after
        raise SystemExit(f"{data} lacks the dataset folder(s) {', '.join(missing)}")
    done = out / "holdout.csv"
    names = {k: out / k for k in ("seg-in-train", "seg-in-test", "cls-in-train", "cls-in-test")}
    names |= {"seg-cross": data / "seg-cross", "cls-cross": data / "cls-cross"}
    if done.is_file():
        return names
    seg, cls = data / "seg-in", data / "cls-in"
    samples = scan_folders([seg], [cls], CLASS_NAMES)
    splits = make_splits(samples, seg_labels=None, cls_labels=None, val_fraction=fraction, seed=seed)
    test = set(splits.val_seg) | set(splits.val_cls)
    rows = []
    for src in (seg, cls):
        fields, meta = read_csv(src / "meta.csv")
        _, label_rows = read_csv(src / "labels.csv")
        labels = {k: v["label"] for k, v in label_rows.items()}
        part = {"train": [], "test": []}
        for i, s in enumerate(samples):
            if Path(s.source) == src:
                part["test" if i in test else "train"].append(s.path)
                rows.append({"file": s.path.name, "set": src.name, "patient": s.patient or "",
                             "part": "test" if i in test else "train"})
        for p, files in part.items():
            link_folder(out / f"{src.name}-{p}", src, files, meta, fields, labels)
    with open(done, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["file", "set", "patient", "part"])
        w.writeheader()
        w.writerows(rows)
    return names


# ---- one row ----


def run_row(row: dict[str, Any], folders: dict[str, Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one row within its time budget, evaluate its best checkpoint, write result.json."""
    run = out / "runs" / row["name"]
    budget = args.budget_all if row["name"] == "multimix-all-all" and args.budget_all else args.budget
    v = row["variant"]
    cfg = TrainConfig(
        # Every row sees the same images (and so the same validation split); the images a
        # variant has no labels for are its unlabelled data (enc-ssl's pseudo labels at cls all).
        out=str(run), seg_data=(str(folders["seg-in-train"]),), cls_data=(str(folders["cls-in-train"]),),
        variant=v, arch=args.arch, seg_labels=row["seg_labels"], cls_labels=row["cls_labels"],
        seed=args.seed, epochs=args.max_epochs, steps_per_epoch=args.steps_per_epoch, image_size=args.image_size,
        lr=args.lr, lr_step=args.max_epochs, patience=None, device=args.device, precision=args.precision,
        workers=args.workers,
    )
    if run.exists():  # an interrupted row starts over: its schedule was fitted to another first epoch
        shutil.rmtree(run)
    state: dict[str, Any] = {}
    started = time.perf_counter()

    def on_start(trainer: Any) -> None:
        state["trainer"] = trainer
        state["t0"] = time.perf_counter()

    def on_epoch(hist: dict[str, Any]) -> None:
        trainer = state["trainer"]
        if "epochs" not in state:  # the first epoch of this process: fit the schedule to the budget
            elapsed = time.perf_counter() - state["t0"]
            epochs = max(1, min(args.max_epochs, int(budget // max(elapsed, 1e-6))))
            trainer.set_schedule(max(epochs, trainer.epoch), max(2, round(0.75 * epochs)))
            state["epochs"] = epochs
            logger.info("%s: first epoch %.1f s -> %d epochs in %.0f s", row["name"], elapsed, epochs, budget)

    summary = run_train(cfg, on_start=on_start, on_epoch=on_epoch, command=sys.argv)
    trained = time.perf_counter() - started
    trainer = state["trainer"]
    sets = ([] if v in CLS_ONLY else ["seg-in-test", "seg-cross"]) + ([] if v in SEG_ONLY else
                                                                     ["cls-in-test", "cls-cross"])
    ecfg = EvaluateConfig(datasets=tuple(str(folders[s]) for s in sets), out=run / "eval",
                          weights=str(run / "best.safetensors"), device=args.device, precision=args.precision,
                          overwrite=True, plots=False, n_bootstrap=args.bootstrap, seed=args.seed)
    run_evaluate(ecfg)
    evaluation = json.loads((run / "eval" / "summary.json").read_text())
    result = {
        **row, "budget_s": budget, "train_seconds": round(trained, 1),
        "epochs": trainer.cfg.epochs, "lr_step": trainer.cfg.lr_step, "epochs_run": summary.epochs_run,
        "best_epoch": summary.best_epoch, "steps_per_epoch": trainer.steps, "batch_size": trainer.cfg.batch_size,
        "counts": trainer.counts(), "temperature": summary.temperature,
        "device": str(trainer.device), "precision": trainer.precision,
        "datasets": {s: evaluation["datasets"][s] for s in sets},
    }
    write_json(_result_path(out, row["name"]), result)
    return result


# ---- the table ----

CLS_COLS = (("accuracy", "Acc"), ("f1_normal", "F1-N"), ("f1_pneumonia", "F1-P"), ("roc_auc", "AUC"))
SEG_COLS = (("dice", "Dice"), ("jaccard", "Jaccard"), ("ssim", "SSIM"), ("ahd", "AHD px"),
            ("precision", "Prec"), ("recall", "Rec"))


def metric(result: dict[str, Any], dataset: str, task: str, key: str) -> dict[str, Any] | None:
    d = result.get("datasets", {}).get(dataset, {}).get(task)
    return None if d is None else d["metrics"].get(key)


def cell(m: dict[str, Any] | None, key: str = "value") -> str:
    if m is None or m.get(key) is None or (isinstance(m[key], float) and math.isnan(m[key])):
        return "-"
    if key == "baseline":
        return f"{m[key]:.3f}"
    lo, hi = m.get("ci_low"), m.get("ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{m[key]:.3f}{ci}"


def write_table(out: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """table.json (results and settings) and table.md (one table per domain, the paper's rows below)."""
    write_json(out / "table.json", {**meta, "rows": results, "paper": PAPER})
    budget_all = f", {meta['budget_all_s']:g} s for multimix-all-all" if meta.get("budget_all_s") else ""
    at_once = f", {meta['parallel']} runs at once" if meta.get("parallel", 1) > 1 else ""
    lines = [f"# MultiMix ablation on real data ({meta['device']}, {meta['budget_s']:g} s per run{budget_all}"
             f"{at_once})", "",
             "Means with bootstrap 95 % intervals. `epochs`: epochs trained; `train s`: training wall-clock "
             "seconds (the budget is fitted after the first epoch, so a run can end below it).", ""]

    def block(title: str, cls_set: str, seg_set: str, cls_cols: tuple, seg_cols: tuple) -> None:
        head = ["row", "epochs", "train s"] + [c for _, c in cls_cols] + [c for _, c in seg_cols]
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for r in results:
            cells = [r["name"], str(r.get("epochs_run", "-")), f"{r['train_seconds']:.0f}"]
            cells += [cell(metric(r, cls_set, "classification", k)) for k, _ in cls_cols]
            cells += [cell(metric(r, seg_set, "segmentation", k)) for k, _ in seg_cols]
            lines.append("| " + " | ".join(cells) + " |")
        base = next((r for r in results if metric(r, cls_set, "classification", "accuracy")), None)
        if base is not None:
            majority = base["datasets"][cls_set]["classification"]["majority_class"]
            cells = [f"always {majority}", "-", "-"] + [cell(metric(base, cls_set, "classification", k), "baseline")
                                                   for k, _ in cls_cols] + ["-"] * len(seg_cols)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    block("In-domain (held-out Kermany and JSRT patients)", "cls-in-test", "seg-in-test", CLS_COLS, SEG_COLS)
    block("Cross-domain (NIH ChestX-ray14, COVID-19 CXR segmentations)", "cls-cross", "seg-cross", CLS_COLS,
          SEG_COLS)
    lines.extend(["## The paper (ISBI 2021 Table 2)", "", "| row | Acc in | F1-N in | F1-P in | Dice in | Acc cross "
                  "| Dice cross |", "|---|---|---|---|---|---|---|"])
    for name, vals in PAPER.items():
        keys = ("acc_in", "f1n_in", "f1p_in", "dice_in", "acc_cross", "dice_cross")
        lines.append(f"| {name} | " + " | ".join(f"{vals[k]:.3f}" if k in vals else "-" for k in keys) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _result_path(out: Path, name: str) -> Path:
    """Where a finished row's results are: its presence marks the row as done."""
    return out / "runs" / name / "result.json"


def _run_serial(rows: list[dict[str, Any]], folders: dict[str, Path], args: argparse.Namespace) -> int:
    """Run ``rows`` one after the other in this process; the number that failed."""
    failed = 0
    for row in rows:
        try:
            run_row(row, folders, args.out, args)
        except Exception:  # one failed row must not cost the others
            failed += 1
            logger.error("row %s failed:\n%s", row["name"], traceback.format_exc())
    return failed


def _groups(pending: list[dict[str, Any]], n: int, long_row: str | None) -> list[list[str]]:
    """Rows per process: a long row alone, the others dealt out in turn."""
    names = [r["name"] for r in pending]
    groups: list[list[str]] = []
    if long_row in names and n > 1:
        groups.append([long_row])
        names.remove(long_row)
        n -= 1
    groups += [names[i::n] for i in range(min(n, len(names)))]
    return [g for g in groups if g]


def _run_parallel(args: argparse.Namespace, groups: list[list[str]]) -> int:
    """Run each group of rows in its own process (this script with --rows); 1 if any failed."""
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # Every valued option passes through as given; the process gets its rows and a share of the cores.
    own = {"rows", "parallel", "report_only", "no_table", "workers"}
    opts = [text for key, value in vars(args).items() if key not in own and value is not None
            for text in (f"--{key.replace('_', '-')}", str(value))]
    opts += ["--workers", str(min(args.workers, threads))]
    procs = []
    for i, group in enumerate(groups):
        log = open(args.out / f"worker-{i}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, __file__, *opts, "--no-table", "--rows", *group], stdout=log,
                                       stderr=subprocess.STDOUT, env=env), log))
        logger.info("process %d: %s", i, " ".join(group))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait())
        log.close()
    return int(any(codes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with seg-in, cls-in, seg-cross, cls-cross")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=600.0, help="training seconds per run")
    p.add_argument("--budget-all", type=float, default=None, help="seconds for multimix-all-all (default: --budget)")
    p.add_argument("--rows", nargs="*", default=None, help="names of the rows to run (default: all)")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once, each in its own process (small runs share a big GPU well)")
    p.add_argument("--report-only", action="store_true", help="write table.md/table.json from finished rows")
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)  # the processes of --parallel
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--steps-per-epoch", type=int, default=25)
    p.add_argument("--max-epochs", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--arch", default="base", choices=("base", "tiny"))
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    folders = split_holdout(args.data, args.out / "data", seed=args.seed, fraction=args.test_fraction)
    rows = [r for r in table_rows() if args.rows is None or r["name"] in args.rows]
    if args.rows and len(rows) != len(set(args.rows)):
        p.error(f"unknown rows; choose from {', '.join(r['name'] for r in table_rows())}")
    device = "cuda" if torch.cuda.is_available() and args.device in ("auto", "cuda") else args.device
    meta = {"command": sys.argv if argv is None else argv, "budget_s": args.budget, "budget_all_s": args.budget_all,
            "parallel": args.parallel, "seed": args.seed, "test_fraction": args.test_fraction, "lr": args.lr,
            "steps_per_epoch": args.steps_per_epoch, "arch": args.arch, "image_size": args.image_size,
            "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"}
    pending = [] if args.report_only else [r for r in rows if not _result_path(args.out, r["name"]).is_file()]
    if args.parallel > 1 and len(pending) > 1:
        long_row = "multimix-all-all" if (args.budget_all or 0) > args.budget else None
        failed = _run_parallel(args, _groups(pending, args.parallel, long_row))
    else:
        failed = _run_serial(pending, folders, args)
    results = [json.loads(f.read_text()) for r in table_rows() if (f := _result_path(args.out, r["name"])).is_file()]
    if args.report_only and (args.out / "table.json").is_file():  # keep the settings the rows ran with
        old = json.loads((args.out / "table.json").read_text())
        meta = {k: old.get(k, v) for k, v in meta.items()}
    if not args.no_table:
        write_table(args.out, results, meta)
        print((args.out / "table.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
