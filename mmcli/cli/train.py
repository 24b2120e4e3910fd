"""``mmcli train``: semi-supervised MultiMix training and the paper's ablation variants."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mmcli.cli.common import (
    DeviceOpt,
    QuietOpt,
    TrainPrecisionOpt,
    VoiLutOpt,
    console,
    exit_on_error,
    folder_out,
    say,
    stop_cleanly,
)
from mmcli.config import ARCH_PRESETS
from mmcli.errors import UsageError
from mmcli.training.config import SITE_OPS, VARIANTS, TrainConfig

_TRAIN: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)}
"""The defaults of train's options: the config's own, stated once (in :class:`TrainConfig`)."""

if TYPE_CHECKING:
    from mmcli.training import TrainSummary

logger = logging.getLogger("mmcli.cli")


def _budget(value: str, flag: str) -> int | None:
    if value.lower() == "all":
        return None
    if not value.isdigit():
        raise UsageError(f"{flag} takes a number or 'all', got {value!r}")
    return int(value)


def _site_ops(value: str) -> tuple[str, ...]:
    """--site-aug: a comma-separated list of op names, ``all`` or ``none``."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return tuple(SITE_OPS)
    if names in ([], ["none"]):
        return ()
    return tuple(dict.fromkeys(names))


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _renamed(ctx: typer.Context, name: str, value: Any, old: str, old_value: Any) -> Any:
    """The value of the option ``name`` (its parameter), or of ``old``, its deprecated former name, with a warning.

    Raises:
        UsageError: both names are on the command line.
    """
    new = "--" + name.replace("_", "-")
    if old_value is None:
        return value
    # ParameterSource lives in click, which Typer vendors: compare by name
    if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE":
        raise UsageError(f"{old} is the old name of {new}: pass only {new}")
    logger.warning("%s is deprecated for train and will be removed: use %s", old, new)
    return old_value


