"""``mmcli evaluate``: the paper's metrics against reference masks and labels, with baselines."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mmcli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    PrecisionOpt,
    VoiLutOpt,
    WeightsOpt,
    WorkersOpt,
    console,
    exit_on_error,
)
from mmcli.evaluation import EvaluateConfig, run_evaluate

logger = logging.getLogger("mmcli.cli")


def evaluate(
    datasets: Annotated[
        list[str],
        typer.Argument(help="Dataset folders: images plus masks/<stem>.png and/or labels.csv (file,label).",
                       show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the reports and figures.", show_default=False)],
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", "-p", help="Evaluate this earlier `mmcli predict` report instead of running "
                     "the model."),
    ] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, max=1.0, help="Pneumonia probability from which the label is "
                            "pneumonia (when the model runs).")
    ] = 0.5,
    voi_lut: VoiLutOpt = False,
    hdf5: Annotated[bool, typer.Option("--hdf5", help="Also write evaluation.h5 (per-case table, summary).")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG figures.")] = True,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95% intervals (0: none).")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    worst: Annotated[int, typer.Option("--worst", min=0, help="Lowest-Dice cases shown per dataset.")] = 4,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Predict again instead of resuming into <out>/predictions.csv.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
) -> None:
    """Compute the paper's metrics against reference masks and labels.

    Runs the model exactly as `mmcli predict` does (into <out>/predictions.csv), or reads
    --predictions, then writes per_case.csv, summary.json, summary.md (read this first:
    every classification metric beside the majority-class baseline, 95% bootstrap
    intervals) and PNG figures. Several datasets appear side by side. Exit code 0 when
    every case was evaluated, 1 when any failed or had no prediction, 2 on usage errors.
    """
    with exit_on_error():
        cfg = EvaluateConfig(
            datasets=tuple(datasets), out=out, predictions=predictions, weights=weights, device=device,
            precision=precision, batch_size=batch_size, workers=workers, threshold=threshold, voi_lut=voi_lut,
            overwrite=overwrite, hdf5=hdf5, plots=plots, n_bootstrap=bootstrap, seed=seed, worst=worst,
        )

        def on_case(row: dict[str, Any]) -> None:
            if row["status"] != "ok":
                logger.warning("%s: %s", row["source"], row["error"])

        summary = run_evaluate(cfg, on_case=on_case, command=sys.argv)
    if not quiet:
        console.print(
            f"{summary.ok} evaluated, {summary.failed} failed, {summary.missing} without prediction "
            f"in {summary.seconds:.1f} s -> {summary.out / 'summary.md'}",
            highlight=False,
        )
    if summary.failed or summary.missing:
        raise typer.Exit(1)
