"""``mmcli explain``: saliency and Grad-CAM maps that show where the model looked."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mmcli.cli.common import (
    DeviceOpt,
    FailFastOpt,
    InputsArg,
    ThresholdOpt,
    VoiLutOpt,
    WeightsOpt,
    console,
    exit_on_error,
)
from mmcli.explain import ExplainConfig, run_explain

logger = logging.getLogger("mmcli.cli")


def explain(
    inputs: InputsArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the maps and the report.", show_default=False)],
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per model call.")] = 4,
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=0, envvar="MMCLI_WORKERS", show_envvar=True,
                          help="Decoding worker processes; 0: main process only.")
    ] = 0,
    threshold: ThresholdOpt = 0.5,
    voi_lut: VoiLutOpt = False,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Opacity of the hottest overlay pixels.")]
    = 0.6,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start again instead of resuming (finished cases are skipped).")
    ] = False,
    fail_fast: FailFastOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
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
            inputs=tuple(inputs), out=out, weights=weights, device=device, batch_size=batch_size, workers=workers,
            threshold=threshold, voi_lut=voi_lut, alpha=alpha, overwrite=overwrite, fail_fast=fail_fast,
        )

        def on_case(row: dict[str, Any]) -> None:
            if row["status"] == "error":
                logger.warning("%s: %s", row["source"], row["error"])
            else:
                logger.info("%s: ok", row["source"])

        counts = run_explain(cfg, on_case=on_case, command=sys.argv)
    if not quiet:
        console.print(
            f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped "
            f"({counts['resumed']} resumed) -> {cfg.out / 'explain.csv'}",
            highlight=False,
        )
    if counts["failed"]:
        raise typer.Exit(1)
