"""Why a training stream has no images, said in the words of the folders and options a person passed.

A variant draws its batches from up to four pools of training images (see
:meth:`mmcli.training.config.Variant.pools`): images with a mask, images without one,
images with a class label, images without one. :func:`check_streams` refuses a run whose
variant needs a pool that came out empty, naming the folder, what it lacks (a ``masks/``
folder, ``labels.csv``, matching rows) and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mmcli.data.folders import LABELS_CSV, MASKS_DIR
from mmcli.errors import UsageError
from mmcli.training.config import TrainConfig
from mmcli.training.datasets import Sample

__all__ = ["STREAM_NEEDS", "check_streams"]

STREAM_NEEDS = {
    "seg_l": "learns lung masks from training images with a mask",
    "seg_u": "compares its masks of training images that have none (the consistency term)",
    "cls_l": "learns pneumonia from training images with a class label",
    "cls_u": "learns from its own confident answers on training images without a class label (pseudo labels)",
}
"""What each pool is for, as the error says it."""


def check_streams(cfg: TrainConfig, pools: Mapping[str, Sequence[int]], scanned: Sequence[Sample],
                  samples: Sequence[Sample]) -> None:
    """Refuse a run whose variant needs a pool that is empty.

    Args:
        pools: the variant's pools (positions into ``samples``).
        scanned: every image the folders hold; ``samples``: those that could be read.

    Raises:
        UsageError: a pool is empty; the message says which folders lack what, and the fix.
    """
    for name, pool in pools.items():
        if not pool:
            why = _WHY[name](cfg, scanned, samples)
            raise UsageError(f"--variant {cfg.variant} {STREAM_NEEDS[name]}, but there are none: {why}")


def _key(sample: Sample, folder: Path) -> str:
    """The key of ``sample`` in ``folder`` (its path there without the suffix), or its file stem."""
    try:
        return sample.path.relative_to(folder.resolve()).with_suffix("").as_posix()
    except ValueError:
        return sample.path.stem


def _lost(scanned: Sequence[Sample], samples: Sequence[Sample], has: str) -> str | None:
    """A reason naming the images with a mask (``has="mask"``) or label that could not be read."""
    kept = {s.path for s in samples}
    lost = sum(getattr(s, has) is not None and s.path not in kept for s in scanned)
    return f"{lost} image(s) with a {has} could not be read (see the warnings above)" if lost else None


_WORDS = {  # has -> (the budget option, what it keeps, which images, the --*-data option, the default reason)
    "mask": ("--seg-labels", "mask", "image with a mask", "images with masks", "--seg-data", "a mask"),
    "label": ("--cls-labels", "class label", "labelled image", "labelled images", "--cls-data", "a class label"),
}


def _ending(reasons: list[str], cfg: TrainConfig, scanned: Sequence[Sample], samples: Sequence[Sample], has: str,
            budget: int | None) -> str:
    """``reasons`` and the ones every stream shares: images with a ``has`` that could not be read, or all
    left out of training (a budget of 0, or all gone to validation); else the default reason."""
    option, kept, one, many, data, default = _WORDS[has]
    reasons = [*reasons, _lost(scanned, samples, has) or ""]
    if any(getattr(s, has) is not None for s in samples):
        reasons.append(f"{option} 0 keeps no {kept} for training" if budget == 0 else
                       f"every {one} went to validation (--val-fraction {cfg.val_fraction}): add {many} or lower "
                       "--val-fraction")
    return "; ".join(r for r in reasons if r) or f"no image of the {data} folders has {default}"


def _no_masks(cfg: TrainConfig, scanned: Sequence[Sample], samples: Sequence[Sample]) -> str:
    reasons = []
    for d in cfg.seg_data:
        folder, masks = Path(d), Path(d) / MASKS_DIR
        if not masks.is_dir():
            reasons.append(f"--seg-data {d} has no masks/ folder: each image needs masks/<stem>.png (its lung "
                           "mask, white on black, at the image's size); or pass the folder as --unlabelled-data")
        elif not any(s.mask is not None and s.mask.is_relative_to(masks) for s in scanned):
            first = next((s for s in scanned if s.source == str(folder)), None)
            example = f" (the mask of {first.path.name} is {masks / _key(first, folder)}.png)" if first else ""
            reasons.append(f"--seg-data {d}: no image has its mask in {masks}{example}")
    return _ending(reasons, cfg, scanned, samples, "mask", cfg.seg_labels)


def _no_labels(cfg: TrainConfig, scanned: Sequence[Sample], samples: Sequence[Sample]) -> str:
    reasons = []
    labelled = any(s.label is not None for s in scanned)
    for d in cfg.cls_data:
        table = Path(d) / LABELS_CSV
        if not table.is_file():
            reasons.append(f"--cls-data {d} has no labels.csv: it needs one with the columns file,label (a row "
                           "such as 'a.png,pneumonia' per image; label normal or pneumonia); or pass the folder as "
                           "--unlabelled-data")
        elif not labelled:
            reasons.append(f"{table} names none of the images of {d} (its file column holds paths relative to {d}, "
                           "such as sub/a.png)")
    return _ending(reasons, cfg, scanned, samples, "label", cfg.cls_labels)


def _all_masked(cfg: TrainConfig, scanned: Sequence[Sample], samples: Sequence[Sample]) -> str:
    return ("every training image has a mask: pass images without masks with --unlabelled-data DIR (or "
            "--cls-data DIR), keep fewer masks with --seg-labels N, or choose --variant umtl-ssl (no consistency "
            "term)")


def _all_labelled(cfg: TrainConfig, scanned: Sequence[Sample], samples: Sequence[Sample]) -> str:
    return ("every training image has a class label: pass images without labels with --unlabelled-data DIR (or "
            "--seg-data DIR), keep fewer labels with --cls-labels N, or choose a --variant without pseudo labels "
            "(enc, umtl)")


_WHY = {"seg_l": _no_masks, "seg_u": _all_masked, "cls_l": _no_labels, "cls_u": _all_labelled}
