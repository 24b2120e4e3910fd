"""What one ``predict`` case produces, on top of the run skeleton of :mod:`mmcli.batch`.

Outputs for ``--out results.csv`` (or ``results.h5``)::

    results.csv               one row per input (REPORT_COLUMNS)
    results/masks/<case>.png  lung mask at the input's native resolution, 1-bit PNG
    results/run.json          the command, resolved settings, versions, device, counts
    results/journal.jsonl     finished cases, read back to resume a killed run

Each case fails alone: a file that cannot be read gets status ``error`` and its reason,
the rest of the batch goes on. A DICOM SEG, SR or SC that cannot be written (``--dicom-seg``,
``--dicom-sr``, ``--dicom-sc``) costs no prediction: the case stays ``ok`` and ``dicom_error`` says why.

The patient's right and left lung (``right_lung_*``, ``left_lung_*``) come from the reported mask by
:func:`mmcli.qa.mask.lung_sides`; fractions are of the image at its native size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli.batch import (
    BatchRun,
    Job,
    RunLayout,
    RunSummary,
    new_row,
    open_batch,
    provenance,
    resume_header,
)
from mmcli.config import BatchConfig, ReadOptions
from mmcli.data.datasets import Case
from mmcli.errors import CaseError, UsageError
from mmcli.inference import BatchPrediction, Predictor
from mmcli.io.discover import InputFile
from mmcli.io.runfolder import is_hdf5, report_format
from mmcli.io.writers import read_mask_png, write_csv, write_hdf5, write_mask_png
from mmcli.outcome import case_outcome, label_for
from mmcli.status import Status
from mmcli.weights import weights_name

logger = logging.getLogger(__name__)

__all__ = ["FILE_COLUMNS", "REPORT_COLUMNS", "PredictCase", "PredictConfig", "open_predict", "run_predict"]

REPORT_COLUMNS: tuple[str, ...] = (
    "case_id", "source", "status", "error", "p_pneumonia", "label", "qa_flags",
    "lung_fraction", "right_lung_fraction", "left_lung_fraction", "lung_area_mm2", "right_lung_area_mm2",
    "left_lung_area_mm2", "height", "width", "mask", "dicom_seg", "dicom_sr", "dicom_sc", "dicom_error",
)
FILE_COLUMNS: tuple[str, ...] = ("mask", "dicom_seg", "dicom_sr", "dicom_sc")
"""The report columns that name a case's files (relative to the report's folder)."""


@dataclass(frozen=True, kw_only=True)
class PredictConfig(BatchConfig):
    """Resolved settings of one ``predict`` run (written to ``run.json``); ``out`` is the report file."""

    hdf5: Path | None = None
    dicom_seg: bool = False
    dicom_sr: bool = False
    dicom_sc: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.dicom_seg or self.dicom_sr or self.dicom_sc) and self.anonymize_ids is not None:
            raise UsageError("--dicom-seg, --dicom-sr and --dicom-sc cannot be combined with --anonymize-ids: a DICOM "
                             "object derived from an image carries that image's patient and study")
        report_format(self.out)
        if self.hdf5 is not None and not is_hdf5(self.hdf5):
            raise UsageError(f"--hdf5 must end in .h5 or .hdf5, got {self.hdf5.name!r}")


@dataclass(frozen=True)
class PredictCase:
    """One predict case: a report row, and the lung mask at native size as a PNG.

    Attributes:
        masks_dir: where mask files go. report_dir: the report's folder (mask paths are relative to it).
    """

    threshold: float
    masks_dir: Path
    report_dir: Path
    class_names: tuple[str, ...]
    read: ReadOptions = ReadOptions()
    qa: str = "warn"
    raw_masks: bool = False
    dicom: DicomOutputs | None = None

    def run_model(self, predictor: Predictor, images: torch.Tensor,
                  native_sizes: Sequence[tuple[int, int]] | None = None) -> BatchPrediction:
        return predictor.predict(images, native_sizes)

    def failed(self, file: InputFile, reason: str) -> dict[str, Any]:
        return new_row(REPORT_COLUMNS, file, status=Status.ERROR, error=reason)

    def finish(self, file: InputFile, case: Case, pred: BatchPrediction, k: int) -> dict[str, Any]:
        """The case's row (:func:`mmcli.outcome.case_outcome`), its mask file and DICOM objects."""
        assert case.facts is not None
        outcome = case_outcome(pred, k, case.facts, threshold=self.threshold, class_names=self.class_names,
                               qa=self.qa, raw_masks=self.raw_masks)
        row = new_row(REPORT_COLUMNS, file, **outcome.cells)
        if outcome.mask is not None:
            mask_path = self.masks_dir / f"{file.case_id}.png"
            write_mask_png(mask_path, outcome.mask)
            row["mask"] = os.path.relpath(mask_path, self.report_dir)
        if self.dicom is not None and case.facts.format == "dicom" and row["status"] == Status.OK:
            row.update(self.dicom.write(file, row, outcome.sides, self.report_dir, case.pixels))
        return row


