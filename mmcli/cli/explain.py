"""``mmcli explain``: saliency and Grad-CAM maps that show where the model looked."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, cast

import typer

from mmcli.cli.common import InputsArg, RunOptions, drive_run, exit_on_error, folder_out, model_run_options
from mmcli.errors import UsageError

logger = logging.getLogger("mmcli.cli")

OverlayOpacityOpt = Annotated[
    float, typer.Option("--overlay-opacity", min=0.0, max=1.0, metavar="A",
                        help="Opacity of the hottest overlay pixels (0: invisible, 1: opaque)."),
]
AlphaOpt = Annotated[
    float | None, typer.Option("--alpha", min=0.0, max=1.0, metavar="A", hidden=True,
                               help="Deprecated (warns; to be removed): the old name of --overlay-opacity."),
]
TargetOpt = Annotated[
    str, typer.Option("--target", metavar="pneumonia|normal|predicted",
                      help="The class Grad-CAM explains: pneumonia, normal, or each image's predicted class."),
]


def _opacity(ctx: typer.Context, overlay_opacity: float, alpha: float | None) -> float:
    """The overlay opacity, from --overlay-opacity or its deprecated name --alpha (with one warning)."""
    if alpha is None:
        return overlay_opacity
    # ParameterSource lives in click, which Typer vendors: compare by name
    if getattr(ctx.get_parameter_source("overlay_opacity"), "name", None) == "COMMANDLINE":
        raise UsageError("--alpha is the old name of --overlay-opacity: pass only --overlay-opacity")
    logger.warning("--alpha is deprecated for explain: use --overlay-opacity")
    return alpha


@model_run_options(batch=True)
def explain(
    ctx: typer.Context,
    inputs: InputsArg,
    out: folder_out("the maps and the report (explain.csv, saliency/, gradcam/, maps.h5)"),  # type: ignore[valid-type]
    overlay_opacity: OverlayOpacityOpt = 0.6,
    alpha: AlphaOpt = None,
    target: TargetOpt = "pneumonia",
    *,
    run: RunOptions,
) -> None:
    """Write saliency maps that show where the model looked.

    For each image: the saliency bridge's map (the exact tensor the model feeds its
    decoder; shown smoothed) and Grad-CAM on the last encoder stage for --target, as
    titled pictures with the lung outline and a colour bar (saliency/, gradcam/), raw
    maps on the model grid in maps.h5, and a row in explain.csv (probabilities, label,
    share of each map inside the predicted lungs).
    Exit code 0 when every case succeeded, 1 when any failed, 2 on usage errors.
    --alpha, the old name of --overlay-opacity, still works with a warning until it is removed.
    """
    with exit_on_error():
        from mmcli.explain import ExplainConfig, Target, open_explain  # torch: only once a command runs

        # the config field keeps its name (alpha): run.json and a resume of an older run compare it
        cfg = ExplainConfig(inputs=tuple(inputs), out=out, alpha=_opacity(ctx, overlay_opacity, alpha),
                            target=cast(Target, target), **run.settings(ExplainConfig))  # it checks the target
        drive_run("explain", open_explain(cfg, command=sys.argv), quiet=run.quiet)
