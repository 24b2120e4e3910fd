"""``mmcli predict``: lung masks and pneumonia probabilities for a batch of radiographs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mmcli.cli.common import (
    HDF5Opt,
    InputsArg,
    ReportOutOpt,
    RunOptions,
    drive_run,
    exit_on_error,
    model_run_options,
)

DicomSegOpt = Annotated[
    bool, typer.Option("--dicom-seg", help="For each DICOM input, a DICOM Segmentation of the lungs (research use).")
]
DicomSrOpt = Annotated[
    bool, typer.Option("--dicom-sr", help="For each DICOM input, a DICOM Structured Report of the findings.")
]
DicomScOpt = Annotated[
    bool, typer.Option("--dicom-sc", help="For each DICOM input, a DICOM Secondary Capture: the film with the lung "
                                          "outline and the findings burned in, for any PACS viewer (research use).")
]


@model_run_options(batch=True)
def predict(inputs: InputsArg, out: ReportOutOpt, hdf5: HDF5Opt = None, dicom_seg: DicomSegOpt = False,
            dicom_sr: DicomSrOpt = False, dicom_sc: DicomScOpt = False, *, run: RunOptions) -> None:
    """Predict lung masks and pneumonia probabilities.

    Writes one report row per input (status ok/error/skipped) and a lung mask PNG at each
    image's native resolution under <report name>/masks/. Exit code 0 when every case
    succeeded, 1 when any failed, 2 on usage errors.
    """
    with exit_on_error():
        from mmcli.predict import PredictConfig, open_predict  # torch: only once a command runs

        cfg = PredictConfig(inputs=tuple(inputs), out=out, hdf5=hdf5, dicom_seg=dicom_seg, dicom_sr=dicom_sr,
                            dicom_sc=dicom_sc, **run.settings(PredictConfig))
        drive_run("predict", open_predict(cfg, command=sys.argv), quiet=run.quiet)
