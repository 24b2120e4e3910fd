"""``mmcli predict``: lung masks and pneumonia probabilities for a batch of radiographs."""

from __future__ import annotations

import sys
from typing import Any

from mmcli.cli.common import HDF5Opt, InputsArg, ReportOutOpt, drive_run, exit_on_error, model_run_options


@model_run_options(batch=True)
def predict(inputs: InputsArg, out: ReportOutOpt, hdf5: HDF5Opt = None, **run: Any) -> None:
    """Predict lung masks and pneumonia probabilities.

    Writes one report row per input (status ok/error/skipped) and a lung mask PNG at each
    image's native resolution under <report name>/masks/. Exit code 0 when every case
    succeeded, 1 when any failed, 2 on usage errors.
    """
    quiet = run.pop("quiet")
    with exit_on_error():
        from mmcli.predict import PredictConfig, open_predict  # torch: only once a command runs

        cfg = PredictConfig(inputs=tuple(inputs), out=out, hdf5=hdf5, **run)
        drive_run("predict", open_predict(cfg, command=sys.argv), quiet=quiet)
