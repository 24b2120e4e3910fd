"""MultiMix losses as pure functions of logits and targets.

Notation (MULTIMIX.md): ``Lc = CE(labelled) + lambda_u * pseudo_label_loss(weak, strong, t)``,
``Ls = alpha * soft_dice_loss(labelled) + beta * foreground_kl_consistency(labelled, unlabelled)``,
total ``Lc + Ls``. Every function returns a scalar tensor that is differentiable in its
logits (except where stated) and computes in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcli.training.config import LossWeights

__all__ = [
    "LossWeights",
    "cross_entropy",
    "foreground_kl_consistency",
    "pseudo_label_loss",
    "soft_dice_loss",
    "total_loss",
]


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy: logits (B, C), integer labels (B,) -> scalar. With ``label_smoothing`` e the
    target is ``(1 - e) * onehot + e / C`` (Szegedy et al., 2016): ``1 - e/2`` and ``e/2`` for two classes."""
    return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)


def soft_dice_loss(mask_logits: Tensor, masks: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss per image, averaged over the batch.

    ``1 - (2 * sum(p * y) + smooth) / (sum(p) + sum(y) + smooth)`` per image with
    ``p = sigmoid(mask_logits)``, sums over all pixels of that image.

    Args:
        mask_logits: (B, 1, H, W) logits.
        masks: (B, 1, H, W) targets in {0, 1} (soft targets in [0, 1] work too).
    """
    p = torch.sigmoid(mask_logits.float()).flatten(1)
    y = masks.float().flatten(1)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return (1 - dice).mean()


def pseudo_label_loss(weak_logits: Tensor, strong_logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """FixMatch term: mean over the whole unlabelled batch of CE(strong, argmax weak) * 1(conf >= t).

    The weak logits are detached (pseudo labels carry no gradient). Samples whose
    confidence equals the threshold exactly are kept.

    Args:
        weak_logits: (B, C) logits of the weakly augmented views.
        strong_logits: (B, C) logits of the strongly augmented views of the same images.
        threshold: confidence ``t``; a sample counts when ``max softmax(weak) >= t``.

    Returns:
        The loss (scalar) and the mask (B,) float of samples that counted.
    """
    probs = torch.softmax(weak_logits.detach().float(), dim=1)
    conf, pseudo = probs.max(dim=1)
    # Compare in float64 so that a Python-float threshold is used exactly, not rounded to float32.
    mask = (conf.double() >= threshold).float()
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * mask).mean(), mask


def _log_mean_sigmoid(logits: Tensor) -> tuple[Tensor, Tensor]:
    """log of the batch mean of sigmoid(z) and of 1 - sigmoid(z): (B, 1, H, W) -> 2 x (H, W).

    Computed as ``logsumexp(logsigmoid(z)) - log B``, stable for any logit.
    """
    z = logits.float().flatten(1)
    log_b = math.log(z.shape[0])
    log_p = torch.logsumexp(F.logsigmoid(z), dim=0) - log_b
    log_q = torch.logsumexp(F.logsigmoid(-z), dim=0) - log_b
    shape = logits.shape[-2:]
    return log_p.reshape(shape), log_q.reshape(shape)


def foreground_kl_consistency(labelled_logits: Tensor, unlabelled_logits: Tensor) -> Tensor:
    """Foreground-map KL consistency between labelled and unlabelled segmentations.

    Each batch is summarised by its mean foreground probability map
    ``P(x) = mean_b sigmoid(z_b(x))``, a Bernoulli distribution per pixel. The term is
    the pixel-mean ``KL(Bern(P_l) || Bern(P_u))``: it pulls the lung-probability layout
    predicted on unlabelled images towards the one learnt on labelled images. The
    labelled map is the target and is detached, so the gradient acts on the unlabelled
    predictions only. (The authors' version applied a softmax over one channel and was
    identically zero.)

    Args:
        labelled_logits: (Bl, 1, H, W) mask logits of labelled images.
        unlabelled_logits: (Bu, 1, H, W) mask logits of unlabelled images.
    """
    if labelled_logits.shape[-2:] != unlabelled_logits.shape[-2:]:
        raise ValueError(
            f"consistency needs maps of one size, got {tuple(labelled_logits.shape)} and "
            f"{tuple(unlabelled_logits.shape)}"
        )
    log_pl, log_ql = _log_mean_sigmoid(labelled_logits.detach())
    log_pu, log_qu = _log_mean_sigmoid(unlabelled_logits)
    kl = log_pl.exp() * (log_pl - log_pu) + log_ql.exp() * (log_ql - log_qu)
    return kl.mean()


def total_loss(terms: dict[str, Tensor], weights: LossWeights) -> Tensor:
    """``ce + lambda_u * pseudo + alpha * dice + beta * consistency`` over the terms present.

    Args:
        terms: any of ``ce``, ``pseudo``, ``dice``, ``consistency`` (scalars).
    """
    factors = {"ce": 1.0, "pseudo": weights.lambda_u, "dice": weights.alpha, "consistency": weights.beta}
    unknown = set(terms) - set(factors)
    if unknown:
        raise ValueError(f"unknown loss terms {sorted(unknown)}")
    if not terms:
        raise ValueError("no loss term is active")
    parts = [factors[k] * v for k, v in terms.items()]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