@dataclass(frozen=True)
class DicomOutputs:
    """``--dicom-seg`` / ``--dicom-sr`` / ``--dicom-sc``: DICOM objects of each DICOM input, in ``<folder>/dicom/``."""

    folder: Path
    seg: bool
    sr: bool
    weights_name: str
    weights_sha256: str
    labels: tuple[str, ...] = ("normal", "pneumonia")  # the findings a report can state
    sc: bool = False

    def write(self, file: InputFile, row: dict[str, Any], sides: np.ndarray | None, report_dir: Path,
              pixels: np.ndarray | None = None) -> dict[str, str]:
        """Write the objects of one case; returns the report cells: their paths relative to
        ``report_dir``, and ``dicom_error`` for each one that could not be written (then the SR,
        if asked for, is still written, without a reference to the SEG). Never raises.

        Args:
            sides: (H, W) uint8 lung label map (:func:`mmcli.qa.mask.lung_sides`) at native size, or None.
            pixels: (H, W) float film in [0, 1] (the reader's), for the secondary capture.
        """
        from mmcli import __version__
        from mmcli.io.dicom_out import AlgorithmInfo, write_dicom_seg, write_dicom_sr  # highdicom: only when asked

        algorithm = AlgorithmInfo(version=__version__, weights_name=self.weights_name,
                                  weights_sha256=self.weights_sha256)
        out: dict[str, str] = {}
        errors: list[str] = []
        flags = [f for f in (row.get("qa_flags") or "").split(";") if f]
        seg = None
        if self.seg and sides is not None:
            seg = _written(errors, "DICOM SEG", lambda: write_dicom_seg(
                file.path, sides, self.folder / f"{file.case_id}.seg.dcm", algorithm=algorithm))
            if seg is not None:
                out["dicom_seg"] = os.path.relpath(seg, report_dir)
        if self.sr:
            sr = _written(errors, "DICOM SR", lambda: write_dicom_sr(
                file.path, self.folder / f"{file.case_id}.sr.dcm", p_pneumonia=row["p_pneumonia"],
                label=row["label"] if row["label"] in self.labels else None,  # not "uncertain"
                lung_area_mm2=row["lung_area_mm2"], qa_flags=flags, algorithm=algorithm, seg=seg,
                side_areas_mm2=(row["right_lung_area_mm2"], row["left_lung_area_mm2"])))
            if sr is not None:
                out["dicom_sr"] = os.path.relpath(sr, report_dir)
        if self.sc:
            from mmcli.io.dicom_sc import write_dicom_sc

            sc = _written(errors, "DICOM SC", lambda: write_dicom_sc(
                file.path, pixels, sides, self.folder / f"{file.case_id}.sc.dcm", p_pneumonia=row["p_pneumonia"],
                label=row["label"], qa_flags=flags, algorithm=algorithm))
            if sc is not None:
                out["dicom_sc"] = os.path.relpath(sc, report_dir)
        if errors:
            out["dicom_error"] = "; ".join(errors)
        return out


def _written(errors: list[str], what: str, write: Callable[[], Path]) -> Path | None:
    """``write()``'s path, or None with the reason added to ``errors``: the reasons :mod:`mmcli.io.dicom_out`
    gives quote no header value, and an unexpected error is named by its type alone (its text might)."""
    try:
        return write()
    except CaseError as err:
        errors.append(f"{what} not written: {err.reason}")
    except Exception as err:  # noqa: BLE001 - a DICOM output never costs the case its prediction
        errors.append(f"{what} not written: unexpected {type(err).__name__}")
    return None


