"""What one ``explain`` case produces, through the run skeleton of :mod:`mmcli.batch` and the Predictor.

Two views per radiograph:

* **saliency**: the bridge's map, ``MultiMixOutput.saliency`` of the model's own forward
  pass: the exact tensor the decoder receives (|d max logit / d input|, see
  :meth:`mmcli.models.multimix.MultiMix.saliency`), not a re-implementation. Raw, it is
  pixel-sized speckle over a diffuse floor; the picture shows it smoothed and above its
  floor (:func:`readable_saliency`), ``maps.h5`` keeps it raw;
* **Grad-CAM** (Selvaraju et al. 2017) on the last encoder stage (the bottleneck) for the
  pneumonia class (``target``: or normal, or the predicted class), from the same forward
  pass (:meth:`mmcli.inference.Predictor.explain`), each feature map credited only with what
  it adds over a uniform image both with and without the zero padding's effect, so that the
  padding leaves no bright bands along the edges for either class.

Each picture stands alone: the film at native resolution (at most 1024 px on a side) with
the map over it, the predicted lung outline, a title (case, probability, label, the class
the map explains) and a colour bar.

Outputs in ``<out>/``::

    explain.csv               one row per input (EXPLAIN_COLUMNS)
    saliency/<case>.png       titled heat-map overlay on the radiograph, lung outline, colour bar
    gradcam/<case>.png        the same for Grad-CAM
    maps.h5                   /saliency/<key> (raw), /gradcam/<key>: (S, S) float32 on the model grid; <key>
                              is the case id percent-encoded (``hdf5_key``: ``sub%2Fb``), flat, so
                              ``a`` and ``a/b`` never clash, with the case id in its ``case_id`` attribute
    run.json, journal.jsonl   settings and counts; finished cases, to resume a killed run

``saliency_in_lungs`` is the share of the raw map's mass inside the predicted lung mask (model
grid); compare it with ``lung_fraction``, the share a uniform map would get.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from mmcli import batch
from mmcli.config import BatchConfig, ReadOptions
from mmcli.data.datasets import Case
from mmcli.errors import UsageError
from mmcli.inference import BatchPrediction, Predictor
from mmcli.io.discover import InputFile
from mmcli.io.runfolder import REPORT_FORMATS
from mmcli.io.writers import atomic_path, hdf5_key, write_csv
from mmcli.outcome import label_for
from mmcli.qa.mask import lung_mask
from mmcli.qa.policy import apply_policy, case_flags
from mmcli.status import Status

logger = logging.getLogger(__name__)

__all__ = ["EXPLAIN_COLUMNS", "ExplainCase", "ExplainConfig", "Target", "mass_inside", "open_explain",
           "readable_saliency"]

EXPLAIN_COLUMNS: tuple[str, ...] = (
    "case_id", "source", "status", "error", "p_pneumonia", "label", "qa_flags", "saliency_in_lungs", "gradcam_in_lungs",
    "lung_fraction", "height", "width", "saliency_png", "gradcam_png",
)
VIEWS = ("saliency", "gradcam")
Target = Literal["pneumonia", "normal", "predicted"]
TARGETS: tuple[str, ...] = get_args(Target)
SMOOTH_SIGMA = 1 / 64  # of the model grid's side: 4 px at 256, about the size of a rib's edge
DISPLAY_MAX = 1024  # px on the long side of a picture


@dataclass(frozen=True, kw_only=True)
class ExplainConfig(BatchConfig):
    """Resolved settings of one ``explain`` run (written to ``run.json``); ``out`` is a folder."""

    alpha: float = 0.6
    target: Target = "pneumonia"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.out.suffix.lower() in (*REPORT_FORMATS, ".png"):
            raise UsageError(f"--out is a folder for the explanations, got a file name {self.out.name!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--overlay-opacity must lie in [0, 1], got {self.alpha}")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")


def mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the non-negative map ``heat`` (H, W) inside ``mask`` (H, W); NaN for an all-zero map."""
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else float("nan")


