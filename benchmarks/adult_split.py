"""Patient-disjoint train and test folders of every shared set, for weights v2 and site adaptation.

* ``seg-in`` (JSRT) and ``cls-in`` (Kermany): exactly the held-out split of v1
  (``docs/results/holdout.csv``), so that v1 and v2 are judged on the same patients that
  neither saw.
* ``seg-cross`` (COVID-19 lung masks) and ``cls-cross`` (NIH): a new split by patient
  (stratified by class for NIH), ``--test-fraction`` of the patients (0.3 by default, so
  that the NIH test part holds 8 pneumonia films rather than 5), drawn with
  ``--seed`` by mmcli's own validation split. NIH file names start with the patient
  number (``00000129_000.png``: patient 129); the NIH folders get it as a ``patient``
  column in ``meta.csv`` so that ``mmcli train`` also splits them by patient.

The folders are symbolic links into ``--data`` with their masks, ``labels.csv`` and
``meta.csv``. The list of every file with its set, patient and part is written to
``--list`` (``docs/results/holdout-v2.csv`` is the committed one).

    python benchmarks/adult_split.py --data ../shared/data --out runs/v2/data
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from paper_table import link_folder, read_csv  # noqa: E402

from mmcli.config import CLASS_NAMES  # noqa: E402
from mmcli.training.datasets import make_splits, scan_folders  # noqa: E402

IN_DOMAIN_LIST = Path(__file__).parents[1] / "docs" / "results" / "holdout.csv"
SETS = ("seg-in", "cls-in", "seg-cross", "cls-cross")


def nih_patient(name: str) -> str:
    return name.split("_", 1)[0].lstrip("0") or "0"


def split(data: Path, out: Path, listing: Path, *, seed: int = 0, fraction: float = 0.3,
          in_domain_list: Path = IN_DOMAIN_LIST) -> dict[str, Path]:
    """Write the train and test folders of the four sets under ``out`` and the file list to ``listing``.

    ``in_domain_list`` gives the parts of ``seg-in`` and ``cls-in`` (v1's held-out list).
    Returns the folders by name (``seg-in-train``, ``seg-in-test``, ... ``cls-cross-test``).
    """
    missing = [n for n in SETS if not (data / n).is_dir()]
    if missing:
        raise SystemExit(f"{data} lacks the dataset folder(s) {', '.join(missing)}")
    parts: dict[str, dict[str, str]] = {n: {} for n in SETS}  # set -> file -> part
    patients: dict[str, dict[str, str]] = {n: {} for n in SETS}
    with open(in_domain_list, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parts[row["set"]][row["file"]] = row["part"]
            patients[row["set"]][row["file"]] = row["patient"]
    # The adult sets: mmcli's validation split (by patient, stratified by class) becomes the test part.
    samples = [s if s.patient is not None else replace(s, patient=f"nih::{nih_patient(s.path.name)}")
               for s in scan_folders([data / "seg-cross"], [data / "cls-cross"], CLASS_NAMES)]
    splits = make_splits(samples, seg_labels=None, cls_labels=None, val_fraction=fraction, seed=seed)
    test = set(splits.val_seg) | set(splits.val_cls)
    for i, s in enumerate(samples):
        name = Path(s.source).name
        parts[name][s.path.name] = "test" if i in test else "train"
        patients[name][s.path.name] = (s.patient or "").split("::", 1)[-1]
    folders: dict[str, Path] = {}
    for name in SETS:
        src = data / name
        fields, meta = read_csv(src / "meta.csv")
        _, label_rows = read_csv(src / "labels.csv")
        labels = {k: v["label"] for k, v in label_rows.items()}
        if name == "cls-cross":
            fields = [*fields, "patient"]
            meta = {k: {**v, "patient": nih_patient(k)} for k, v in meta.items()}
        for part in ("train", "test"):
            dst = out / f"{name}-{part}"
            files = [src / f for f, p in sorted(parts[name].items()) if p == part]
            if not dst.is_dir():
                link_folder(dst, src, files, meta, fields, labels)
            folders[dst.name] = dst
    listing.parent.mkdir(parents=True, exist_ok=True)
    with open(listing, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "set", "patient", "part"])
        for name in SETS:
            w.writerows([file, name, patients[name][file], part] for file, part in sorted(parts[name].items()))
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with seg-in, cls-in, seg-cross, cls-cross")
    p.add_argument("--out", type=Path, required=True, help="where the train and test folders go")
    p.add_argument("--list", type=Path, default=None, help="file list (default: OUT/holdout-v2.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.3)
    args = p.parse_args(argv)
    folders = split(args.data.resolve(), args.out.resolve(), args.list or args.out / "holdout-v2.csv",
                    seed=args.seed, fraction=args.test_fraction)
    for name, path in folders.items():
        print(f"{name:17s} {sum(1 for f in path.iterdir() if f.suffix == '.png'):5d} images  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