def _write_reports(cfg: PredictConfig, layout: RunLayout, rows: list[dict[str, Any]], attrs: dict[str, Any],
                   ) -> list[Path]:
    def load_mask(row: Mapping[str, Any]) -> np.ndarray | None:
        mask = row.get("mask")
        return read_mask_png(layout.report.parent / mask) if mask else None

    targets = [layout.report] + ([cfg.hdf5.expanduser().resolve()] if cfg.hdf5 is not None else [])
    for target in targets:
        if is_hdf5(target):
            write_hdf5(target, rows, REPORT_COLUMNS, masks=load_mask, attrs=attrs)
        else:
            write_csv(target, rows, REPORT_COLUMNS)
    return targets


def open_predict(cfg: PredictConfig, *, command: Sequence[str] | None = None) -> BatchRun:
    """Discover the inputs, load the model and get the run ready: iterate over it to predict.

    Raises:
        UsageError: no inputs, no weights, another run writing the same report, or an
            earlier run into it with other settings (without ``overwrite``).
    """
    return open_batch(cfg, RunLayout.for_report, lambda layout, predictor: _job(cfg, layout, predictor), command)


def _job(cfg: PredictConfig, layout: RunLayout, predictor: Predictor) -> Job:
    ckpt = predictor.checkpoint
    dicom = None
    if cfg.dicom_seg or cfg.dicom_sr or cfg.dicom_sc:
        dicom = DicomOutputs(layout.folder / "dicom", cfg.dicom_seg, cfg.dicom_sr, weights_name(ckpt),
                             ckpt.sha256 or "", sc=cfg.dicom_sc)
    task = PredictCase(cfg.threshold, layout.folder / "masks", layout.report.parent, tuple(ckpt.class_names),
                       read=cfg.read_options(keep_pixels=cfg.dicom_sc), qa=cfg.qa, raw_masks=cfg.raw_masks,
                       dicom=dicom)
    return Job(
        name="predict", layout=layout, columns=REPORT_COLUMNS, task=task,
        header=resume_header(cfg, predictor, dicom_seg=cfg.dicom_seg, dicom_sr=cfg.dicom_sr,
                             **({"dicom_sc": True} if cfg.dicom_sc else {})),  # runs from before it still resume
        settings=asdict(cfg),  # write_json turns paths into strings
        still_done=lambda row: all((layout.report.parent / str(row[c])).is_file()
                                   for c in FILE_COLUMNS if row.get(c)),
        write_reports=lambda rows: _write_reports(cfg, layout, rows, provenance(ckpt)),
        file_columns=FILE_COLUMNS, extra_reports=(cfg.hdf5.expanduser().resolve(),) if cfg.hdf5 else (),
        relabel=lambda row, file: relabel(task, row, file),
    )


def relabel(task: PredictCase, row: dict[str, Any], file: InputFile) -> dict[str, Any]:
    """A finished row under ``task``'s threshold, from its stored probability (a rerun whose only
    change is ``--threshold``): ``uncertain`` stays. The DICOM objects of a case whose label changed
    (the SR's coded finding and the SC's caption state it) are written again as a fresh run would
    write them, from the stored mask and the film read again; one that cannot be is removed, and
    ``dicom_error`` says why."""
    if row.get("status") != Status.OK or row.get("p_pneumonia") is None or row.get("label") not in task.class_names:
        return row
    label = label_for(float(row["p_pneumonia"]), task.threshold, task.class_names)
    if label == row["label"]:
        return row
    row = {**row, "label": label}
    old = {c: row[c] for c in FILE_COLUMNS[1:] if row.get(c)}
    if task.dicom is None or not old:
        return row
    from mmcli.io.readers import read_radiograph
    from mmcli.qa.mask import lung_sides

    sides = lung_sides(read_mask_png(task.report_dir / str(row["mask"]))) if row.get("mask") else None
    pixels = read_radiograph(file.path, voi_lut=task.read.voi_lut, max_pixels=task.read.max_pixels).pixels \
        if task.dicom.sc else None
    row.update({c: None for c in old}, dicom_error=None)
    row.update(task.dicom.write(file, row, sides, task.report_dir, pixels))
    for column, path in old.items():
        if not row.get(column):  # an object that states the old finding must not stay
            (task.report_dir / str(path)).unlink(missing_ok=True)
    return row


def run_predict(
    cfg: PredictConfig,
    *,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    command: Sequence[str] | None = None,
) -> RunSummary:
    """Predict every input of ``cfg`` and write the reports (:func:`open_predict`, run to the end).

    Args:
        on_case: called with each finished row (status ok or error).
        command: the command line, recorded in ``run.json``.
    """
    return open_predict(cfg, command=command).run(on_case)