def readable_saliency(saliency: torch.Tensor, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """The saliency as a person can read it: ``(B, 1, S, S)`` -> ``(B, 1, S, S)``, non-negative.

    A vanilla gradient is pixel-sized speckle over a diffuse floor that covers the whole
    film. Smoothing with a Gaussian of ``sigma * S`` px turns the speckle into regions, and
    subtracting each map's median (the floor) leaves what stands out; the picture then
    scales it by its 99th percentile (:func:`mmcli.plots.heatmap_overlay`).
    """
    radius = max(1, round(3 * sigma * saliency.shape[-1]))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / (sigma * saliency.shape[-1])) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(saliency.float(), (radius,) * 4, mode="reflect")
    x = F.conv2d(F.conv2d(x, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    floor = x.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    return (x - floor).clamp_min(0)


def _display_size(height: int, width: int) -> tuple[int, int]:
    """The picture's size: native, shrunk to DISPLAY_MAX px on the long side (or grown to half that)."""
    scale = min(DISPLAY_MAX, max(DISPLAY_MAX // 2, height, width)) / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(a: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) != size:
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return t[0, 0].numpy()


@dataclass(frozen=True)
class ExplainCase:
    """One explain case: a row, overlays at native resolution and the raw maps (``.partial/<case>.npz``)."""

    folder: Path
    threshold: float
    class_names: tuple[str, ...]
    alpha: float = 0.6
    read: ReadOptions = ReadOptions(keep_pixels=True)  # overlays are drawn on the pixels the model saw
    qa: str = "warn"
    raw_masks: bool = False
    target: Target = "pneumonia"

    def target_index(self) -> int | None:
        """The class index Grad-CAM explains (None: the predicted class of each image)."""
        if self.target == "predicted":
            return None
        if self.target not in self.class_names:
            raise UsageError(f"--target {self.target}: the model's classes are {', '.join(self.class_names)}")
        return self.class_names.index(self.target)

    def png(self, view: str, case_id: str) -> Path:
        return self.folder / view / f"{case_id}.png"

    def partial(self, case_id: str) -> Path:
        return self.folder / ".partial" / f"{case_id}.npz"

    def run_model(self, predictor: Predictor, images: torch.Tensor,
                  native_sizes: Sequence[tuple[int, int]] | None = None) -> BatchPrediction:
        # its maps stay on the model grid: native sizes are not needed
        return predictor.explain(images, self.target_index())

    def failed(self, file: InputFile, reason: str) -> dict[str, Any]:
        return batch.new_row(EXPLAIN_COLUMNS, file, status=Status.ERROR, error=reason)

    def finish(self, file: InputFile, case: Case, pred: BatchPrediction, k: int) -> dict[str, Any]:
        assert pred.saliency is not None and pred.gradcam is not None and pred.probabilities is not None
        maps = {"saliency": pred.saliency[k, 0].numpy(), "gradcam": pred.gradcam[k, 0].numpy()}
        lungs = lung_mask(pred.mask_logits[k, 0].numpy() >= 0, self.raw_masks)  # type: ignore[index]
        pixels, facts = case.pixels, case.facts
        assert pixels is not None and facts is not None
        p = float(pred.probabilities[k, -1])
        height, width = pixels.shape
        native = lung_mask(pred.mask_at(k, height, width), self.raw_masks)
        row = batch.new_row(EXPLAIN_COLUMNS, file, status=Status.OK, p_pneumonia=round(p, 6), height=height,
                            width=width, label=label_for(p, self.threshold, self.class_names),
                            lung_fraction=round(float(native.mean()), 6))
        for view, heat in maps.items():
            row[f"{view}_in_lungs"] = round(mass_inside(heat, lungs), 6)
        # the mask is judged as predict judges it: at native size, with the pixel spacing
        apply_policy(row, case_flags(facts, native, pred, k, self.qa), self.qa)
        shown = {"saliency": readable_saliency(pred.saliency[k : k + 1])[0, 0].numpy(), "gradcam": maps["gradcam"]}
        explained = self.class_names[int(pred.probabilities[k].argmax())] if self.target == "predicted" \
            else self.target
        size = _display_size(height, width)
        film = np.clip(_resize(pixels, size), 0, 1)
        for view in VIEWS:
            row[f"{view}_png"] = os.path.relpath(self._picture(view, row, film, _resize(shown[view], size), lungs,
                                                               explained), self.folder)
        with atomic_path(self.partial(file.case_id)) as tmp, open(tmp, "wb") as f:
            np.savez(f, saliency=maps["saliency"], gradcam=maps["gradcam"])
        return row

    def _picture(self, view: str, row: Mapping[str, Any], film: np.ndarray, heat: np.ndarray, lungs: np.ndarray,
                 explained: str) -> Path:
        """Write ``<view>/<case>.png``: the map over the film, the lung outline, a title and a colour bar."""
        from mmcli.plots import explain_figure

        label = row["label"] or "no label"
        flags = f"  QA: {row['qa_flags'].replace(';', ', ')}" if row.get("qa_flags") else ""
        what = f"Grad-CAM for {explained}" if view == "gradcam" else \
            "saliency |d logit / d pixel| of the predicted class, smoothed"
        title = f"{row['case_id']}\np(pneumonia) = {row['p_pneumonia']:.3f}, label {label}{flags}\n{what}"
        scale = "Grad-CAM, relative" if view == "gradcam" else "saliency above its median, relative"
        return explain_figure(self.png(view, str(row["case_id"])), film, heat, lungs, title=title,
                              scale_label=f"{scale} (1 = 99th percentile)", alpha=self.alpha)

def _old_map_ids(path: Path) -> set[str]:
    """The case ids whose maps an earlier run left in ``maps.h5`` (flat keys with a ``case_id``
    attribute; the nested layout of earlier versions is not read: those cases are explained again)."""
    if not path.is_file():
        return set()
    import h5py

    def ids_in(group: Any) -> set[str]:
        return {str(d.attrs["case_id"]) for key, d in group.items() if isinstance(d, h5py.Dataset)
                and "case_id" in d.attrs and key == hdf5_key(str(d.attrs["case_id"]))}

    try:
        with h5py.File(path, "r") as h5:
            return set.intersection(*(ids_in(h5[view]) if view in h5 else set() for view in VIEWS))
    except OSError:
        return set()


def _write_maps(task: ExplainCase, maps: Path, rows: list[dict[str, Any]], attrs: dict[str, Any]) -> None:
    """Gather the raw maps of every finished case (new ones and resumed ones) into ``maps.h5``."""
    import h5py

    old = h5py.File(maps, "r") if maps.is_file() else None
    try:
        with atomic_path(maps) as tmp, h5py.File(tmp, "w") as h5:
            h5.attrs.update({k: str(v) for k, v in attrs.items()})
            for row in rows:
                if row["status"] != Status.OK:
                    continue
                case_id, partial = row["case_id"], task.partial(row["case_id"])
                for view in VIEWS:
                    if partial.is_file():
                        with np.load(partial) as npz:
                            data = npz[view]
                    else:
                        data = old[view][hdf5_key(case_id)][()]  # type: ignore[index]
                    dataset = h5.require_group(view).create_dataset(hdf5_key(case_id), data=data, compression="gzip",
                                                                    shuffle=True)
                    dataset.attrs["case_id"] = case_id
    finally:
        if old is not None:
            old.close()
    shutil.rmtree(task.folder / ".partial", ignore_errors=True)  # every map is in maps.h5 now


def _write_reports(task: ExplainCase, layout: batch.RunLayout, rows: list[dict[str, Any]], attrs: dict[str, Any],
                   ) -> list[Path]:
    write_csv(layout.report, rows, EXPLAIN_COLUMNS)
    maps = layout.folder / "maps.h5"
    _write_maps(task, maps, rows, attrs)
    return [layout.report, maps]


def open_explain(cfg: ExplainConfig, *, command: Sequence[str] | None = None) -> batch.BatchRun:
    """Discover the inputs, load the model and get the run ready: iterate over it to explain.

    Raises:
        UsageError: no inputs, no weights, a model without the saliency bridge, another run
            writing the same folder, or an earlier run there with other settings.
    """
    return batch.open_batch(cfg, lambda out: batch.RunLayout.in_folder(out, "explain.csv"),
                            lambda layout, predictor: _job(cfg, layout, predictor), command)


def _job(cfg: ExplainConfig, layout: batch.RunLayout, predictor: Predictor) -> batch.Job:
    ckpt = predictor.checkpoint
    predictor.require_bridge()
    task = ExplainCase(layout.folder, cfg.threshold, tuple(ckpt.class_names), cfg.alpha,
                       read=cfg.read_options(keep_pixels=True), qa=cfg.qa, raw_masks=cfg.raw_masks, target=cfg.target)
    task.target_index()  # a target the model has no class for is refused before any work
    have_maps = _old_map_ids(layout.folder / "maps.h5") if not cfg.overwrite else set()

    def still_done(row: Mapping[str, Any]) -> bool:
        case_id = str(row["case_id"])
        return all(task.png(v, case_id).is_file() for v in VIEWS) and (
            case_id in have_maps or task.partial(case_id).is_file())

    return batch.Job(
        name="explain", layout=layout, columns=EXPLAIN_COLUMNS, task=task,
        header=batch.resume_header(cfg, predictor, alpha=cfg.alpha, target=cfg.target),
        settings=asdict(cfg), still_done=still_done,
        write_reports=lambda rows: _write_reports(task, layout, rows, batch.provenance(ckpt)),
        file_columns=("saliency_png", "gradcam_png"),
    )

