"""``mmcli explain``: saliency and Grad-CAM maps that show where the model looked."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mmcli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    FailFastOpt,
    InputsArg,
    OverwriteOpt,
    PrecisionOpt,
    QuietOpt,
    ThresholdOpt,
    VoiLutOpt,
    WeightsOpt,
    WorkersOpt,
    drive_run,
    exit_on_error,
    folder_out,
)
from mmcli.explain import ExplainConfig, open_explain


def explain(
    inputs: InputsArg,
    out: folder_out("the maps and the report (explain.csv, saliency/, gradcam/, maps.h5)"),  # type: ignore[valid-type]
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    threshold: ThresholdOpt = 0.5,
    voi_lut: VoiLutOpt = False,
    alpha: Annotated[
        float, typer.Option("--alpha", min=0.0, max=1.0, metavar="A", help="Opacity of the hottest overlay pixels.")
    ] = 0.6,
    overwrite: OverwriteOpt = False,
    fail_fast: FailFastOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write saliency maps that show where the model looked.

    For each image: the saliency bridge's map (the exact tensor the model feeds its
    decoder) and Grad-CAM on the last encoder stage, as colour overlays at native
    resolution (saliency/, gradcam/), raw maps on the model grid in maps.h5, and a row
    in explain.csv (probabilities, label, share of each map inside the predicted lungs).
    Exit code 0 when every case succeeded, 1 when any failed, 2 on usage errors.
    """
    with exit_on_error():
        cfg = ExplainConfig(
            inputs=tuple(inputs), out=out, weights=weights, device=device, precision=precision,  # type: ignore[arg-type]
            batch_size=batch_size, workers=workers, threshold=threshold, voi_lut=voi_lut, alpha=alpha,
            overwrite=overwrite, fail_fast=fail_fast,
        )
        drive_run("explain", open_explain(cfg, command=sys.argv), quiet=quiet)
