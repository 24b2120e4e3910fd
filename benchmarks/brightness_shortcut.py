"""The brightness shortcut of the adult NIH set, measured, and folders without it.

In ``cls-adult`` the films labelled normal are brighter than those labelled pneumonia
within each view, while in ``cls-cross`` (the same hospital, another draw) the two classes
are equally bright. A model can then score adult films by their brightness. This script

* ``measure``: the ROC AUC that a film's brightness alone reaches (the negated median grey
  level; 95 % bootstrap intervals) on each labelled set, overall and within each view;
* ``make``: histogram-matched copies of the adult NIH folders (``*-hm``): every film's
  grey levels mapped onto one reference distribution, the mean quantile function of the
  adult NIH training films (each class weighted equally), so that brightness and contrast
  no longer tell the classes apart while the anatomy is untouched. Also ``cls-jsrt-test``
  and ``cls-jsrt-train``: the JSRT films labelled ``normal`` (JSRT holds no pneumonia:
  "normal" is "no pneumonia" there), to count how many films without pneumonia a model
  calls pneumonia, and to train on that knowledge.

    python benchmarks/brightness_shortcut.py make --data runs/v3/data
    python benchmarks/brightness_shortcut.py measure --data runs/v3/data --out docs/results/brightness-shortcut.json \
        --plot docs/results/brightness-shortcut.png
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).parent))

from paper_table import read_csv  # noqa: E402

from mmcli import metrics as M  # noqa: E402
from mmcli.io.writers import write_json  # noqa: E402

QUANTILES = np.linspace(0.0, 1.0, 257)
MATCHED = ("cls-adult-train-vb", "cls-adult-train-vb-rest", "cls-adult-test", "cls-adult-test-ap", "cls-adult-test-pa",
           "cls-jsrt-test")
DARK = 140  # a median grey level below which few normal adult NIH films fall
PROBES = ("cls-adult-train", "cls-adult-test", "cls-adult-test-ap", "cls-adult-test-pa", "cls-cross-train",
          "cls-cross-test", "cls-in-test")


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def reference(folder: Path) -> np.ndarray:
    """The mean quantile function of ``folder``'s labelled films, each class weighted equally."""
    _, labels = read_csv(folder / "labels.csv")
    by_class: dict[str, list[np.ndarray]] = {}
    for name, row in sorted(labels.items()):
        by_class.setdefault(row["label"], []).append(np.quantile(grey(folder / name), QUANTILES))
    return np.mean([np.mean(q, axis=0) for q in by_class.values()], axis=0)


