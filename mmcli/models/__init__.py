"""Models: torch only. MultiMix, its building blocks and a name -> model registry."""

from mmcli.models.multimix import EncoderFeatures, MultiMix, MultiMixOutput
from mmcli.models.registry import create_model, list_models, model_kwargs, register_model

__all__ = [
    "EncoderFeatures",
    "MultiMix",
    "MultiMixOutput",
    "create_model",
    "list_models",
    "model_kwargs",
    "register_model",
]
