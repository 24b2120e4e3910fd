"""``mmcli train``: semi-supervised MultiMix training and the paper's ablation variants."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmcli.cli.common import DeviceOpt, PrecisionOpt, console, exit_on_error
from mmcli.errors import UsageError
from mmcli.training import VARIANTS, TrainConfig, run_train

logger = logging.getLogger("mmcli.cli")


def _budget(value: str, flag: str) -> int | None:
    if value.lower() == "all":
        return None
    if not value.isdigit():
        raise UsageError(f"{flag} takes a number or 'all', got {value!r}")
    return int(value)


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, history, splits, run.json).")],
    seg_data: Annotated[list[Path] | None, typer.Option(
        "--seg-data", help="Folder of images with masks/<stem>.png (repeatable).")] = None,
    cls_data: Annotated[list[Path] | None, typer.Option(
        "--cls-data", help="Folder of images with labels.csv (file,label) (repeatable).")] = None,
    variant: Annotated[str, typer.Option("--variant", help=f"{'|'.join(VARIANTS)} (the paper's ablations).")] = (
        "multimix"),
    seg_labels: Annotated[str, typer.Option(
        "--seg-labels", help="Masks to keep: N or all; the rest is unlabelled.")] = "all",
    cls_labels: Annotated[str, typer.Option(
        "--cls-labels", help="Class labels to keep (stratified): N or all; the rest is unlabelled.")] = "all",
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.95, help="Validation share.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seeds splits, initialisation, sampling, augmentation.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per stream per step.")] = 10,
    steps_per_epoch: Annotated[int | None, typer.Option(
        "--steps-per-epoch", min=1, help="Steps per epoch. Default: one pass over the largest labelled pool.")] = None,
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="Model input size (multiple of 16).")] = 256,
    arch: Annotated[str, typer.Option("--arch", help="base (paper widths) or tiny (widths 4..64, smoke tests).")] = (
        "base"),
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-4,
    lr_step: Annotated[int, typer.Option("--lr-step", min=1, help="Epochs between lr x0.1 steps.")] = 8,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Pseudo-label confidence.")] = 0.7,
    lambda_u: Annotated[float, typer.Option("--lambda-u", min=0.0, help="Weight of the pseudo-label loss.")] = 0.25,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, help="Weight of the Dice loss.")] = 5.0,
    beta: Annotated[float, typer.Option("--beta", min=0.0, help="Weight of the foreground-KL consistency.")] = 0.01,
    hflip: Annotated[bool, typer.Option(
        "--hflip/--no-hflip", help="Random horizontal flips (they swap laterality: off by default).")] = False,
    patience: Annotated[int | None, typer.Option(
        "--patience", min=0, help="Stop after N epochs without a better score; 0: never.")] = 10,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Fit a temperature on the validation split.")] = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: Annotated[int, typer.Option(
        "--workers", "-j", min=0, envvar="MMCLI_WORKERS", help="Processes that decode images; 0: main process.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Train MultiMix (or an ablation) semi-supervised from few labels.

    Writes best.safetensors and last.safetensors (loadable by `mmcli predict --weights`),
    state.pt (for --resume), history.csv, splits.csv and run.json into --out.
    """
    with exit_on_error():
        cfg = TrainConfig(
            out=str(out), seg_data=tuple(map(str, seg_data or ())), cls_data=tuple(map(str, cls_data or ())),
            variant=variant, arch=arch, seg_labels=_budget(seg_labels, "--seg-labels"),  # type: ignore[arg-type]
            cls_labels=_budget(cls_labels, "--cls-labels"), val_fraction=val_fraction, seed=seed, epochs=epochs,
            batch_size=batch_size, steps_per_epoch=steps_per_epoch, image_size=image_size, lr=lr, lr_step=lr_step,
            threshold=threshold, lambda_u=lambda_u, alpha=alpha, beta=beta, hflip=hflip,
            patience=patience or None, calibrate=calibrate, device=device, precision=precision, workers=workers,
            resume=resume,
        )
        progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"), TimeElapsedColumn(),
            console=console, disable=quiet or not console.is_terminal,
        )
        task: dict[str, Any] = {}

        def on_start(trainer: Any) -> None:
            task["id"] = progress.add_task("train", total=trainer.steps, epoch=trainer.epoch + 1, loss="-", val="")

        def on_step(step: int, steps: int, stats: dict[str, float]) -> None:
            progress.update(task["id"], completed=step, loss=f"{stats['loss']:.4f}")

        def on_epoch(row: dict[str, Any]) -> None:
            val = " ".join(f"{k} {_fmt(row[k])}" for k in ("val_dice", "val_auc", "val_acc") if k in row)
            if not quiet:
                progress.console.print(f"epoch {row['epoch']}: loss {_fmt(row['loss'])} {val} score "
                                       f"{_fmt(row['score'])}", highlight=False)
            progress.reset(task["id"], epoch=row["epoch"] + 1, val=val)

        with progress:
            summary = run_train(cfg, on_start=on_start, on_step=on_step, on_epoch=on_epoch, command=sys.argv)
    if not quiet and summary.is_main:
        calib = ""
        if summary.ece_before is not None:
            calib = (f"; temperature {summary.temperature:.3f}, ECE {summary.ece_before:.4f} -> "
                     f"{summary.ece_after:.4f}")
        stop = " (stopped early)" if summary.stopped_early else ""
        console.print(
            f"{summary.epochs_run} epoch(s){stop}; best epoch {summary.best_epoch} score "
            f"{_fmt(summary.best_score)}{calib} -> {summary.out / 'best.safetensors'}",
            highlight=False,
        )
