"""``mmcli predict``: lung masks and pneumonia probabilities for a batch of radiographs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmcli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    FailFastOpt,
    InputsArg,
    ReportOutOpt,
    PrecisionOpt,
    ThresholdOpt,
    VoiLutOpt,
    WeightsOpt,
    WorkersOpt,
    console,
    exit_on_error,
)
from mmcli.predict import PredictConfig, run_predict

logger = logging.getLogger("mmcli.cli")


def predict(
    inputs: InputsArg,
    out: ReportOutOpt,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    threshold: ThresholdOpt = 0.5,
    voi_lut: VoiLutOpt = False,
    hdf5: Annotated[
        Path | None, typer.Option("--hdf5", help="Also write the table, masks and probabilities to this HDF5 file.")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Start again instead of resuming (finished cases are skipped by default)."),
    ] = False,
    fail_fast: FailFastOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Predict lung masks and pneumonia probabilities.

    Writes one report row per input (status ok/error/skipped) and a lung mask PNG at each
    image's native resolution under <report name>/masks/. Exit code 0 when every case
    succeeded, 1 when any failed, 2 on usage errors.
    """
    with exit_on_error():
        cfg = PredictConfig(
            inputs=tuple(inputs), out=out, weights=weights, device=device, precision=precision,  # type: ignore[arg-type]
            batch_size=batch_size, workers=workers, threshold=threshold, voi_lut=voi_lut,
            overwrite=overwrite, fail_fast=fail_fast, hdf5=hdf5,
        )
        show_bar = not quiet and console.is_terminal
        progress = Progress(
            TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not show_bar,
        )
        task: dict[str, Any] = {}

        def on_start(todo: int, resumed: int) -> None:
            if resumed and not quiet:
                console.print(f"Resuming: {resumed} case(s) already done, {todo} to go.")
            task.update(id=progress.add_task("predict", total=todo, failed=0), failed=0, done=0, total=todo)

        def on_case(row: dict[str, Any]) -> None:
            if row["status"] == "error":
                task["failed"] += 1
                logger.warning("%s: %s", row["source"], row["error"])
            else:
                logger.info("%s: ok", row["source"])
            task["done"] += 1
            progress.update(task["id"], advance=1, failed=task["failed"])
            if not show_bar and not quiet and (task["done"] % max(1, task["total"] // 20) == 0):
                # no terminal (a batch job's log): a plain line every 5 %
                console.print(f"predict: {task['done']}/{task['total']} done, {task['failed']} failed", highlight=False)

        with progress:
            summary = run_predict(cfg, on_start=on_start, on_case=on_case, command=sys.argv)
    if not quiet:
        console.print(
            f"{summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
            f"({summary.resumed} resumed) in {summary.seconds:.1f} s -> {summary.report}",
            highlight=False,
        )
    if summary.failed:
        raise typer.Exit(1)
