"""Semi-supervised MultiMix training: losses, augmentations, data, the loop, calibration.

Entry point: :func:`run_train` with a :class:`TrainConfig`. The loop (and torch) is
imported on first use, so the command line can read the settings without it.
"""

from typing import Any

from mmcli.training.config import VARIANTS, TrainConfig, Variant

__all__ = ["VARIANTS", "TrainConfig", "TrainSummary", "Trainer", "TrainingDiverged", "Variant", "run_train"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "TrainSummary", "TrainingDiverged", "run_train"):
        from mmcli.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'mmcli.training' has no attribute {name!r}")
