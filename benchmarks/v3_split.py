"""Patient-disjoint train and test folders of every shared set, for weights v3.

* ``seg-in``, ``cls-in``, ``seg-cross`` and ``cls-cross``: exactly v2's split
  (:mod:`adult_split`, checked against ``docs/results/holdout-v2.csv``), so that v1, v2 and
  v3 are judged on the same patients that none of them saw.
* ``seg-adult`` (COVID-19 films with V7 lung masks) and ``cls-adult`` (adult NIH films): a
  new split by patient (``meta.csv`` ``patient``; stratified by class for NIH),
  ``--test-fraction`` of the patients (0.25 by default), drawn with ``--seed`` by mmcli's own
  validation split.
* ``cls-adult-train-vb``: the NIH training films balanced by class *within* each view (AP,
  PA), as many normal as pneumonia films per view, chosen at random with ``--seed``; the
  other NIH training films go to ``cls-adult-train-vb-rest`` without labels (for the
  unlabelled streams). This breaks the view shortcut in the labels the classifier sees.
* ``cls-adult-test-ap`` and ``cls-adult-test-pa``: the NIH test films of one view each.

The folders are symbolic links into ``--data``. The list of every file with its set,
patient and part is written to ``--list`` (``docs/results/holdout-v3.csv`` is the committed one).

    python benchmarks/v3_split.py --data ../shared/data --out runs/v3/data
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from adult_split import split as split_v2  # noqa: E402
from paper_table import link_folder, read_csv  # noqa: E402

from mmcli.config import CLASS_NAMES  # noqa: E402
from mmcli.training.datasets import make_splits, scan_folders  # noqa: E402

ADULT_SETS = ("seg-adult", "cls-adult")
VIEWS = ("AP", "PA")


def _view_balanced(files: list[str], meta: dict[str, dict[str, str]], labels: dict[str, str],
                   seed: int) -> set[str]:
    """The files kept so that each view holds as many normal as pneumonia films."""
    rng = np.random.default_rng([seed, 7])
    keep: set[str] = set()
    for view in VIEWS:
        by_class = {c: sorted(f for f in files if meta[f]["view"] == view and labels[f] == c) for c in CLASS_NAMES}
        n = min(len(v) for v in by_class.values())
        for names in by_class.values():
            keep.update(names[j] for j in rng.permutation(len(names))[:n])
    return keep


def split(data: Path, out: Path, listing: Path, *, seed: int = 0, fraction: float = 0.25) -> dict[str, Path]:
    """Write the train and test folders of the six sets under ``out`` and the file list to ``listing``."""
    missing = [n for n in ADULT_SETS if not (data / n).is_dir()]
    if missing:
        raise SystemExit(f"{data} lacks the dataset folder(s) {', '.join(missing)}")
    v2_list = out / "holdout-v2.csv"
    folders = split_v2(data, out, v2_list)
    with open(v2_list, newline="", encoding="utf-8") as f:
        rows = [[r["file"], r["set"], r["patient"], r["part"]] for r in csv.DictReader(f)]
    samples = scan_folders([data / "seg-adult"], [data / "cls-adult"], CLASS_NAMES)
    splits = make_splits(samples, seg_labels=None, cls_labels=None, val_fraction=fraction, seed=seed)
    test = set(splits.val_seg) | set(splits.val_cls)
    parts: dict[str, dict[str, str]] = {n: {} for n in ADULT_SETS}
    for i, s in enumerate(samples):
        parts[Path(s.source).name][s.path.name] = "test" if i in test else "train"
    for name in ADULT_SETS:
        src = data / name
        fields, meta = read_csv(src / "meta.csv")
        _, label_rows = read_csv(src / "labels.csv")
        labels = {k: v["label"] for k, v in label_rows.items()}
        for part in ("train", "test"):
            names = [f for f, p in sorted(parts[name].items()) if p == part]
            folders[f"{name}-{part}"] = _ensure(out / f"{name}-{part}", src, names, meta, fields, labels)
        rows += [[f, name, meta[f]["patient"], p] for f, p in sorted(parts[name].items())]
        if name == "cls-adult":
            train = [f for f, p in sorted(parts[name].items()) if p == "train"]
            keep = _view_balanced(train, meta, labels, seed)
            folders["cls-adult-train-vb"] = _ensure(out / "cls-adult-train-vb", src, sorted(keep), meta, fields,
                                                    labels)
            rest = sorted(set(train) - keep)
            folders["cls-adult-train-vb-rest"] = _ensure(out / "cls-adult-train-vb-rest", src, rest, meta, fields, {})
            test = [f for f, p in sorted(parts[name].items()) if p == "test"]
            for view in VIEWS:  # the test films of one view, so that evaluate reports each view on its own
                names = [f for f in test if meta[f]["view"] == view]
                folders[f"cls-adult-test-{view.lower()}"] = _ensure(out / f"cls-adult-test-{view.lower()}", src,
                                                                    names, meta, fields, labels)
    listing.parent.mkdir(parents=True, exist_ok=True)
    with open(listing, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "set", "patient", "part"])
        w.writerows(rows)
    return folders


def _ensure(dst: Path, src: Path, names: list[str], meta: dict[str, dict[str, str]], fields: list[str],
            labels: dict[str, str]) -> Path:
    if not dst.is_dir():
        link_folder(dst, src, [src / f for f in names], meta, fields, labels)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with the six shared sets")
    p.add_argument("--out", type=Path, required=True, help="where the train and test folders go")
    p.add_argument("--list", type=Path, default=None, help="file list (default: OUT/holdout-v3.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    args = p.parse_args(argv)
    folders = split(args.data.resolve(), args.out.resolve(), args.list or args.out / "holdout-v3.csv",
                    seed=args.seed, fraction=args.test_fraction)
    for name, path in folders.items():
        print(f"{name:24s} {sum(1 for f in path.iterdir() if f.suffix == '.png'):5d} images  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
