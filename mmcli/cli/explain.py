"""``mmcli explain``: saliency and Grad-CAM maps that show where the model looked."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mmcli.cli.common import InputsArg, drive_run, exit_on_error, folder_out, model_run_options

AlphaOpt = Annotated[
    float, typer.Option("--alpha", min=0.0, max=1.0, metavar="A", help="Opacity of the hottest overlay pixels.")
]
TargetOpt = Annotated[
    str, typer.Option("--target", metavar="pneumonia|normal|predicted",
                      help="The class Grad-CAM explains: pneumonia, normal, or each image's predicted class."),
]


@model_run_options(batch=True)
def explain(
    inputs: InputsArg,
    out: folder_out("the maps and the report (explain.csv, saliency/, gradcam/, maps.h5)"),  # type: ignore[valid-type]
    alpha: AlphaOpt = 0.6,
    target: TargetOpt = "pneumonia",
    **run: Any,
) -> None:
    """Write saliency maps that show where the model looked.

    For each image: the saliency bridge's map (the exact tensor the model feeds its
    decoder; shown smoothed) and Grad-CAM on the last encoder stage for --target, as
    titled pictures with the lung outline and a colour bar (saliency/, gradcam/), raw
    maps on the model grid in maps.h5, and a row in explain.csv (probabilities, label,
    share of each map inside the predicted lungs).
    Exit code 0 when every case succeeded, 1 when any failed, 2 on usage errors.
    """
    quiet = run.pop("quiet")
    with exit_on_error():
        from mmcli.explain import ExplainConfig, open_explain  # torch: only once a command runs

        cfg = ExplainConfig(inputs=tuple(inputs), out=out, alpha=alpha, target=target, **run)
        drive_run("explain", open_explain(cfg, command=sys.argv), quiet=quiet)
