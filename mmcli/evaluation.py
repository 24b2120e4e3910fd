"""``mmcli evaluate`` as a library call: predictions against reference masks and labels.

A dataset folder holds radiographs plus ``masks/<stem>.png`` (binary lung masks at the
image's resolution) and/or ``labels.csv`` (``file,label`` with labels normal/pneumonia).
Predictions come from a ``predict`` run through the same skeleton and code as ``mmcli
predict`` (into ``<out>/predictions.csv``), or from an earlier predict report.

Outputs in ``<out>/``::

    per_case.csv        one row per referenced image (CASE_COLUMNS)
    summary.json        per dataset: metrics, 95% bootstrap intervals, majority baseline
    summary.md          the same as tables, datasets side by side: read this first
    <hdf5>              per-case table and summary, where ``hdf5`` names a file
    *.png               Dice box plot, ROC curves, reliability diagram, worst cases
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from mmcli import __version__
from mmcli import metrics as M
from mmcli.config import CLASS_NAMES, ModelRunConfig
from mmcli.data.folders import LABELS_CSV, MASKS_DIR, scan_dataset
from mmcli.errors import UsageError
from mmcli.io import ownership
from mmcli.io.readers import is_dicom, read_radiograph
from mmcli.io.runfolder import REPORT_FORMATS, RunLayout, open_run_folder, run_record, write_run_json
from mmcli.io.writers import (
    atomic_path,
    read_csv_rows,
    read_mask_png,
    write_csv,
    write_hdf5,
    write_json,
)
from mmcli.qa.policy import UNCERTAIN
from mmcli.status import Status

logger = logging.getLogger(__name__)

SEG_COLUMNS = ("dice", "jaccard", "precision", "recall", "ssim", "ahd", "hd95", "ahd_mm", "hd95_mm")
CASE_COLUMNS: tuple[str, ...] = (
    "dataset", "case_id", "source", "status", "error", "true_label", "label", "p_pneumonia", "qa_flags",
    *SEG_COLUMNS, "height", "width", "pred_mask", "true_mask",
)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(ModelRunConfig):
    """Resolved settings of one ``evaluate`` run (recorded in ``summary.json``); ``out`` is a folder."""

    datasets: tuple[str, ...]
    out: Path
    predictions: Path | None = None
    hdf5: Path | None = None
    plots: bool = True
    n_bootstrap: int = 1000
    seed: int = 0
    worst: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.datasets:
            raise UsageError("No dataset folders given.")
        if self.out.suffix.lower() in (*REPORT_FORMATS, ".json", ".md"):
            raise UsageError(f"--out is a folder for the evaluation reports, got a file name {self.out.name!r}")
        if self.predictions is not None and not self.predictions.is_file():
            raise UsageError(f"--predictions {self.predictions} is not a file (a report written by `mmcli predict`)")
        if self.n_bootstrap < 0 or self.worst < 0:
            raise UsageError("--bootstrap and --worst must be 0 or more")


@dataclass(frozen=True)
class Reference:
    """One referenced image of a dataset: its label and/or mask file (see :mod:`mmcli.data.folders`)."""

    dataset: str
    path: Path
    key: str  # path relative to the dataset folder, posix, without suffix
    label: str | None
    mask: Path | None


@dataclass(frozen=True)
class EvaluateSummary:
    """Counts of a finished evaluation; ``failed`` or ``missing`` > 0 means exit code 1."""

    cases: int
    ok: int
    failed: int
    missing: int
    seconds: float
    out: Path


def _dataset_names(folders: Sequence[Path]) -> list[str]:
    names = [f.name or str(f) for f in folders]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def find_references(folder: Path, name: str) -> list[Reference]:
    """The images of ``folder`` (the dataset-folder rule of :mod:`mmcli.data.folders`) that have a label or a mask.

    Raises:
        UsageError: the folder has neither ``masks/`` nor ``labels.csv``, or nothing matches.
    """
    if not folder.is_dir():
        raise UsageError(f"Dataset {folder} is not a folder")
    if not (folder / MASKS_DIR).is_dir() and not (folder / LABELS_CSV).is_file():
        raise UsageError(f"{folder} has neither masks/ nor labels.csv: nothing to compare predictions with")
    refs = [Reference(name, image.path, image.key, image.label, image.mask) for image in scan_dataset(folder)
            if image.label is not None or image.mask is not None]
    if not refs:
        raise UsageError(f"No image of {folder} has a mask in masks/<stem>.png or a row in labels.csv")
    logger.info("%s: %d referenced images", name, len(refs))
    return refs


def _predictions_by_source(report: Path) -> dict[str, dict[str, Any]]:
    rows = read_csv_rows(report)
    if rows and not {"source", "status", "p_pneumonia", "mask"} <= set(rows[0]):
        raise UsageError(f"{report} is not a report written by `mmcli predict` (columns: {', '.join(rows[0])})")
    by_source = {}
    for row in rows:
        if row.get("mask"):
            row["mask_path"] = report.parent / str(row["mask"])
        by_source[str(Path(str(row["source"])).resolve())] = row
    return by_source


def _spacing(path: Path, voi_lut: bool) -> tuple[float, float] | None:
    """Pixel spacing in mm of a DICOM image (None for other formats)."""
    return read_radiograph(path, voi_lut=voi_lut).pixel_spacing if is_dicom(path) else None


def evaluate_case(ref: Reference, pred: dict[str, Any] | None, voi_lut: bool = False) -> dict[str, Any]:
    """Compare one prediction row (of a predict report) with its references; never raises."""
    row: dict[str, Any] = dict.fromkeys(CASE_COLUMNS)
    row.update(dataset=ref.dataset, case_id=ref.key, source=str(ref.path), true_label=ref.label,
               true_mask=str(ref.mask) if ref.mask else None)
    if pred is None:
        return {**row, "status": Status.MISSING, "error": "no prediction for this image in the predictions report"}
    row.update(label=pred.get("label"), p_pneumonia=pred.get("p_pneumonia"), qa_flags=pred.get("qa_flags"),
               height=pred.get("height"), width=pred.get("width"))
    if pred.get("status") != Status.OK:
        return {**row, "status": Status.ERROR, "error": pred.get("error") or "prediction failed"}
    if ref.label is not None and row["p_pneumonia"] is None:
        return {**row, "status": Status.ERROR, "error": "the model gave no pneumonia probability (no classifier)"}
    if ref.mask is not None:
        mask_path = pred.get("mask_path")
        if mask_path is None or not Path(mask_path).is_file():
            return {**row, "status": Status.ERROR, "error": "no predicted mask file (model without decoder?)"}
        row["pred_mask"] = str(mask_path)
        try:
            predicted, true = read_mask_png(mask_path), read_mask_png(ref.mask)
            if predicted.shape != true.shape:
                raise ValueError(f"reference mask is {true.shape[1]}x{true.shape[0]} but the image is "
                                 f"{predicted.shape[1]}x{predicted.shape[0]}")
            row.update(M.segmentation_metrics(predicted, true, _spacing(ref.path, voi_lut)))
        except Exception as err:  # one bad reference must not stop the evaluation
            return {**row, "status": Status.ERROR, "error": f"{type(err).__name__}: {err}"}
    return {**row, "status": Status.OK}


class EvaluationRun:
    """An evaluation, ready to go.

    When the model runs (no ``--predictions``), :attr:`predict_run` is the ``predict`` run
    into ``<out>/predictions.csv`` (the same skeleton and code as ``mmcli predict``):
    iterate over it first for its progress, or let :meth:`cases` run it. :meth:`cases`
    then yields one evaluated row per referenced image and writes the reports at the end;
    :attr:`summary` has the counts.

    Raises:
        UsageError: a dataset folder is unusable, or the predict run cannot start.
    """

    def __init__(self, cfg: EvaluateConfig, *, command: Sequence[str] | None = None) -> None:
        self.started = time.perf_counter()
        self.out = cfg.out.expanduser().resolve()
        self.cfg = cfg = EvaluateConfig(**{**asdict(cfg), "out": self.out})
        self.command = list(command) if command is not None else None
        self.folders = [Path(d).expanduser().resolve() for d in cfg.datasets]
        self.names = _dataset_names(self.folders)
        self.refs = [r for folder, name in zip(self.folders, self.names, strict=True)
                     for r in find_references(folder, name)]
        self.summary: EvaluateSummary | None = None
        self.layout = RunLayout.in_folder(self.out, "per_case.csv")
        if cfg.hdf5 is not None:
            _check_hdf5(cfg.hdf5.expanduser().resolve(), self.out)
        # the lock is held until the reports are written (or the run fails)
        self._lock = open_run_folder(self.layout, "evaluate", holds=_holds_evaluation(self.out))
        try:
            self.predict_run = self._open_predict(command) if cfg.predictions is None else None
        except BaseException:
            self._lock.release()
            raise
        self.report = cfg.predictions.resolve() if cfg.predictions is not None else self.out / "predictions.csv"

    def _open_predict(self, command: Sequence[str] | None) -> Any:
        from mmcli.predict import PredictConfig, open_predict  # torch only when the model runs

        shared = {f.name: getattr(self.cfg, f.name) for f in fields(ModelRunConfig)}  # every model-run setting
        return open_predict(PredictConfig(inputs=tuple(str(r.path) for r in self.refs),
                                          out=self.out / "predictions.csv", **shared), command=command)

    def close(self) -> None:
        """Release the run folder's lock (done by :meth:`cases`; for a run given up before it)."""
        self._lock.release()

    def cases(self) -> Iterator[dict[str, Any]]:
        """Evaluate each referenced image (running the predictions first if still to do)."""
        try:
            if self.predict_run is not None and self.predict_run.summary is None:
                self.predict_run.run()
            preds = _predictions_by_source(self.report)
            if not any(str(r.path) in preds for r in self.refs):
                raise UsageError(f"None of the {len(self.refs)} referenced images appears in {self.report}: "
                                 "was it made from these dataset folders?")
            rows = []
            for ref in self.refs:
                row = evaluate_case(ref, preds.get(str(ref.path)), self.cfg.voi_lut)
                rows.append(row)
                yield row
            self._write(rows)
        finally:
            self._lock.release()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        cfg, out = self.cfg, self.out
        summary = _plain({
            "mmcli_version": __version__,
            "predictions": str(self.report),
            "settings": asdict(cfg),  # write_json turns paths into strings
            "command": self.command,
            "datasets": {
                name: summarise_with_qa([r for r in rows if r["dataset"] == name], folder, cfg.n_bootstrap, cfg.seed,
                                        cfg.threshold)
                for folder, name in zip(self.folders, self.names, strict=True)
            },
        })
        earlier = _earlier_summary(out).get("figures") or []
        write_csv(out / "per_case.csv", rows, CASE_COLUMNS)
        if cfg.hdf5 is not None:
            flat = {k: v for k, v in summary.items() if k != "datasets"}
            write_hdf5(cfg.hdf5.expanduser().resolve(), rows, CASE_COLUMNS,
                       attrs={**flat, "datasets": summary["datasets"]})
        plots = _write_plots(out, rows, self.names, cfg) if cfg.plots else []
        summary["figures"] = figures = [os.path.relpath(p, out) for p in plots]
        write_json(out / "summary.json", summary)
        # the figures of the earlier evaluation (as its summary.json recorded them) that this one did not draw
        stale = {f for f in earlier if isinstance(f, str) and f.endswith(".png")} - set(figures)
        ownership.remove_files([Path(os.path.normpath(out / f)) for f in stale], out)
        write_markdown(out / "summary.md", summary, figures)
        statuses = Counter(r["status"] for r in rows)
        self.summary = done = EvaluateSummary(len(rows), statuses[Status.OK], statuses[Status.ERROR],
                                              statuses[Status.MISSING], time.perf_counter() - self.started, out)
        reports = [out / "per_case.csv", out / "summary.json", out / "summary.md"]
        write_run_json(self.layout, run_record(
            "evaluate", argv=self.command, settings=summary["settings"], status="finished", seconds=done.seconds,
            counts={"total": done.cases, "ok": done.ok, "failed": done.failed, "missing": done.missing},
            outputs={"folder": str(out), "reports": [str(p) for p in reports]
                     + ([str(cfg.hdf5.expanduser().resolve())] if cfg.hdf5 is not None else []),
                     "figures": figures},
            predictions=str(self.report),
        ))


