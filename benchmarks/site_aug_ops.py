"""Which site-shift augmentations help: one ``--site-aug`` op at a time against none.

Every row is the same ``mmcli train --init multimix-cxr-v1`` run on the training parts of
``benchmarks/adult_split.py`` with the recipe of the default weights v2 (JSRT and COVID-19
lung masks, Kermany labels, NIH films unlabelled, ``--balance-sources``, seed 0), shortened
to ``--epochs x --steps-per-epoch`` steps; row ``none`` has no site augmentation, each other
row exactly one op of ``mmcli.training.config.SITE_OPS``. Every row is evaluated by
``mmcli evaluate`` on the held-out NIH, Kermany, JSRT and COVID-19 patients.

Because the rows differ only in the op and are evaluated on the same films, each op is
compared with ``none`` **paired**: the interval of the difference comes from one bootstrap
that resamples the held-out **patients** (a patient's films together: the ``patient`` or
``patientid`` column of the folders' CSV files, else each film its own patient) and
recomputes both rows' figure on the same draw. Accuracy scores an ``uncertain`` label by its
probability, as ``mmcli evaluate`` does. The intervals are at 99 %: 95 % with a Bonferroni
correction over the five figures. Row ``none-seed1`` is ``none`` trained with the next
seed: its difference from ``none`` is training noise alone, the yardstick for the others.

The rule, fixed before the runs: an op **hurts** when a difference has its interval below 0
and larger in size than the seed row's difference on that figure; otherwise it **helps**
when a difference has its interval above 0 and larger than the seed row's; otherwise it
makes **no difference**. The default weights keep the ops that help.

    OMP_NUM_THREADS=1 python benchmarks/site_aug_ops.py --data runs/v2/data --out runs/site-ops

A row whose ``result.json`` exists is not run again and an interrupted training resumes;
``--rows`` runs some rows only (two processes with disjoint rows share a 2-core machine).
``table.md``, ``table.json`` and ``differences.png`` hold the results.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from paper_table import cell as _format  # noqa: E402
from paper_table import metric  # noqa: E402
from site_adaptation import evaluate_row, run_rows, study_meta, study_parser, train_from_v1  # noqa: E402

from mmcli.io.writers import write_json  # noqa: E402
from mmcli.metrics import accuracy, nanmean, roc_auc  # noqa: E402
from mmcli.training.config import SITE_OPS  # noqa: E402

CONTROL = "none-seed1"
ROWS = ("none", CONTROL, *SITE_OPS)
LEVEL = 1 - 0.05 / 5

# (label, dataset, kind): the figures compared with row "none".
FIGURES = (
    ("NIH ROC AUC", "cls-cross-test", "auc"),
    ("Kermany accuracy", "cls-in-test", "accuracy"),
    ("Kermany ROC AUC", "cls-in-test", "auc"),
    ("JSRT Dice", "seg-in-test", "dice"),
    ("COVID-19 Dice", "seg-cross-test", "dice"),
)


def run_row(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    ops, seed = ("none", args.seed + 1) if name == CONTROL else (name, args.seed)
    folders = ["--seg-data", str(data / "seg-in-train"), "--seg-data", str(data / "seg-cross-train"),
               "--cls-data", str(data / "cls-in-train"), "--unlabelled-data", str(data / "cls-cross-train")]
    run = train_from_v1(out / name / "train", folders, args, site_aug=ops, lr_step=args.epochs, seed=seed)
    return evaluate_row(out / name, data, str(out / name / "train" / "best.safetensors"),
                        {"row": name, "site_augment": run.get("site_augment"), "train_seconds": run.get("seconds")})


def per_case(eval_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{dataset: {case_id: row}}`` of an evaluation's per_case.csv (cases that were read)."""
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    with open(eval_dir / "per_case.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["status"] == "ok":
                cases.setdefault(row["dataset"], {})[row["case_id"]] = row
    return cases


def patients(data: Path, dataset: str) -> dict[str, str]:
    """``{case_id: patient}`` from the ``patient`` or ``patientid`` column of the folder's CSV files."""
    found: dict[str, str] = {}
    for table in sorted((data / dataset).glob("*.csv")):
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                patient = row.get("patient") or row.get("patientid")
                if row.get("file") and patient:
                    found[Path(row["file"]).stem] = patient
    return found


def _arrays(base: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], kind: str,
            ) -> tuple[list[str], tuple[np.ndarray, ...]]:
    ids = sorted(set(base) & set(other))
    if kind == "dice":
        ids = [i for i in ids if base[i]["dice"] and other[i]["dice"]]
        return ids, (np.array([float(base[i]["dice"]) for i in ids]), np.array([float(other[i]["dice"]) for i in ids]))
    ids = [i for i in ids if base[i]["true_label"]]
    y = np.array([int(base[i]["true_label"] == "pneumonia") for i in ids])
    p_base = np.array([float(base[i]["p_pneumonia"]) for i in ids])
    p_other = np.array([float(other[i]["p_pneumonia"]) for i in ids])
    if kind == "auc":
        return ids, (y, p_base, p_other)
    return ids, (y, _labels(base, ids, p_base), _labels(other, ids, p_other))


