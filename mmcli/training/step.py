"""One training step over the five MultiMix streams, and validation.

Streams: ``seg_l`` (labelled segmentation), ``seg_u`` (unlabelled segmentation),
``cls_l`` (labelled classification), ``cls_weak`` and ``cls_strong`` (two views of the same
unlabelled classification images). The model runs in stages so each stream pays only for
what its losses need: segmentation streams go through the full model (bridge included),
classification streams through encoder and classifier only, and the weak view, whose
pseudo labels carry no gradient, under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mmcli import metrics as M
from mmcli.config import PreprocessConfig
from mmcli.data.transforms import normalize
from mmcli.models.multimix import MultiMix
from mmcli.runtime import autocast
from mmcli.training.augment import site_augment, strong_augment, weak_augment
from mmcli.training.config import Variant
from mmcli.training.datasets import ImageTable
from mmcli.training.losses import (
    LossWeights,
    cross_entropy,
    foreground_kl_consistency,
    pseudo_label_loss,
    soft_dice_loss,
    total_loss,
)

__all__ = ["StepBatch", "cls_logits", "evaluate", "make_batch", "seg_logits", "train_step"]


def seg_logits(model: MultiMix, x: Tensor) -> Tensor:
    """(B, 1, S, S) images -> (B, 1, S, S) mask logits, through the bridge when the model has one."""
    if model.bridge:
        return model(x).seg_logits
    return model.decode(model.encode(x))


def cls_logits(model: MultiMix, x: Tensor) -> Tensor:
    """(B, 1, S, S) images -> (B, C) logits from encoder and classifier only."""
    return model.classify(model.encode(x).bottleneck)


@dataclass
class StepBatch:
    """Normalised inputs (B, 1, S, S) per stream (absent streams are None), masks and labels."""

    seg_l: Tensor | None = None
    seg_l_masks: Tensor | None = None
    seg_u: Tensor | None = None
    cls_l: Tensor | None = None
    cls_l_labels: Tensor | None = None
    cls_weak: Tensor | None = None
    cls_strong: Tensor | None = None

    def to(self, device: torch.device) -> StepBatch:
        return StepBatch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in vars(self).items()})


def make_batch(
    table: ImageTable, index: dict[str, Tensor], gen: torch.Generator, pre: PreprocessConfig, *, hflip: bool,
    site_ops: tuple[str, ...] = (),
) -> StepBatch:
    """Augment and normalise one step's images.

    Args:
        index: positions (B,) into ``table`` for the pools ``seg_l``, ``seg_u``, ``cls_l``,
            ``cls_u`` that are active; ``cls_u`` gives both the weak and the strong view.
        site_ops: site-shift augmentations (:func:`mmcli.training.augment.site_augment`) for the
            labelled streams and the strong view; the weak views that set pseudo labels and
            the consistency target stay as they are.
    """
    b = StepBatch()
    if "seg_l" in index:
        i = index["seg_l"]
        x, m = site_augment(table.images[i], gen, site_ops, masks=table.masks[i].float())
        x, m = weak_augment(x, gen, masks=m, hflip=hflip)
        b.seg_l, b.seg_l_masks = normalize(x, pre), m
    if "seg_u" in index:
        b.seg_u = normalize(weak_augment(table.images[index["seg_u"]], gen, hflip=hflip)[0], pre)
    if "cls_l" in index:
        i = index["cls_l"]
        x = site_augment(table.images[i], gen, site_ops)[0]
        b.cls_l, b.cls_l_labels = normalize(weak_augment(x, gen, hflip=hflip)[0], pre), table.labels[i]
    if "cls_u" in index:
        u = table.images[index["cls_u"]]
        b.cls_weak = normalize(weak_augment(u, gen, hflip=hflip)[0], pre)
        strong = strong_augment(weak_augment(site_augment(u, gen, site_ops)[0], gen, hflip=hflip)[0], gen)[0]
        b.cls_strong = normalize(strong, pre)
    return b


def train_step(
    model: MultiMix, batch: StepBatch, variant: Variant, weights: LossWeights, amp: contextlib.AbstractContextManager
) -> tuple[Tensor, dict[str, float]]:
    """Forward the active streams and return the total loss (not yet backpropagated) and its terms."""
    terms: dict[str, Tensor] = {}
    stats: dict[str, float] = {}
    with amp:
        if variant.seg and batch.seg_l is not None and batch.seg_l_masks is not None:
            parts = [batch.seg_l] + ([batch.seg_u] if variant.consistency and batch.seg_u is not None else [])
            logits = seg_logits(model, torch.cat(parts)).float()
            lab = logits[: batch.seg_l.shape[0]]
            terms["dice"] = soft_dice_loss(lab, batch.seg_l_masks)
            if len(parts) > 1:
                terms["consistency"] = foreground_kl_consistency(lab, logits[batch.seg_l.shape[0] :])
        if variant.cls and batch.cls_l is not None and batch.cls_l_labels is not None:
            strong = batch.cls_strong if variant.pseudo and batch.cls_weak is not None else None
            parts = [batch.cls_l] + ([strong] if strong is not None else [])
            logits = cls_logits(model, torch.cat(parts)).float()
            n = batch.cls_l.shape[0]
            terms["ce"] = cross_entropy(logits[:n], batch.cls_l_labels, weights.label_smoothing)
            if strong is not None and batch.cls_weak is not None:
                with torch.no_grad():
                    weak = cls_logits(model, batch.cls_weak).float()
                terms["pseudo"], mask = pseudo_label_loss(weak, logits[n:], weights.threshold)
                stats["mask_rate"] = float(mask.mean())
    loss = total_loss(terms, weights)
    stats.update({k: float(v.detach()) for k, v in terms.items()})
    stats["loss"] = float(loss.detach())
    return loss, stats


@torch.no_grad()
def evaluate(
    model: MultiMix, table: ImageTable, val_seg: list[int], val_cls: list[int], pre: PreprocessConfig,
    *, batch_size: int, device: torch.device, precision: str,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Run the model (eval mode) on the validation images.

    Returns:
        Metrics for the heads present with validation images: ``val_dice`` (binarised at
        probability 0.5, mean per image), ``val_acc`` and ``val_auc`` (pneumonia = class 1
        vs the rest), all three from :mod:`mmcli.metrics`, and ``val_nll``; the
        classification logits (N, C) and labels (N,) on the CPU.
    """
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    logits_all, labels_all = torch.zeros(0, max(model.num_classes, 1)), torch.zeros(0, dtype=torch.long)
    try:
        if model.seg_head and val_seg:
            dice = []
            for start in range(0, len(val_seg), batch_size):
                idx = torch.as_tensor(val_seg[start : start + batch_size])
                x = normalize(table.images[idx], pre).to(device)
                with autocast(device, precision):
                    pred = (seg_logits(model, x).float() >= 0).cpu().numpy()
                refs = table.masks[idx].cpu().numpy()
                dice += [M.overlap_metrics(p[0], r[0])["dice"] for p, r in zip(pred, refs, strict=True)]
            metrics["val_dice"] = float(np.mean(dice))
        if model.cls_head and val_cls:
            chunks = []
            for start in range(0, len(val_cls), batch_size):
                idx = torch.as_tensor(val_cls[start : start + batch_size])
                with autocast(device, precision):
                    chunks.append(cls_logits(model, normalize(table.images[idx], pre).to(device)).float().cpu())
            logits_all, labels_all = torch.cat(chunks), table.labels[torch.as_tensor(val_cls)].cpu()
            y = labels_all.numpy()
            metrics["val_acc"] = M.accuracy(y, logits_all.argmax(1).numpy())
            metrics["val_auc"] = M.roc_auc(y == 1, torch.softmax(logits_all, 1)[:, 1].numpy())
            metrics["val_nll"] = float(torch.nn.functional.cross_entropy(logits_all, labels_all))
    finally:
        model.train(was_training)
    return metrics, logits_all, labels_all
