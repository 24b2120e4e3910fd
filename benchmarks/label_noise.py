"""What the text-mined NIH labels let an adult pneumonia AUC reach: AUC by co-label, and a ceiling.

The NIH "Pneumonia" label is mined from reports; most pneumonia films also carry other
findings (infiltration, effusion, edema, ...), and some show no opacity at all. This
script takes the adult NIH test films of an ``mmcli evaluate`` run and gives the ROC AUC
of all normal films against each group of pneumonia films: those labelled Pneumonia
alone, those with co-labels, and those with each common co-label, with 95 % bootstrap
intervals. It also tabulates the ceiling that label noise puts on the AUC: if a share
``e`` of the films labelled pneumonia show no sign of it and so look normal to any model,
a model that ranks every real pneumonia above every normal film still reaches only
``1 - e / 2`` against these labels.

    python benchmarks/label_noise.py --eval runs/v3/B-all/eval --meta ../shared/data/cls-adult/meta.csv

Co-label handling: ``--make DATA`` builds, from the histogram-matched view-balanced adult
training films (``benchmarks/brightness_shortcut.py make``), a labelled folder whose
pneumonia films all carry another finding as well (``cls-adult-train-vb-co-hm``), and puts
the films labelled Pneumonia alone, whose label no other finding backs, in an unlabelled
folder (``cls-adult-train-vb-alone-hm``), with as many normal films of the same views so
that the labelled classes stay balanced within each view. Candidate ``M`` of
``benchmarks/weights_v3.py`` trains on them.

    python benchmarks/label_noise.py --make runs/v3/data
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from brightness_shortcut import build_folder, linked_folder  # noqa: E402

from mmcli import metrics as M  # noqa: E402

CO_LABELS = ("Infiltration", "Atelectasis", "Edema", "Effusion", "Consolidation")


def auc_of(rows: list[dict[str, str]], findings: dict[str, str], keep: Callable[[str], bool]) -> dict[str, float]:
    sel = [r for r in rows if r["true_label"] == "normal" or keep(findings[r["case_id"]])]
    y = np.array([r["true_label"] == "pneumonia" for r in sel], dtype=int)
    p = np.array([float(r["p_pneumonia"]) for r in sel])
    low, high = M.bootstrap_ci(M.roc_auc, y, p)
    return {"value": M.roc_auc(y, p), "ci_low": low, "ci_high": high, "n_pneumonia": int(y.sum()),
            "n_normal": int(len(y) - y.sum())}


def colabel_folders(data: Path, seed: int = 0) -> tuple[Path, Path]:
    """The labelled folder of co-labelled pneumonia and normal films, and the unlabelled rest (see above)."""
    src = data / "cls-adult-train-vb-hm"
    with open(src / "meta.csv", newline="", encoding="utf-8") as f:
        meta = list(csv.DictReader(f))
    alone = [r for r in meta if r["label"] == "pneumonia" and r["finding_labels"] == "Pneumonia"]
    rng = np.random.default_rng(seed)
    dropped = {r["file"] for r in alone}
    for view in sorted({r["view"] for r in alone}):
        normal = sorted(r["file"] for r in meta if r["label"] == "normal" and r["view"] == view)
        k = sum(r["view"] == view for r in alone)
        dropped |= {normal[j] for j in rng.permutation(len(normal))[:k]}
    kept = [r for r in meta if r["file"] not in dropped]
    labels = [{"file": r["file"], "label": r["label"], "patient": r["patient"]} for r in kept]
    free = [r for r in meta if r["file"] in dropped]
    return (build_folder(data / "cls-adult-train-vb-co-hm",
                         linked_folder({r["file"]: src / r["file"] for r in kept}, {"meta.csv": kept,
                                                                                     "labels.csv": labels})),
            build_folder(data / "cls-adult-train-vb-alone-hm",
                         linked_folder({r["file"]: src / r["file"] for r in free}, {"meta.csv": free})))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=Path, help="an mmcli evaluate folder (its per_case.csv)")
    p.add_argument("--meta", type=Path, help="cls-adult meta.csv (file, finding_labels)")
    p.add_argument("--make", type=Path, metavar="DATA", help="build the co-label folders in DATA and stop")
    p.add_argument("--dataset", default="cls-adult-test")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.make:
        for folder in colabel_folders(args.make):
            print(folder, sum(1 for _ in folder.glob("*.png")), "films")
        return 0
    if not (args.eval and args.meta):
        p.error("--eval and --meta are needed (or --make)")
    with open(args.meta, newline="", encoding="utf-8") as f:
        findings = {Path(r["file"]).stem: r["finding_labels"] for r in csv.DictReader(f)}
    with open(args.eval / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == args.dataset and r["status"] == "ok"]
    groups: dict[str, Callable[[str], bool]] = {
        "all pneumonia": lambda f: True,
        "Pneumonia alone": lambda f: f == "Pneumonia",
        "with co-labels": lambda f: f != "Pneumonia",
        **{f"with {c}": (lambda f, c=c: c in f.split("|")) for c in CO_LABELS},
    }
    result = {"eval": str(args.eval), "dataset": args.dataset,
              "groups": {name: auc_of(rows, findings, keep) for name, keep in groups.items()},
              "ceiling": {f"{e:.2f}": 1 - e / 2 for e in (0.1, 0.2, 0.3, 0.4)}}
    print("| pneumonia films | n | ROC AUC against all normal films |\n|---|---|---|")
    for name, g in result["groups"].items():
        print(f"| {name} | {g['n_pneumonia']} | {g['value']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}] |")
    print("\nceiling 1 - e/2 for a share e of pneumonia labels without a visible sign: "
          + ", ".join(f"e={e}: {c:.2f}" for e, c in result["ceiling"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
