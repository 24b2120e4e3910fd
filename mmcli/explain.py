"""``mmcli explain``: where the model looked, through the same bridge code as the model.

Two views per radiograph:

* **saliency**: the bridge's map, ``MultiMixOutput.saliency`` of the model's own forward
  pass: the exact tensor the decoder receives (|d max logit / d input|, see
  :meth:`mmcli.models.multimix.MultiMix.saliency`), not a re-implementation;
* **Grad-CAM** (Selvaraju et al. 2017) on the last encoder stage (the bottleneck) for the
  predicted class (the largest logit, as the bridge): ReLU of the feature maps weighted
  by their spatially averaged gradients, upsampled bilinearly to the model grid and
  divided by its maximum.

Outputs in ``<out>/``::

    explain.csv               one row per input (EXPLAIN_COLUMNS)
    saliency/<case>.png       heat-map overlay on the radiograph at native resolution
    gradcam/<case>.png        the same for Grad-CAM
    maps.h5                   /saliency/<case>, /gradcam/<case>: (S, S) float32 on the model grid
    run.json, journal.jsonl   settings and counts; finished cases, to resume a killed run

``saliency_in_lungs`` is the share of the map's mass inside the predicted lung mask (model
grid); compare it with ``lung_fraction``, the share a uniform map would get.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmcli import __version__
from mmcli.data.datasets import RadiographDataset, collate_cases, worker_init
from mmcli.errors import UsageError
from mmcli.inference import Predictor
from mmcli.io.discover import InputFile, discover_inputs
from mmcli.io.writers import Journal, atomic_path, write_csv, write_json
from mmcli.pipeline import record_rows
from mmcli.weights import load_weights

logger = logging.getLogger(__name__)

EXPLAIN_COLUMNS: tuple[str, ...] = (
    "case_id", "source", "status", "error", "p_pneumonia", "label", "saliency_in_lungs", "gradcam_in_lungs",
    "lung_fraction", "height", "width", "saliency_png", "gradcam_png",
)
VIEWS = ("saliency", "gradcam")
_EPS = 1e-12


@dataclass(frozen=True)
class ExplainConfig:
    """Resolved settings of one ``explain`` run (written to ``run.json``)."""

    inputs: tuple[str, ...]
    out: Path
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 4
    workers: int = 0
    threshold: float = 0.5
    voi_lut: bool = False
    overwrite: bool = False
    fail_fast: bool = False
    alpha: float = 0.6

    def __post_init__(self) -> None:
        if self.out.suffix.lower() in (".csv", ".h5", ".hdf5", ".png"):
            raise UsageError(f"--out is a folder for the explanations, got a file name {self.out.name!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise UsageError("--batch-size must be at least 1 and --workers 0 or more")
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise UsageError("--threshold and --alpha must lie in [0, 1]")


class Explanation(NamedTuple):
    """Explanations of a batch of B images on the model grid S x S, on the CPU.

    probabilities: (B, C). saliency: (B, 1, S, S) the bridge's map. gradcam: (B, 1, S, S)
    in [0, 1]. lungs: (B, 1, S, S) bool, the predicted lung mask.
    """

    probabilities: Tensor
    saliency: Tensor
    gradcam: Tensor
    lungs: Tensor


def explain_batch(model: nn.Module, images: Tensor, temperature: float = 1.0) -> Explanation:
    """Run ``model`` once on ``images`` (B, 1, S, S) and return both maps.

    The saliency is the forward pass's own ``saliency`` output; Grad-CAM takes the gradient
    of the largest logit to the bottleneck captured on that same pass.
    """
    if not getattr(model, "bridge", False):
        raise UsageError(f"explain needs a model with the saliency bridge, got {type(model).__name__} without one")
    captured: list[Tensor] = []
    hook = model.encoder[-1].register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with torch.enable_grad():
            out = model(images)
            features = captured[-1]  # (B, w4, S/16, S/16), still in the graph
            target = out.cls_logits.max(dim=1).values.sum()
            (grad,) = torch.autograd.grad(target, features)
    finally:
        hook.remove()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(_EPS)
    probs = torch.softmax(out.cls_logits.detach().float() / temperature, dim=1)
    lungs = out.seg_logits.detach() >= 0
    return Explanation(probs.cpu(), out.saliency.float().cpu(), cam.float().cpu(), lungs.cpu())


def mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the non-negative map ``heat`` (H, W) inside ``mask`` (H, W); NaN for an all-zero map."""
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else float("nan")