def match(pixels: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``pixels`` (uint8) mapped level by level onto the distribution whose quantiles are ``ref``."""
    counts = np.bincount(pixels.ravel(), minlength=256).astype(np.float64)
    below = np.cumsum(counts) - counts
    cdf = (below + counts / 2) / pixels.size  # mid-rank of each grey level: equal pixels stay equal
    lut = np.clip(np.rint(np.interp(cdf, QUANTILES, ref)), 0, 255).astype(np.uint8)
    return lut[pixels]


def local_contrast(pixels: np.ndarray) -> float:
    """Mean absolute Laplacian of the film's central part, its grey levels stretched to 0..255."""
    a = pixels.astype(np.float64)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
    h, w = a.shape
    c = a[h // 8 : h - h // 8, w // 8 : w - w // 8]
    return float(np.abs(4 * c[1:-1, 1:-1] - c[:-2, 1:-1] - c[2:, 1:-1] - c[1:-1, :-2] - c[1:-1, 2:]).mean())


def soften(pixels: np.ndarray, target: float) -> np.ndarray:
    """``pixels`` blurred just enough that :func:`local_contrast` is at most ``target`` (unchanged if it is)."""
    if local_contrast(pixels) <= target:
        return pixels
    low, high = 0.0, 4.0
    for _ in range(20):
        sigma = (low + high) / 2
        if local_contrast(gaussian_filter(pixels.astype(np.float64), sigma)) > target:
            low = sigma
        else:
            high = sigma
    return np.clip(np.rint(gaussian_filter(pixels.astype(np.float64), high)), 0, 255).astype(np.uint8)


def make(data: Path) -> dict[str, Path]:
    ref = reference(data / "cls-adult-train")
    train = sorted((data / "cls-adult-train").glob("*.png"))
    target = float(np.percentile([local_contrast(match(grey(p), ref)) for p in train], 25))
    made = {f"cls-jsrt-{part}": _jsrt(data, part) for part in ("train", "test")}
    for name in MATCHED:
        src = data / name
        for suffix, mapping in (("-hm", lambda a: match(a, ref)), ("-hs", lambda a: match(soften(a, target), ref))):
            made[f"{name}{suffix}"] = build_folder(data / f"{name}{suffix}", _mapped_copy(src, mapping))
    np.savetxt(data / "hm-reference.txt", ref, fmt="%.4f", header="grey level at quantiles 0, 1/256, ..., 1")
    return made


def _mapped_copy(src: Path, mapping: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """Writes ``src``'s films through ``mapping``, with its labels.csv and meta.csv, into a folder."""
    def fill(tmp: Path) -> None:
        for image in sorted(src.glob("*.png")):
            Image.fromarray(mapping(grey(image))).save(tmp / image.name)
        for table in ("labels.csv", "meta.csv"):
            if (src / table).is_file():
                shutil.copyfile(src / table, tmp / table)

    return fill


def build_folder(dst: Path, fill: Callable[[Path], None]) -> Path:
    """``dst``, unless it exists, made whole: ``fill`` writes into ``dst.part``, which is then renamed."""
    if not dst.is_dir():
        tmp = dst.with_name(dst.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        tmp.rename(dst)
    return dst


def linked_folder(films: dict[str, Path], tables: dict[str, list[dict[str, str]]]) -> Callable[[Path], None]:
    """A ``fill`` for :func:`build_folder`: a link ``name`` to each film, and each table (file name -> rows,
    none: no file) as CSV."""
    def fill(tmp: Path) -> None:
        for name, film in films.items():
            (tmp / name).symlink_to(film.resolve())
        for table, rows in tables.items():
            if not rows:
                continue
            with open(tmp / table, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

    return fill


def _jsrt(data: Path, part: str) -> Path:
    """``cls-jsrt-<part>``: the films of ``seg-in-<part>`` (JSRT) labelled ``normal``, i.e. no pneumonia."""
    films = {p.name: p for p in sorted((data / f"seg-in-{part}").glob("*.png"))}
    labels = [{"file": name, "label": "normal"} for name in films]
    return build_folder(data / f"cls-jsrt-{part}", linked_folder(films, {"labels.csv": labels}))


def brightness_auc(folder: Path, seed: int = 0) -> dict[str, Any]:
    """ROC AUC of the negated median grey level (``auc``) and of the local contrast (``contrast_auc``)
    against the labels of ``folder``, per view where known."""
    y, names, meta, films = _films(folder)
    score = np.array([-float(np.median(a)) for a in films])
    brightness = np.array([a.mean() for a in films])
    contrast = np.array([local_contrast(a) for a in films])
    by_class = {"normal": y == 0, "pneumonia": y == 1}
    out: dict[str, Any] = {"n": len(names), "mean_grey": {c: float(brightness[k].mean()) for c, k in by_class.items()},
                           "auc": _auc(y, score, seed), "contrast_auc": _auc(y, contrast, seed),
                           "mean_contrast": {c: float(contrast[k].mean()) for c, k in by_class.items()}}
    views = {meta.get(n, {}).get("view") for n in names} - {None, ""}
    for view in sorted(views) if len(views) > 1 else []:
        keep = np.array([meta[n]["view"] == view for n in names])
        out[f"auc_{view}"] = _auc(y[keep], score[keep], seed)
        # the dark mode of the adult NIH pneumonia films (brightness-shortcut.png)
        out[f"dark_share_{view}"] = {c: float((-score[keep & k] < DARK).mean()) for c, k in by_class.items()}
    return out


def _films(folder: Path) -> tuple[np.ndarray, list[str], dict[str, dict[str, str]], list[np.ndarray]]:
    """``folder``'s labels (1: pneumonia), film names, meta.csv rows and grey levels, each film read once."""
    _, labels = read_csv(folder / "labels.csv")
    _, meta = read_csv(folder / "meta.csv") if (folder / "meta.csv").is_file() else ([], {})
    names = sorted(labels)
    y = np.array([labels[n]["label"] == "pneumonia" for n in names], dtype=int)
    return y, names, meta, [grey(folder / n) for n in names]


def write_plot(path: Path, data: Path) -> None:
    """Median grey level of each film by class: the adult NIH films, the small NIH set, Kermany."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, title) for name, title in (("cls-adult-train", "adult NIH (cls-adult), training"),
                                                ("cls-adult-test", "adult NIH (cls-adult), test"),
                                                ("cls-cross-train", "small NIH set, training"),
                                                ("cls-in-test", "Kermany (children), test"))
              if (data / name / "labels.csv").is_file()]
    fig = Figure(figsize=(3.0 * len(panels), 2.8), dpi=120)
    FigureCanvasAgg(fig)
    bins = np.linspace(0, 255, 33)
    for i, (name, title) in enumerate(panels):
        y, _, _, films = _films(data / name)
        median = np.array([float(np.median(a)) for a in films])
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, k, colour in (("normal", 0, "tab:blue"), ("pneumonia", 1, "tab:red")):
            ax.hist(median[y == k], bins=bins, density=True, alpha=0.5, color=colour,
                    label=f"{label} ({(y == k).sum()})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("median grey level of the film")
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


def _auc(y: np.ndarray, score: np.ndarray, seed: int) -> dict[str, float]:
    low, high = M.bootstrap_ci(M.roc_auc, y, score, n_resamples=2000, seed=seed)
    return {"value": M.roc_auc(y, score), "low": low, "high": high}


def measure(data: Path) -> dict[str, Any]:
    sets = [*PROBES, *(f"{n}{s}" for s in ("-hm", "-hs") for n in MATCHED if n.startswith("cls-adult-test"))]
    return {name: brightness_auc(data / name) for name in sets if (data / name / "labels.csv").is_file()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("make", "measure"))
    p.add_argument("--data", type=Path, required=True, help="the folders of benchmarks/v3_split.py")
    p.add_argument("--out", type=Path, default=None, help="measure: JSON file for the figures")
    p.add_argument("--plot", type=Path, default=None, help="measure: also draw the grey levels by class (PNG)")
    args = p.parse_args(argv)
    if args.what == "make":
        for name, path in make(args.data.resolve()).items():
            print(f"{name:28s} {sum(1 for f in path.iterdir() if f.suffix == '.png'):5d} images  {path}")
        return 0
    result = measure(args.data.resolve())
    for name, r in result.items():
        views = "  ".join(f"{k[4:]} {v['value']:.3f}" for k, v in r.items() if k.startswith("auc_"))
        print(f"{name:26s} n={r['n']:4d}  brightness AUC {r['auc']['value']:.3f} "
              f"[{r['auc']['low']:.3f}, {r['auc']['high']:.3f}]  {views}  mean grey "
              f"normal {r['mean_grey']['normal']:.1f} pneumonia {r['mean_grey']['pneumonia']:.1f}  "
              f"local contrast AUC {r['contrast_auc']['value']:.3f} (normal {r['mean_contrast']['normal']:.2f}, "
              f"pneumonia {r['mean_contrast']['pneumonia']:.2f})")
    if args.plot:
        write_plot(args.plot, args.data.resolve())
    if args.out:
        write_json(args.out, {"command": "python benchmarks/brightness_shortcut.py measure", "sets": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
