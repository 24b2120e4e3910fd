"""A timm-style model registry: names map to functions that build models.

A registered function takes keyword overrides and returns a :class:`MultiMix` (every
command drives its stages: ``encode``, ``classify``, ``decode``), which
exposes ``init_kwargs`` (the full, JSON-serialisable constructor arguments), so a
checkpoint can store ``(name, model_kwargs(name, **overrides))`` and rebuild the
model without guessing from tensor shapes.

The ablation rows of the paper that differ only in their losses (``enc-ssl``,
``umtl-ssl``) share the architectures ``enc`` and ``umtl``; ``umtls`` and
``multimix`` share one architecture too and differ in training only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from mmcli.config import ARCH_PRESETS, arch_overrides
from mmcli.models.multimix import MultiMix

__all__ = ["ARCH_PRESETS", "arch_overrides", "create_model", "list_models", "model_kwargs", "register_model"]

ModelFn = Callable[..., MultiMix]
F = TypeVar("F", bound=ModelFn)

_MODELS: dict[str, ModelFn] = {}

def register_model(name: str) -> Callable[[F], F]:
    """Decorator that registers ``fn(**overrides) -> MultiMix`` under ``name``."""

    def decorator(fn: F) -> F:
        if name in _MODELS:
            raise ValueError(f"Model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **overrides: Any) -> MultiMix:
    """Build the model registered as ``name``, with constructor ``overrides``."""
    return _entry(name)(**overrides)


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The full constructor kwargs that ``create_model(name, **overrides)`` uses.

    The model is built on the meta device, which allocates and initialises nothing,
    so this is cheap and can never disagree with ``create_model``.
    """
    fn = _entry(name)
    with torch.device("meta"):
        model = fn(**overrides)
    kwargs = getattr(model, "init_kwargs", None)
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"Model {name!r} ({type(model).__name__}) does not expose init_kwargs")
    return dict(kwargs)


def _entry(name: str) -> ModelFn:
    try:
        return _MODELS[name]
    except KeyError:
        available = ", ".join(list_models())
        raise ValueError(f"Unknown model {name!r}. Available: {available}") from None


def _multimix(preset: Mapping[str, Any], overrides: Mapping[str, Any]) -> MultiMix:
    return MultiMix(**{**preset, **overrides})


@register_model("multimix")
def multimix(**overrides: Any) -> MultiMix:
    """MultiMix with the paper's widths: both heads and the saliency bridge."""
    return _multimix({}, overrides)


@register_model("multimix_tiny")
def multimix_tiny(**overrides: Any) -> MultiMix:
    """MultiMix with the ``tiny`` preset of :data:`ARCH_PRESETS`, for tests."""
    return _multimix(ARCH_PRESETS["tiny"], overrides)


@register_model("unet")
def unet(**overrides: Any) -> MultiMix:
    """Ablation ``unet``: encoder and decoder only (supervised segmentation)."""
    return _multimix({"cls_head": False, "bridge": False}, overrides)


@register_model("enc")
def enc(**overrides: Any) -> MultiMix:
    """Ablation ``enc`` (and ``enc-ssl``): encoder and classification head only."""
    return _multimix({"seg_head": False, "bridge": False}, overrides)


@register_model("umtl")
def umtl(**overrides: Any) -> MultiMix:
    """Ablation ``umtl`` (and ``umtl-ssl``): both heads, no saliency bridge."""
    return _multimix({"bridge": False}, overrides)


@register_model("umtls")
def umtls(**overrides: Any) -> MultiMix:
    """Ablation ``umtls``: both heads and the bridge (same architecture as ``multimix``)."""
    return _multimix({"bridge": True}, overrides)