def _earlier_summary(out: Path) -> dict[str, Any]:
    """The ``summary.json`` of an earlier evaluation into ``out``, if mmcli wrote it."""
    try:
        data = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and "mmcli_version" in data and "datasets" in data else {}


def _holds_evaluation(out: Path) -> bool:
    """Whether ``out`` holds an earlier evaluation: its ``summary.json``, or the predictions of one
    stopped before its reports (``predictions/`` holding a predict run)."""
    return bool(_earlier_summary(out)) or ownership.holds_run_of(out / "predictions", "predict",
                                                                 out / "predictions.csv")


def _check_hdf5(path: Path, out: Path) -> None:
    """Refuse ``--hdf5`` over a file that is not an earlier evaluation's HDF5 report."""
    if (path.exists() or path.is_symlink()) and not (
            path.is_file() and (str(path) == str((_earlier_summary(out).get("settings") or {}).get("hdf5"))
                                or ownership.has_report_columns(path, CASE_COLUMNS))):
        raise UsageError(f"{path} exists and is not a report of an earlier `mmcli evaluate` run: mmcli never "
                         "replaces a file it did not write (not even with --overwrite); choose another --hdf5")


def run_evaluate(
    cfg: EvaluateConfig,
    *,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    command: Sequence[str] | None = None,
) -> EvaluateSummary:
    """Evaluate every dataset of ``cfg`` and write the reports (see the module docstring)."""
    run = EvaluationRun(cfg, command=command)
    for row in run.cases():
        if on_case is not None:
            on_case(row)
    assert run.summary is not None  # cases() wrote the reports
    return run.summary


