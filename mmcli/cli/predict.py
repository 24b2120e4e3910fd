"""``mmcli predict``: lung masks and pneumonia probabilities for a batch of radiographs."""

from __future__ import annotations

import sys


from mmcli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    FailFastOpt,
    HDF5Opt,
    InputsArg,
    OverwriteOpt,
    PrecisionOpt,
    QuietOpt,
    ReportOutOpt,
    ThresholdOpt,
    VoiLutOpt,
    WeightsOpt,
    WorkersOpt,
    drive_run,
    exit_on_error,
)
from mmcli.predict import PredictConfig, open_predict


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
    hdf5: HDF5Opt = None,
    overwrite: OverwriteOpt = False,
    fail_fast: FailFastOpt = False,
    quiet: QuietOpt = False,
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
        drive_run("predict", open_predict(cfg, command=sys.argv), quiet=quiet)
