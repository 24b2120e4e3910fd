"""``mmcli evaluate``: the paper's metrics against reference masks and labels, with baselines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mmcli.cli.common import (
    HDF5Opt,
    RunOptions,
    exit_on_error,
    folder_out,
    follow_rows,
    model_run_options,
    say,
    stop_cleanly,
)


@model_run_options()
def evaluate(
    datasets: Annotated[
        list[str],
        typer.Argument(metavar="DATASET", show_default=False,
                       help="Dataset folders: images (searched recursively) plus masks/PATH.png and/or "
                            "labels.csv (file,label)."),
    ],
    out: folder_out("the reports and figures (summary.md, summary.json, per_case.csv, *.png)"),  # type: ignore[valid-type]
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", "-p", metavar="FILE",
                     help="Evaluate this earlier `mmcli predict` report instead of running the model."),
    ] = None,
    hdf5: HDF5Opt = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG figures.")] = True,
    bootstrap: Annotated[
        int,
        typer.Option("--bootstrap", min=0, metavar="N", help="Bootstrap resamples for the 95% intervals (0: none)."),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the bootstrap.")] = 0,
    worst: Annotated[int, typer.Option("--worst", min=0, metavar="N", help="Lowest-Dice cases shown per dataset.")] = 4,
    *,
    run: RunOptions,
) -> None:
    """Compute the paper's metrics against reference masks and labels.

    Runs the model exactly as `mmcli predict` does (into <out>/predictions.csv), or reads
    --predictions, then writes per_case.csv, summary.json, summary.md (read this first:
    every classification metric beside the majority-class baseline, 95% bootstrap
    intervals) and PNG figures. Several datasets appear side by side. Exit code 0 when
    every case was evaluated, 1 when any failed or had no prediction, 2 on usage errors.
    """
    quiet = run.quiet
    with exit_on_error():
        from mmcli.evaluation import EvaluateConfig, EvaluationRun  # metrics and plots: only once it runs

        cfg = EvaluateConfig(datasets=tuple(datasets), out=out, predictions=predictions, hdf5=hdf5, plots=plots,
                             n_bootstrap=bootstrap, seed=seed, worst=worst, **run.settings(EvaluateConfig))
        evaluation = EvaluationRun(cfg, command=sys.argv)
        with stop_cleanly("predictions finished so far are kept in " + str(evaluation.report.with_suffix("")),
                          "run the same command again to resume"):
            try:
                if evaluation.predict_run is not None:
                    follow_rows("predict", evaluation.predict_run, len(evaluation.predict_run.todo), quiet=quiet)
                follow_rows("evaluate", evaluation.cases(), len(evaluation.refs), quiet=quiet)
            finally:
                evaluation.close()  # also when the predictions failed before the evaluation began
    summary = evaluation.summary
    assert summary is not None
    if not quiet:
        say(f"{summary.ok} evaluated, {summary.failed} failed, {summary.missing} without prediction "
            f"in {summary.seconds:.1f} s -> {summary.out / 'summary.md'}")
    if summary.failed or summary.missing:
        raise typer.Exit(1)