def _plain(obj: Any) -> Any:
    """Plain JSON values: numpy scalars as Python numbers, NaN and infinities as None."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _write_plots(out: Path, rows: list[dict[str, Any]], names: list[str], cfg: EvaluateConfig) -> list[Path]:
    """The PNG figures that have data: Dice box plot, ROC, reliability diagram, worst cases."""
    from mmcli import plots

    ok = [r for r in rows if r["status"] == Status.OK]
    dice = {n: np.array([r["dice"] for r in ok if r["dataset"] == n and r["dice"] is not None]) for n in names}
    dice = {n: d for n, d in dice.items() if d.size}
    cls = {}
    for n in names:
        labelled = [r for r in ok if r["dataset"] == n and r["true_label"] is not None]
        if labelled:
            y = np.array([r["true_label"] == CLASS_NAMES[-1] for r in labelled], dtype=int)
            cls[n] = (y, np.array([float(r["p_pneumonia"]) for r in labelled]))
    written = []
    if dice:
        written.append(plots.dice_boxplot(out / "dice_boxplot.png", dice))
        worst = []
        for n in dice:
            seg = sorted((r for r in ok if r["dataset"] == n and r["dice"] is not None), key=lambda r: r["dice"])
            worst.extend(seg[: cfg.worst])
        if worst:
            cases = [(f"{r['dataset']}: {r['case_id']}\nDice {r['dice']:.3f}",
                      read_radiograph(r["source"], voi_lut=cfg.voi_lut).pixels,
                      read_mask_png(r["pred_mask"]), read_mask_png(r["true_mask"])) for r in worst]
            written.append(plots.worst_cases_grid(out / "worst_cases.png", cases, ncols=max(1, cfg.worst)))
    if cls:
        written.append(plots.roc_plot(out / "roc.png", cls))
        written.append(plots.reliability_plot(out / "reliability.png", cls))
    return written


def summarise_with_qa(rows: list[dict[str, Any]], folder: Path, n_bootstrap: int, seed: int,
                      threshold: float = 0.5) -> dict[str, Any]:
    """:func:`summarise_dataset` of every case, plus quality control: how many evaluated cases
    were flagged (by flag), and the same summary without them (``without_flagged``)."""
    out = summarise_dataset(rows, folder, n_bootstrap, seed, threshold)
    ok = [r for r in rows if r["status"] == Status.OK]
    flagged = [r for r in ok if r.get("qa_flags")]
    by_flag: dict[str, int] = {}
    for r in flagged:
        for flag in str(r["qa_flags"]).split(";"):
            by_flag[flag] = by_flag.get(flag, 0) + 1
    out["qa"] = {"flagged": len(flagged), "share": len(flagged) / len(ok) if ok else None,
                 "by_flag": dict(sorted(by_flag.items()))}
    if flagged:
        out["without_flagged"] = summarise_dataset([r for r in rows if not r.get("qa_flags")], folder,
                                                   n_bootstrap, seed, threshold)
    return out


def summarise_dataset(rows: list[dict[str, Any]], folder: Path, n_bootstrap: int, seed: int,
                      threshold: float = 0.5) -> dict[str, Any]:
    """Counts, classification metrics (with the majority baseline) and segmentation means of one dataset.

    The predicted label is the report's ``label`` column (the threshold of the predict run).
    """
    ok = [r for r in rows if r["status"] == Status.OK]
    out: dict[str, Any] = {
        "folder": str(folder),
        "cases": len(rows), "ok": len(ok),
        "failed": sum(r["status"] == Status.ERROR for r in rows),
        "missing": sum(r["status"] == Status.MISSING for r in rows),
    }
    labelled = [r for r in ok if r["true_label"] is not None]
    if labelled:
        positive = CLASS_NAMES[-1]
        y = np.array([r["true_label"] == positive for r in labelled], dtype=int)
        # a label quality control made "uncertain" is scored by the probability it would have had
        yhat = np.array([float(r["p_pneumonia"]) >= threshold if r["label"] == UNCERTAIN else r["label"] == positive
                         for r in labelled], dtype=int)
        p = np.array([float(r["p_pneumonia"]) for r in labelled])
        out["classification"] = {
            "n": len(labelled), "n_pneumonia": int(y.sum()),
            "majority_class": CLASS_NAMES[int(y.mean() > 0.5)],
            "metrics": M.classification_summary(y, yhat, p, n_bootstrap=n_bootstrap, seed=seed),
        }
    segmented = [r for r in ok if r["dice"] is not None]
    if segmented:
        out["segmentation"] = {
            "n": len(segmented),
            "empty_predictions": sum(r["precision"] is None or np.isnan(r["precision"]) for r in segmented),
            "jaccard_le_dice": all(r["jaccard"] <= r["dice"] for r in segmented),
            "metrics": {
                col: M.mean_summary(np.array([np.nan if r[col] is None else r[col] for r in segmented], float),
                                    n_bootstrap=n_bootstrap, seed=seed)
                for col in SEG_COLUMNS
            },
        }
    return out


def _fmt(m: dict[str, Any], key: str = "value") -> str:
    value = m.get(key)
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if key == "value" and m.get("ci_low") is not None:
        text += f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    return text


def _qa_markdown(sets: dict[str, Any]) -> list[str]:
    """Quality control: flagged share per dataset, and the headline metrics with and without them."""
    if not any("qa" in d for d in sets.values()):
        return []
    lines = ["## Quality control", "",
             "Evaluated cases that quality control flagged (`qa_flags`), and the headline metrics on every "
             "evaluated case and on the unflagged ones only.", "",
             "| dataset | flagged | by flag | accuracy | accuracy unflagged | ROC AUC | ROC AUC unflagged | Dice | "
             "Dice unflagged |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in sets.items():
        qa = d.get("qa", {})
        share = f"{qa['flagged']} ({qa['share']:.1%})" if qa.get("share") is not None else "n/a"
        flags = ", ".join(f"{k} {v}" for k, v in qa.get("by_flag", {}).items()) or "-"
        rest = d.get("without_flagged", d)
        cells = []
        for key, metric in (("classification", "accuracy"), ("classification", "roc_auc"), ("segmentation", "dice")):
            for part in (d, rest):
                m = part.get(key, {}).get("metrics", {}).get(metric)
                cells.append(_fmt(m) if m else "n/a")
        lines.append(f"| {name} | {share} | {flags} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_markdown(path: Path, summary: dict[str, Any], plots: Sequence[str]) -> None:
    """``summary.md``: one classification and one segmentation table, datasets side by side."""
    sets = summary["datasets"]
    s = summary["settings"]
    lines = [
        "# mmcli evaluate", "",
        f"Predictions: `{summary['predictions']}`. Values are means with 95% percentile bootstrap intervals "
        f"({s['n_bootstrap']} resamples of cases, seed {s['seed']}).", "",
        "| dataset | cases | ok | failed | missing |", "|---|---|---|---|---|",
        *(f"| {n} | {d['cases']} | {d['ok']} | {d['failed']} | {d['missing']} |" for n, d in sets.items()), "",
    ]
    cls = {n: d["classification"] for n, d in sets.items() if "classification" in d}
    if cls:
        head = " | ".join(f"{n} (n={c['n']}) | always {c['majority_class']}" for n, c in cls.items())
        lines += ["## Classification", "",
                  "Each metric beside the majority-class baseline on the same images "
                  "(constant probability = prevalence, so its ECE is 0 by construction).", "",
                  f"| metric | {head} |", "|---|" + "---|---|" * len(cls)]
        for metric in M.CLASSIFICATION_METRICS:
            cells = " | ".join(f"{_fmt(c['metrics'][metric])} | {_fmt(c['metrics'][metric], 'baseline')}"
                               for c in cls.values())
            lines.append(f"| {metric} | {cells} |")
        for n, c in cls.items():
            acc = c["metrics"]["accuracy"]
            if not acc["value"] > acc["baseline"]:
                lines += ["", f"**{n}: accuracy is not above always predicting {c['majority_class']}.**"]
        lines.append("")
    seg = {n: d["segmentation"] for n, d in sets.items() if "segmentation" in d}
    if seg:
        lines += ["## Segmentation", "",
                  "All overlap metrics from the same binarised masks at native resolution; Hausdorff distances "
                  "on boundary pixels (ahd: modified/average Hausdorff, hd95: 95th percentile), in pixels and, "
                  "where the image gives a pixel spacing, in mm.", "",
                  "| metric | " + " | ".join(f"{n} (n={g['n']})" for n, g in seg.items()) + " |",
                  "|---|" + "---|" * len(seg)]
        for col in SEG_COLUMNS:
            lines.append(f"| {col} | " + " | ".join(_fmt(g["metrics"][col]) for g in seg.values()) + " |")
        lines += ["| empty predictions | " + " | ".join(str(g["empty_predictions"]) for g in seg.values()) + " |", ""]
    lines += _qa_markdown(sets)
    if plots:
        lines += ["## Figures", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
