"""Where a run starts: the weights of ``--init`` instead of random ones, and the parts ``--freeze`` keeps."""

from __future__ import annotations

from typing import Any

from torch import nn

from mmcli.config import ARCH_PRESETS
from mmcli.errors import UsageError
from mmcli.models import MultiMix, model_kwargs
from mmcli.training.config import VARIANTS
from mmcli.weights import load_weights, weights_name

__all__ = ["freeze_parts", "load_init"]


def _arch_of(name: str, kwargs: dict[str, Any]) -> str | None:
    """The ``--arch`` preset whose arguments of model ``name`` are ``kwargs``; None: none is."""
    for arch, overrides in ARCH_PRESETS.items():
        try:
            if model_kwargs(name, **overrides) == kwargs:
                return arch
        except (KeyError, TypeError, ValueError):  # a model this version does not know
            return None
    return None


def _model_words(name: str, kwargs: dict[str, Any]) -> str:
    arch = _arch_of(name, kwargs)
    return f"{name!r} model ({f'--arch {arch}' if arch else f'arguments {kwargs}'})"


def load_init(model: MultiMix, weights: str, *, model_name: str, kwargs: dict[str, Any],
              image_size: int) -> tuple[dict[str, Any], float]:
    """Load the weights of a checkpoint (a file or a registered name) into ``model``.

    Returns:
        What run.json records of them (name, file, sha256), and their temperature.

    Raises:
        UsageError: the checkpoint's model, arguments or image size differ from this run's.
    """
    ckpt = load_weights(weights)
    if ckpt.model_name != model_name or ckpt.model_kwargs != kwargs:
        variants = [v for v, spec in VARIANTS.items() if spec.model == ckpt.model_name]
        arch = _arch_of(ckpt.model_name, ckpt.model_kwargs)
        fix = (f"pass --variant {' or '.join(variants)}" if variants else "start without --init") + (
            f" and --arch {arch}" if arch and variants else "")
        raise UsageError(f"--init {weights} holds a {_model_words(ckpt.model_name, ckpt.model_kwargs)}, which is "
                         f"not this run's {_model_words(model_name, kwargs)}: {fix}")
    if ckpt.preprocess.image_size != image_size:
        raise UsageError(f"--init {weights} was made for --image-size {ckpt.preprocess.image_size}, this run uses "
                         f"{image_size}: pass --image-size {ckpt.preprocess.image_size}")
    model.load_state_dict(ckpt.state_dict)
    return {"weights": weights_name(ckpt), "file": str(ckpt.path), "sha256": ckpt.sha256}, float(ckpt.temperature)


def freeze_parts(model: MultiMix, parts: tuple[str, ...], variant: str) -> dict[str, int]:
    """Keep the weights of ``parts`` of ``model`` fixed; the number of weights frozen per part.

    Raises:
        UsageError: the model has no such part, or nothing would be left to train.
    """
    modules: dict[str, list[nn.Module | None]] = {"encoder": [model.encoder], "classifier": [model.classifier],
               "decoder": [model.decoder, model.seg_out]}
    frozen = {}
    for part in parts:
        found = [m for m in modules[part] if m is not None]
        if not found:
            raise UsageError(f"--freeze {part}: the model of --variant {variant} has no {part}")
        frozen[part] = sum(p.numel() for m in found for p in m.parameters())
        for m in found:
            m.requires_grad_(False)
    if parts and not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--freeze {','.join(parts)}: nothing of model {VARIANTS[variant].model!r} "
                         f"(--variant {variant}) is left to train")
    return frozen