@dataclass(frozen=True)
class _Layout:
    folder: Path

    def png(self, view: str, case_id: str) -> Path:
        return self.folder / view / f"{case_id}.png"

    def partial(self, case_id: str) -> Path:
        return self.folder / ".partial" / f"{case_id}.npz"

    report = property(lambda self: self.folder / "explain.csv")
    maps = property(lambda self: self.folder / "maps.h5")
    journal = property(lambda self: self.folder / "journal.jsonl")


def _new_row(file: InputFile, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(EXPLAIN_COLUMNS)
    row.update(case_id=file.case_id, source=str(file.path), **values)
    return row


def _finish_case(
    file: InputFile, pixels: np.ndarray, ex: Explanation, k: int, cfg: ExplainConfig, layout: _Layout,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Row, overlays on the native ``(H, W)`` pixels and the raw maps of case ``k`` of a batch."""
    maps = {"saliency": ex.saliency[k, 0].numpy(), "gradcam": ex.gradcam[k, 0].numpy()}
    lungs = ex.lungs[k, 0].numpy()
    p = float(ex.probabilities[k, -1])
    height, width = pixels.shape
    row = _new_row(file, status="ok", p_pneumonia=round(p, 6), height=height, width=width,
                   label=class_names[-1] if p >= cfg.threshold else class_names[0],
                   lung_fraction=round(float(lungs.mean()), 6))
    from mmcli.plots import heatmap_overlay

    for view, heat in maps.items():
        row[f"{view}_in_lungs"] = round(mass_inside(heat, lungs), 6)
        native = F.interpolate(torch.from_numpy(heat)[None, None], size=(height, width),
                               mode="bilinear", align_corners=False)[0, 0].clamp_min(0).numpy()
        path = layout.png(view, file.case_id)
        with atomic_path(path) as tmp:
            Image.fromarray(heatmap_overlay(pixels, native, alpha=cfg.alpha)).save(tmp, format="PNG")
        row[f"{view}_png"] = os.path.relpath(path, layout.folder)
    with atomic_path(layout.partial(file.case_id)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **maps)
    return row


def _iter_rows(predictor: Predictor, files: list[InputFile], cfg: ExplainConfig, layout: _Layout):  # noqa: ANN202
    loader = DataLoader(
        RadiographDataset(files, predictor.preprocess, voi_lut=cfg.voi_lut, keep_pixels=True),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers, collate_fn=collate_cases, worker_init_fn=worker_init if cfg.workers else None,
    )
    names = predictor.checkpoint.class_names
    for batch in loader:
        ex = None
        if batch["images"] is not None:
            ex = explain_batch(predictor.model, batch["images"].to(predictor.device), predictor.temperature)
        for pos, item in enumerate(batch["items"]):
            file = files[item["index"]]
            if item["error"] is not None:
                yield _new_row(file, status="error", error=item["error"])
                continue
            try:
                yield _finish_case(  # type: ignore[arg-type]
                    file, item["pixels"], ex, batch["ok"].index(pos), cfg, layout, names
                )
            except Exception as err:  # one case fails alone
                logger.debug("explaining %s failed", file.path, exc_info=True)
                yield _new_row(file, status="error", error=f"{type(err).__name__}: {err}")


def _old_map_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    import h5py

    ids: set[str] = set()
    with h5py.File(path, "r") as h5:
        if "saliency" in h5:
            h5["saliency"].visititems(lambda name, obj: ids.add(name) if hasattr(obj, "shape") else None)
    return ids


def _write_maps(layout: _Layout, rows: list[dict[str, Any]], attrs: dict[str, Any]) -> None:
    """Gather the raw maps of every finished case (new ones and resumed ones) into ``maps.h5``."""
    import h5py

    old = h5py.File(layout.maps, "r") if layout.maps.is_file() else None
    try:
        with atomic_path(layout.maps) as tmp, h5py.File(tmp, "w") as h5:
            h5.attrs.update({k: str(v) for k, v in attrs.items()})
            for row in rows:
                if row["status"] != "ok":
                    continue
                case_id, partial = row["case_id"], layout.partial(row["case_id"])
                for view in VIEWS:
                    if partial.is_file():
                        with np.load(partial) as npz:
                            data = npz[view]
                    else:
                        data = old[f"{view}/{case_id}"][()]  # type: ignore[index]
                    h5.create_dataset(f"{view}/{case_id}", data=data, compression="gzip", shuffle=True)
    finally:
        if old is not None:
            old.close()
    shutil.rmtree(layout.folder / ".partial", ignore_errors=True)  # every map is in maps.h5 now


def run_explain(
    cfg: ExplainConfig,
    *,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    command: Sequence[str] | None = None,
) -> dict[str, int]:
    """Explain every input of ``cfg``; returns the counts (``failed > 0`` means exit code 1)."""
    started = time.perf_counter()
    layout = _Layout(cfg.out.expanduser().resolve())
    files = discover_inputs(cfg.inputs, exclude=[layout.folder])
    ckpt = load_weights(cfg.weights)
    predictor = Predictor(ckpt, device=cfg.device, precision="fp32")  # gradients in bf16 are too coarse
    if not getattr(predictor.model, "bridge", False):
        raise UsageError(f"explain needs a model with the saliency bridge; {ckpt.model_name} "
                         f"({ckpt.path}) has none: use weights of a multimix or umtls model")
    header = {"weights_sha256": ckpt.sha256, "threshold": cfg.threshold, "voi_lut": cfg.voi_lut, "alpha": cfg.alpha}
    journal = Journal(layout.journal)
    old_header, old_rows = ({}, {}) if cfg.overwrite else journal.read()
    if old_rows and old_header != header:
        raise UsageError(f"{layout.folder} was made with other settings ({old_header}); "
                         "pass --overwrite to start again, or choose another --out")
    have_maps = _old_map_ids(layout.maps) if old_rows else set()
    done = {
        f.case_id: old_rows[f.case_id] for f in files
        if f.case_id in old_rows and old_rows[f.case_id]["status"] == "ok"
        and all(layout.png(v, f.case_id).is_file() for v in VIEWS)
        and (f.case_id in have_maps or layout.partial(f.case_id).is_file())
    }
    todo = [f for f in files if f.case_id not in done]
    logger.info("%d inputs: %d to explain, %d already done", len(files), len(todo), len(done))
    rows: dict[str, dict[str, Any]] = dict(done)
    journal.start(header, done.values())
    record_rows(_iter_rows(predictor, todo, cfg, layout), journal, rows, on_case=on_case, fail_fast=cfg.fail_fast)
    ordered = [rows.get(f.case_id) or _new_row(f, status="skipped", error="not processed: --fail-fast") for f in files]
    provenance = {"mmcli_version": __version__, "weights": str(ckpt.path), "weights_sha256": ckpt.sha256,
                  "model": ckpt.model_name, "image_size": ckpt.preprocess.image_size}
    write_csv(layout.report, ordered, EXPLAIN_COLUMNS)
    _write_maps(layout, ordered, provenance)
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "error", "skipped")}
    counts = {"total": len(files), "ok": counts["ok"], "failed": counts["error"], "skipped": counts["skipped"],
              "resumed": len(done)}
    write_json(layout.folder / "run.json", {
        "command": list(command) if command is not None else None,
        "settings": asdict(cfg),  # write_json turns paths into strings
        "provenance": provenance, "device": str(predictor.device), "counts": counts,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return counts
