"""Semi-supervised MultiMix training: losses, augmentations, data, the loop, calibration.

Entry point: :func:`run_train` with a :class:`TrainConfig`.
"""

from mmcli.training.config import VARIANTS, TrainConfig, Variant
from mmcli.training.trainer import Trainer, TrainSummary, run_train

__all__ = ["VARIANTS", "TrainConfig", "TrainSummary", "Trainer", "Variant", "run_train"]