def _labels(cases: dict[str, dict[str, Any]], ids: list[str], p: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted pneumonia (1) or not; an ``uncertain`` label by its probability, as ``mmcli evaluate``."""
    return np.array([p[k] >= threshold if cases[i]["label"] == "uncertain" else cases[i]["label"] == "pneumonia"
                     for k, i in enumerate(ids)], dtype=int)


_DIFFERENCES = {
    "dice": lambda a, b: nanmean(b) - nanmean(a),
    "auc": lambda y, a, b: roc_auc(y, b) - roc_auc(y, a),
    "accuracy": lambda y, a, b: accuracy(y, b) - accuracy(y, a),
}


def paired_difference(base: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], kind: str,
                      patient_of: dict[str, str] | None = None, n_bootstrap: int = 2000, level: float = LEVEL,
                      seed: int = 0) -> dict[str, float]:
    """``other - base`` of one figure on the cases both have, with its paired bootstrap interval.

    The bootstrap draws patients with replacement (``patient_of``: case id to patient; a case
    it lacks is a patient of its own) and takes all their cases; resamples where the figure
    is undefined (one class drawn) are dropped.
    """
    ids, arrays = _arrays(base, other, kind)
    fn = _DIFFERENCES[kind]
    patient_of = patient_of or {}
    groups: dict[str, list[int]] = {}
    for k, case in enumerate(ids):
        groups.setdefault(patient_of.get(case, f"case:{case}"), []).append(k)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap if ids else 0):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        values.append(fn(*(a[idx] for a in arrays)))
    finite = np.array(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (np.nan, np.nan)
    return {"value": float(fn(*arrays)) if ids else float("nan"), "ci_low": float(low), "ci_high": float(high),
            "n": len(ids), "patients": len(members), "level": level}


def verdict(differences: dict[str, dict[str, float]], control: dict[str, dict[str, float]] | None = None) -> str:
    """``helps``, ``hurts`` or ``no difference`` by the rule in the module docstring.

    ``control``: the seed row's differences from ``none`` (None: no yardstick, only the intervals count).
    """
    def beyond_noise(label: str) -> bool:
        return control is None or abs(differences[label]["value"]) > abs(control[label]["value"])

    if any(d["ci_high"] < 0 and beyond_noise(k) for k, d in differences.items()):
        return "hurts"
    if any(d["ci_low"] > 0 and beyond_noise(k) for k, d in differences.items()):
        return "helps"
    return "no difference"


def compare(out: Path, results: list[dict[str, Any]], data: Path | None = None) -> list[dict[str, Any]]:
    """Each row's paired differences from row ``none`` and, for the ops, the verdict, added to its result.

    ``data``: the folders of the held-out sets, whose CSV files name the patients.
    """
    base = per_case(out / "none" / "eval")
    patient_of = {ds: patients(data, ds) if data else {} for _, ds, _ in FIGURES}
    for r in results:
        if r["row"] != "none":
            cases = per_case(out / r["row"] / "eval")
            r["vs_none"] = {label: paired_difference(base.get(ds, {}), cases.get(ds, {}), kind, patient_of[ds])
                            for label, ds, kind in FIGURES}
    control = next((r["vs_none"] for r in results if r["row"] == CONTROL), None)
    for r in results:
        if r["row"] not in ("none", CONTROL):
            r["verdict"] = verdict(r["vs_none"], control)
    return results


def _signed(d: dict[str, float]) -> str:
    return f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def write_table(out: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    write_json(out / "table.json", {**meta, "rows": results})
    kinds = {"auc": "roc_auc", "accuracy": "accuracy", "dice": "dice"}
    head = "| row | " + " | ".join(label for label, _, _ in FIGURES) + " | verdict |"
    lines = ["Held-out figures (95 % bootstrap intervals):", "", head, "|" + "---|" * (len(FIGURES) + 2)]
    for r in results:
        cells = [_format(metric(r, ds, "segmentation" if kind == "dice" else "classification", kinds[kind]), "value")
                 for _, ds, kind in FIGURES]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r.get('verdict', '-')} |")
    lines += ["", f"Paired difference from row `none` ({LEVEL:.0%} paired bootstrap interval over patients; "
              f"`{CONTROL}`: the same training with the next seed):", "",
              head, "|" + "---|" * (len(FIGURES) + 2)]
    for r in results:
        if "vs_none" in r:
            lines.append(f"| {r['row']} | " + " | ".join(_signed(r["vs_none"][label]) for label, _, _ in FIGURES)
                         + f" | {r.get('verdict', 'seed control')} |")
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(path: Path, results: list[dict[str, Any]]) -> None:
    """One panel per figure: each row's paired difference from ``none`` with its interval; the
    grey band is the seed row's difference (training noise), either side of 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results if "vs_none" in r]
    if not rows:
        return
    fig = Figure(figsize=(11.0, 0.45 * len(rows) + 1.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(FIGURES), sharey=True)
    control = next((r["vs_none"] for r in rows if r["row"] == CONTROL), None)
    ys = list(range(len(rows)))[::-1]
    for ax, (label, _, _) in zip(axes, FIGURES, strict=True):
        if control is not None:
            noise = abs(control[label]["value"])
            ax.axvspan(-noise, noise, color="0.88", zorder=0)
        ax.axvline(0.0, color="0.4", linewidth=0.8)
        for y, r in zip(ys, rows, strict=True):
            d = r["vs_none"][label]
            colour = "0.45" if r["row"] == CONTROL else "tab:blue"
            ax.errorbar([d["value"]], [y], xerr=[[d["value"] - d["ci_low"]], [d["ci_high"] - d["value"]]],
                        fmt="o", color=colour, capsize=2, markersize=4)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(ys, [r["row"] for r in rows], fontsize=8)
    fig.supxlabel(f"difference from no site augmentation ({LEVEL:.0%} paired interval over patients)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    args = study_parser(__doc__.splitlines()[0], ROWS, epochs=2).parse_args(argv)
    results = run_rows(args, ROWS, run_row)
    if any(r["row"] == "none" for r in results):
        results = compare(args.out, results, args.data.resolve())
    write_table(args.out, results, study_meta(args))
    write_plot(args.out / "differences.png", results)
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