def duration(seconds: float) -> str:
    """A wait as a person reads it: ``40 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


def run_eta(elapsed: float, epochs_timed: int, epochs_left: float) -> float | None:
    """Seconds the run still needs: the mean epoch time so far (training, validation and
    checkpoints: ``elapsed`` over ``epochs_timed`` epochs) times the epochs left; None before
    an epoch has been timed."""
    return elapsed / epochs_timed * max(0.0, epochs_left) if epochs_timed > 0 else None


class _Progress:
    """What train shows: a bar per epoch with the loss on a terminal, else a plain line every
    5 % of an epoch's steps; one line per finished epoch either way (the bar goes at the
    end, the lines stay), with how long the whole run should still take (ETA: the mean
    epoch time of this session times the epochs left; early stopping may end it sooner).
    Nothing with ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, not quiet and console.is_terminal
        self.epoch, self.trainer = 1, None
        self.task: TaskID | None = None  # the bar's task, from on_start
        self.started, self.first, self.epoch_started = 0.0, 0, 0.0
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"), console=console, disable=not self.bar, transient=True,
        )

    @property
    def total(self) -> int:
        return self.trainer.cfg.epochs if self.trainer is not None else self.epoch  # cfg: set_schedule may change it

    def on_start(self, trainer: Any) -> None:
        self.trainer, self.epoch, self.first = trainer, trainer.epoch + 1, trainer.epoch
        self.started = self.epoch_started = time.monotonic()
        self.task = self.progress.add_task("train", total=trainer.steps, epoch=f"{self.epoch}/{self.total}",
                                           loss="-", val="", eta="")

    def _eta(self, done: float) -> str:
        """``ETA ... for the run`` after ``done`` epochs of this run (a fraction within an epoch); "" before one."""
        eta = run_eta(time.monotonic() - self.started, self.epoch - 1 - self.first, self.total - done)
        return "" if eta is None else f"ETA {duration(eta)} for the run"

    def on_step(self, step: int, steps: int, stats: dict[str, float]) -> None:
        # the ETA counts down within an epoch: the epochs left minus this one's share done
        if self.bar and self.task is not None:
            eta = run_eta(self.epoch_started - self.started, self.epoch - 1 - self.first, self.total - self.epoch + 1)
            left = "" if eta is None else f"ETA {duration(eta - (time.monotonic() - self.epoch_started))} for the run"
            self.progress.update(self.task, completed=step, loss=f"{stats['loss']:.4f}", eta=left)
        elif not self.quiet and (step % max(1, steps // 20) == 0 or step == steps):
            say(f"epoch {self.epoch}/{self.total}: step {step}/{steps}, loss {stats['loss']:.4f}")

    def on_epoch(self, row: dict[str, Any]) -> None:
        val = " ".join(f"{k} {_fmt(row[k])}" for k in ("val_dice", "val_auc", "val_acc") if k in row)
        self.epoch = row["epoch"] + 1
        eta = self._eta(row["epoch"]) if row["epoch"] < self.total else ""
        if not self.quiet:
            took = f" ({duration(row['seconds'])}; {eta})" if eta else f" ({duration(row['seconds'])})"
            say(f"epoch {row['epoch']}/{self.total}: loss {_fmt(row['loss'])} {val} score {_fmt(row['score'])}{took}")
        self.epoch_started = time.monotonic()
        # reset() replaces the task's fields: pass every field the columns read
        if self.task is not None:
            self.progress.reset(self.task, epoch=f"{self.epoch}/{self.total}", loss="-", val=val, eta=eta)


def _summary_line(summary: TrainSummary) -> str:
    calib = ""
    if summary.ece_before is not None:
        calib = f"; temperature {summary.temperature:.3f}, ECE {summary.ece_before:.4f} -> {summary.ece_after:.4f}"
        if summary.calibration_kept:
            calib += f" (kept at 1: {summary.calibration_kept})"
    stop = " (stopped early)" if summary.stopped_early else ""
    return (f"{summary.epochs_run} epoch(s){stop}; best epoch {summary.best_epoch} score "
            f"{_fmt(summary.best_score)}{calib} -> {summary.out / 'best.safetensors'}")


def train(
    ctx: typer.Context,
    out: folder_out("the run: checkpoints, history, splits, run.json"),  # type: ignore[valid-type]
    seg_data: Annotated[list[Path] | None, typer.Option(
        "--seg-data", metavar="DIR", help="Folder of images with masks/<stem>.png (repeatable).")] = None,
    unlabelled_data: Annotated[list[Path] | None, typer.Option(
        "--unlabelled-data", metavar="DIR",
        help="Folder of images with no labels at all, for the semi-supervised streams of both tasks "
             "(repeatable): how a site adapts the model to its own films.")] = None,
    init: Annotated[str | None, typer.Option(
        "--init", metavar="FILE|NAME", help="Start from these weights (a checkpoint or a registered name) instead "
                                            "of random ones; the new checkpoint records them.")] = None,
    cls_data: Annotated[list[Path] | None, typer.Option(
        "--cls-data", metavar="DIR", help="Folder of images with labels.csv (file,label) (repeatable).")] = None,
    variant: Annotated[str, typer.Option(
        "--variant", metavar="NAME", help=f"{'|'.join(VARIANTS)} (the paper's ablations).")] = _TRAIN["variant"],
    seg_labels: Annotated[str, typer.Option(
        "--seg-labels", metavar="N|all", help="Masks to keep; the rest is unlabelled.")] = "all",
    cls_labels: Annotated[str, typer.Option(
        "--cls-labels", metavar="N|all", help="Class labels to keep (stratified); the rest is unlabelled.")] = "all",
    val_fraction: Annotated[float, typer.Option(
        "--val-fraction", min=0.0, max=0.95, metavar="X", help="Validation share.")] = _TRAIN["val_fraction"],
    seed: Annotated[int, typer.Option(
        "--seed", metavar="N", help="Seeds splits, initialisation, sampling, augmentation.")] = _TRAIN["seed"],
    epochs: Annotated[int, typer.Option("--epochs", min=1, metavar="N")] = _TRAIN["epochs"],
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1, metavar="N", help="Images per stream per step.")] = _TRAIN["batch_size"],
    steps_per_epoch: Annotated[int | None, typer.Option(
        "--steps-per-epoch", min=1, metavar="N",
        help="Steps per epoch. Default: one pass over the largest labelled pool.")] = None,
    image_size: Annotated[int, typer.Option(
        "--image-size", min=64, max=1024, metavar="PX", help="Model input size (multiple of 16).")] = (
        _TRAIN["image_size"]),
    arch: Annotated[str, typer.Option(
        "--arch", metavar="|".join(ARCH_PRESETS), help="Model size: base (paper widths) or tiny (smoke tests).")] = (
        _TRAIN["arch"]),
    lr: Annotated[float, typer.Option("--lr", min=0.0, metavar="X", help="Learning rate.")] = _TRAIN["lr"],
    lr_step: Annotated[int, typer.Option("--lr-step", min=1, metavar="N", help="Epochs between lr x0.1 steps.")] = (
        _TRAIN["lr_step"]),
    pseudo_threshold: Annotated[float, typer.Option(
        "--pseudo-threshold", min=0.0, max=1.0, metavar="P",
        help="Confidence from which an unlabelled image's prediction becomes its pseudo label.")] = _TRAIN["threshold"],
    threshold: Annotated[float | None, typer.Option(
        "--threshold", min=0.0, max=1.0, metavar="P", hidden=True,
        help="Deprecated (warns; to be removed): the old name of --pseudo-threshold.")] = None,
    lambda_u: Annotated[float, typer.Option(
        "--lambda-u", min=0.0, metavar="X", help="Weight of the pseudo-label loss.")] = _TRAIN["lambda_u"],
    dice_weight: Annotated[float, typer.Option(
        "--dice-weight", min=0.0, metavar="X", help="Weight of the Dice loss (the paper's alpha).")] = _TRAIN["alpha"],
    alpha: Annotated[float | None, typer.Option(
        "--alpha", min=0.0, metavar="X", hidden=True,
        help="Deprecated (warns; to be removed): the old name of --dice-weight.")] = None,
    consistency_weight: Annotated[float, typer.Option(
        "--consistency-weight", min=0.0, metavar="X",
        help="Weight of the foreground-KL consistency (the paper's beta).")] = _TRAIN["beta"],
    beta: Annotated[float | None, typer.Option(
        "--beta", min=0.0, metavar="X", hidden=True,
        help="Deprecated (warns; to be removed): the old name of --consistency-weight.")] = None,
    label_smoothing: Annotated[float, typer.Option(
        "--label-smoothing", min=0.0, max=0.99, metavar="E",
        help="Smooth the class labels: the target is 1 - E/2 on the label and E/2 on the other class (0: off); "
             "for noisy labels, such as text-mined ones.")] = _TRAIN["label_smoothing"],
    hflip: Annotated[bool, typer.Option(
        "--hflip/--no-hflip", help="Random horizontal flips (they swap laterality: off by default).")] = (
        _TRAIN["hflip"]),
    site_aug: Annotated[str, typer.Option(
        "--site-aug", metavar="OPS",
        help=f"Site-shift augmentations, comma-separated: {','.join(SITE_OPS)}, or all, or none "
             "(probabilities and ranges: README, and run.json of the run).")] = "none",
    balance_sources: Annotated[bool, typer.Option(
        "--balance-sources/--no-balance-sources",
        help="Draw every stream from its source folders at equal rates, not in proportion to their "
             "sizes (the rates go into run.json).")] = _TRAIN["balance_sources"],
    freeze: Annotated[str, typer.Option(
        "--freeze", metavar="PARTS",
        help="Keep these parts of the --init weights fixed, comma-separated: encoder, classifier, decoder "
             "(encoder,classifier adapts the masks only and keeps the pneumonia answer as it was).")] = "",
    patience: Annotated[int | None, typer.Option(
        "--patience", min=0, metavar="N", help="Stop after N epochs without a better score; 0: never.")] = (
        _TRAIN["patience"]),
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Fit a temperature on the validation split.")] = _TRAIN["calibrate"],
    voi_lut: VoiLutOpt = False,
    device: DeviceOpt = "auto",
    precision: TrainPrecisionOpt = "auto",
    workers: Annotated[int | None, typer.Option(
        "--workers", "-j", min=0, envvar="MMCLI_WORKERS", show_envvar=True, metavar="N",
        help="Processes that decode the images before the first epoch (default: one per CPU core; up to 8 "
             "beside a GPU); 0: main process only. Training steps run on batches already in memory.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = (
        _TRAIN["resume"]),
    quiet: QuietOpt = False,
) -> None:
    """Train MultiMix (or an ablation) semi-supervised from few labels.

    Writes best.safetensors and last.safetensors (loadable by `mmcli predict --weights`),
    state.pt (for --resume), history.csv, splits.csv and run.json into --out.

    Deprecated option names, still accepted with a warning until they are removed:
    --threshold (now --pseudo-threshold), --alpha (now --dice-weight), --beta (now
    --consistency-weight). run.json keeps the paper's names: threshold, alpha, beta.
    """
    with exit_on_error():
        cfg = TrainConfig(
            out=str(out), seg_data=tuple(map(str, seg_data or ())), cls_data=tuple(map(str, cls_data or ())),
            unlabelled_data=tuple(map(str, unlabelled_data or ())), init=init,
            variant=variant, arch=arch, seg_labels=_budget(seg_labels, "--seg-labels"),  # type: ignore[arg-type]
            cls_labels=_budget(cls_labels, "--cls-labels"), val_fraction=val_fraction, seed=seed, epochs=epochs,
            batch_size=batch_size, steps_per_epoch=steps_per_epoch, image_size=image_size, lr=lr, lr_step=lr_step,
            threshold=_renamed(ctx, "pseudo_threshold", pseudo_threshold, "--threshold", threshold),
            lambda_u=lambda_u, alpha=_renamed(ctx, "dice_weight", dice_weight, "--alpha", alpha),
            beta=_renamed(ctx, "consistency_weight", consistency_weight, "--beta", beta),
            label_smoothing=label_smoothing, hflip=hflip,
            site_aug=_site_ops(site_aug), balance_sources=balance_sources,
            freeze=tuple(dict.fromkeys(p.strip() for p in freeze.split(",") if p.strip())),
            patience=patience or None, calibrate=calibrate, voi_lut=voi_lut, device=device,
            precision=precision, workers=workers, resume=resume,
        )
        show = _Progress(quiet)
        with stop_cleanly(f"the last finished epoch is kept in {out / 'state.pt'}",
                          "run the same command with --resume to continue"), show.progress:
            from mmcli.training import run_train  # torch: only once a run starts

            summary = run_train(cfg, on_start=show.on_start, on_step=show.on_step, on_epoch=show.on_epoch,
                                command=sys.argv)
    if not quiet and summary.is_main:
        say(_summary_line(summary))
