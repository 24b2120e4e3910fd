"""Training data: folders of radiographs with masks and labels, label budgets, splits, a cache.

Dataset folders follow the one rule of :mod:`mmcli.data.folders`: images at any depth,
masks in ``masks/<key>.png``, ``labels.csv`` (``file,label``) and patient ids. Masks are
read from the ``--seg-data`` folders and labels from the ``--cls-data`` folders; a folder
named in both gives both. Every training image that is not a labelled example of a task
is an unlabelled example for that task (so classification images feed the unlabelled
segmentation stream and segmentation images the unlabelled classification stream).

Splits are drawn from one seed: first a validation part of the masked images and,
stratified by class, of the labelled images; then the label budgets among the rest.
Validation images never enter training.

Validation is drawn by *patient* where the folder says who the patient is: a column
``patient``, ``patient_id``, ``patientid`` or ``subject_id`` (MIMIC-CXR's name; any
case) in the folder's ``labels.csv`` or ``meta.csv`` (``file,...,patient``). All images
of a patient then fall on the same side, so several films of one child cannot sit in
both training and validation. Images without a patient id are patients of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmcli.data.folders import LABELS_CSV, MASKS_DIR, FolderImage, read_mask, scan_dataset
from mmcli.data.transforms import resize_to_model
from mmcli.errors import InputError
from mmcli.io.readers import read_radiograph

logger = logging.getLogger(__name__)

__all__ = ["ImageTable", "Sample", "Splits", "epoch_batches", "load_table", "make_splits", "scan_folders",
           "source_rates", "stratified_pick"]


@dataclass(frozen=True)
class Sample:
    """One image: its mask file (None: no mask), class index (None: no label) and patient.

    ``patient`` is the folder-qualified patient id (``"<folder>::<id>"``), or None when
    the folder does not say: the image is then a patient of its own.
    """

    path: Path
    source: str
    mask: Path | None = None
    label: int | None = None
    patient: str | None = None


def scan_folders(seg_dirs: Sequence[Path], cls_dirs: Sequence[Path], class_names: Sequence[str],
                 unlabelled_dirs: Sequence[Path] = ()) -> list[Sample]:
    """All images of the folders (recursive, :mod:`mmcli.data.folders`), masks from seg folders, labels from cls.

    Images of ``unlabelled_dirs`` come with neither (a masks/ folder or labels.csv there is
    ignored): they feed the unlabelled streams of both tasks, e.g. a site's own films.

    An image found through several folders is one sample (by resolved path) that keeps its
    first folder as ``source`` and takes a mask, label or patient id from any of them; two
    folders that give it different labels are refused.

    Args:
        class_names: the model's classes; each folder label (a name of
            :data:`mmcli.config.CLASS_NAMES`) becomes its index in them.

    Raises:
        InputError: a folder is missing or holds no image, a label is unknown, or an image
            has two different labels (in one ``labels.csv`` or through two folders).
    """
    seg, cls, free = [Path(d) for d in seg_dirs], [Path(d) for d in cls_dirs], [Path(d) for d in unlabelled_dirs]
    found: dict[Path, Sample] = {}
    labelled_by: dict[Path, Path] = {}
    for root in dict.fromkeys(seg + cls + free):
        for image in _scan(root, masks=root in seg, labels=root in cls):
            old = found.get(image.path, Sample(image.path, str(root)))
            if image.label is not None:
                if old.label is not None and class_names[old.label] != image.label:
                    raise InputError(f"{image.path} is labelled {class_names[old.label]!r} in "
                                     f"{labelled_by[image.path] / LABELS_CSV} and {image.label!r} in "
                                     f"{root / LABELS_CSV} (one label per image)")
                labelled_by.setdefault(image.path, root)
            found[image.path] = Sample(
                image.path, old.source,
                mask=image.mask or old.mask,
                label=old.label if image.label is None else list(class_names).index(image.label),
                patient=old.patient if image.patient is None else f"{root}::{image.patient}",
            )
    _warn_lacking(seg, cls)
    return [found[k] for k in sorted(found)]


def _scan(root: Path, *, masks: bool, labels: bool) -> list[FolderImage]:
    """:func:`scan_dataset`, with the option that named the folder in its errors."""
    option = "--seg-data" if masks else "--cls-data" if labels else "--unlabelled-data"
    if not root.is_dir():
        raise InputError(f"{option} {root}: folder not found")
    try:
        images = scan_dataset(root, masks=masks, labels=labels)
    except InputError as err:
        raise InputError(f"{option} {root}: {err}") from None
    return images


def _warn_lacking(seg: Sequence[Path], cls: Sequence[Path]) -> None:
    """Warn of a --seg-data folder without ``masks/`` or a --cls-data folder without ``labels.csv``
    beside others that have theirs (its images then train as unlabelled ones; where no folder
    has any, :func:`mmcli.training.streams.check_streams` refuses the run instead)."""
    seg, cls = list(dict.fromkeys(seg)), list(dict.fromkeys(cls))
    bare_seg = [d for d in seg if not (d / MASKS_DIR).is_dir()]
    bare_cls = [d for d in cls if not (d / LABELS_CSV).is_file()]
    for d in bare_seg if len(bare_seg) < len(seg) else []:
        logger.warning("--seg-data %s has no masks/ folder: its images train without masks (each image needs "
                       "masks/<stem>.png; pass the folder as --unlabelled-data to say it has none)", d)
    for d in bare_cls if len(bare_cls) < len(cls) else []:
        logger.warning("--cls-data %s has no labels.csv: its images train without class labels (labels.csv needs "
                       "the columns file,label; pass the folder as --unlabelled-data to say it has none)", d)


def stratified_pick(labels: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """Positions of ``n`` items drawn at random, class proportions kept (largest remainder).

    Args:
        labels: class index per item.
        n: how many to keep (0 <= n <= len(labels)).
    """
    classes_of = np.asarray(labels)
    if not 0 <= n <= len(classes_of):
        raise InputError(f"cannot keep {n} labels out of {len(classes_of)}")
    classes, counts = np.unique(classes_of, return_counts=True)
    quota = counts * n / len(classes_of) if len(classes_of) else counts * 0.0
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[c] += 1
    picked: list[int] = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(classes_of == c)
        picked += rng.permutation(members)[:k].tolist()
    return sorted(picked)


@dataclass
class Splits:
    """Positions into the sample list of each role."""

    val_seg: list[int]
    val_cls: list[int]
    seg_labelled: list[int]
    seg_unlabelled: list[int]
    cls_labelled: list[int]
    cls_unlabelled: list[int]

    def rows(self, samples: Sequence[Sample], class_names: Sequence[str]) -> list[dict[str, Any]]:
        """One CSV row per sample: file, source, patient, split, has_mask, label, seg_role, cls_role."""
        val = set(self.val_seg) | set(self.val_cls)
        seg_l, cls_l = set(self.seg_labelled), set(self.cls_labelled)
        rows = []
        for i, s in enumerate(samples):
            rows.append({
                "file": str(s.path), "source": s.source, "patient": s.patient or "",
                "split": "val" if i in val else "train",
                "has_mask": int(s.mask is not None), "label": None if s.label is None else class_names[s.label],
                "seg_role": "val" if i in self.val_seg else "-" if i in val else
                            "labelled" if i in seg_l else "unlabelled",
                "cls_role": "val" if i in self.val_cls else "-" if i in val else
                            "labelled" if i in cls_l else "unlabelled",
            })
        return rows


SPLIT_COLUMNS = ("file", "source", "patient", "split", "has_mask", "label", "seg_role", "cls_role")


def _budget(n: int | None, available: int, what: str, val_fraction: float) -> int:
    if n is None:
        return available
    if n > available:
        has = "a mask" if what == "seg" else "a class label"
        raise InputError(f"--{what}-labels {n}: only {available} training images have {has} (validation, "
                         f"--val-fraction {val_fraction}, took its share first): pass at most {available}, or all")
    return n


def _groups(samples: Sequence[Sample]) -> list[str]:
    """Patient key of each sample: its patient id, or its own position when it has none."""
    return [s.patient if s.patient is not None else f"#{i}" for i, s in enumerate(samples)]


def make_splits(
    samples: Sequence[Sample], *, seg_labels: int | None, cls_labels: int | None, val_fraction: float, seed: int
) -> Splits:
    """Validation split by patient, then label budgets (None: all), all drawn from ``seed``.

    A share ``val_fraction`` of the patients with masks goes to segmentation validation;
    then, stratified by class (a patient's class is that of their first labelled image),
    that share of the remaining patients with labels goes to classification validation.
    Every image of a validation patient is left out of training. When each image is its
    own patient this is a plain split by image.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    groups = _groups(samples)
    rng = np.random.default_rng([seed, 1])
    masked_groups = list(dict.fromkeys(groups[i] for i, s in enumerate(samples) if s.mask is not None))
    n_val = round(val_fraction * len(masked_groups))
    val_seg_groups = {masked_groups[j] for j in rng.permutation(len(masked_groups))[:n_val]}
    group_label: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.label is not None and groups[i] not in val_seg_groups:
            group_label.setdefault(groups[i], s.label)
    label_groups = list(group_label)
    picks = stratified_pick([group_label[g] for g in label_groups], round(val_fraction * len(label_groups)), rng)
    val_cls_groups = {label_groups[j] for j in picks}
    val_seg = [i for i, s in enumerate(samples) if s.mask is not None and groups[i] in val_seg_groups]
    val_cls = [i for i, s in enumerate(samples) if s.label is not None and groups[i] in val_cls_groups]
    held = val_seg_groups | val_cls_groups
    train = [i for i in range(len(samples)) if groups[i] not in held]
    masked_train = [i for i in train if samples[i].mask is not None]
    n_seg = _budget(seg_labels, len(masked_train), "seg", val_fraction)
    seg_l = sorted(np.random.default_rng([seed, 2]).permutation(masked_train)[:n_seg].tolist())
    train_labels = {i: label for i in train if (label := samples[i].label) is not None}
    labelled_train = list(train_labels)
    n_cls = _budget(cls_labels, len(labelled_train), "cls", val_fraction)
    picks = stratified_pick(list(train_labels.values()), n_cls, np.random.default_rng([seed, 3]))
    cls_l = [labelled_train[j] for j in picks]
    seg_set, cls_set = set(seg_l), set(cls_l)
    return Splits(
        val_seg=val_seg, val_cls=val_cls, seg_labelled=seg_l,
        seg_unlabelled=[i for i in train if i not in seg_set], cls_labelled=cls_l,
        cls_unlabelled=[i for i in train if i not in cls_set],
    )


class _Reader(Dataset[tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]]):
    def __init__(self, samples: Sequence[Sample], size: int, voi_lut: bool = False) -> None:
        self.samples, self.size, self.voi_lut = list(samples), size, voi_lut

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        """``(i, image (1, S, S) float32, mask (1, S, S) uint8 or None, None)``, or ``(i, None, None, reason)``."""
        s = self.samples[i]
        try:
            pixels = read_radiograph(s.path, voi_lut=self.voi_lut).pixels
            image = resize_to_model(torch.from_numpy(pixels), self.size).clamp_(0, 1)
            mask = None
            if s.mask is not None:
                m = resize_to_model(torch.from_numpy(read_mask(s.mask, pixels.shape)), self.size)
                mask = (m >= 0.5).to(torch.uint8)
            return i, image[None], None if mask is None else mask[None], None
        except Exception as err:  # reported and skipped by the caller
            return i, None, None, f"{type(err).__name__}: {err}"


@dataclass
class ImageTable:
    """Every image in memory, model-sized, before normalisation.

    images: (N, 1, S, S) float32 in [0, 1] (``resize_to_model`` then clamp, the first
    steps of :func:`mmcli.data.transforms.preprocess`); masks: (N, 1, S, S) uint8 in
    {0, 1} (zeros where ``has_mask`` is False); labels: (N,) long, -1 where unlabelled.
    """

    images: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    labels: torch.Tensor

    def subset(self, keep: Sequence[int]) -> ImageTable:
        """The rows ``keep``, in that order."""
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        return ImageTable(self.images[idx], self.masks[idx], self.has_mask[idx], self.labels[idx])

    def to(self, device: torch.device | str) -> ImageTable:
        """The table on ``device`` (on a GPU, batches are then cut and augmented there)."""
        return ImageTable(*(t.to(device) for t in (self.images, self.masks, self.has_mask, self.labels)))


def load_table(
    samples: Sequence[Sample], size: int, workers: int = 0, *, voi_lut: bool = False
) -> tuple[ImageTable, list[tuple[int, str]]]:
    """Read and resize every sample (in ``workers`` processes).

    Images are read with :func:`mmcli.io.readers.read_radiograph` (``voi_lut`` for DICOM)
    and masks with :func:`mmcli.data.folders.read_mask`; a mask is resized to the model
    grid and thresholded at 0.5, and a mask whose size differs from its image's fails the sample.

    Returns:
        The table and ``(position, reason)`` of each sample that could not be read; such a
        sample keeps a zero image, no mask and no label: drop it with :meth:`ImageTable.subset`.
    """
    n = len(samples)
    images = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    has_mask = torch.zeros(n, dtype=torch.bool)
    labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    errors: list[tuple[int, str]] = []
    loader = DataLoader(_Reader(samples, size, voi_lut), batch_size=None, num_workers=workers)
    for i, image, mask, error in loader:
        if error is not None:
            errors.append((i, error))
            labels[i] = -1
            continue
        images[i] = image
        if mask is not None:
            masks[i], has_mask[i] = mask, True
    return ImageTable(images, masks, has_mask, labels), errors


def _passes(pool: Sequence[int], need: int, gen: torch.Generator) -> torch.Tensor:
    """``need`` positions from ``pool``: shuffled passes over it, as many as needed."""
    chunks = [torch.randperm(len(pool), generator=gen) for _ in range(-(-need // len(pool)))]
    return torch.as_tensor(list(pool), dtype=torch.long)[torch.cat(chunks)[:need]]


def epoch_batches(pool: Sequence[int], steps: int, batch_size: int, gen: torch.Generator, *,
                  sources: Sequence[str] | None = None) -> torch.Tensor:
    """(steps, batch_size) positions from ``pool``: shuffled passes over it, as many as needed.

    With ``sources`` (the source of every entry of ``pool``), every source is drawn at the same
    rate whatever its size: the slots go round the sources in an order shuffled anew every
    round, and each source fills its slots with shuffled passes over its own images. So
    among any ``k`` consecutive slots (``k`` sources) each source has one.
    """
    if not pool:
        raise InputError("an active training stream has no images")
    need = steps * batch_size
    if sources is None or len(set(sources)) < 2:
        return _passes(pool, need, gen).reshape(steps, batch_size)
    names = sorted(set(sources))
    rounds = -(-need // len(names))
    slot_source = torch.cat([torch.randperm(len(names), generator=gen) for _ in range(rounds)])[:need]
    out = torch.empty(need, dtype=torch.long)
    for k, name in enumerate(names):
        slots = torch.nonzero(slot_source == k).flatten()
        members = [p for p, s in zip(pool, sources, strict=True) if s == name]
        out[slots] = _passes(members, len(slots), gen)
    return out.reshape(steps, batch_size)


def source_rates(pool: Sequence[int], sources: Sequence[str], *, balanced: bool) -> dict[str, float]:
    """The share of a stream's draws that each source gets (rounded to 4 places), for run.json."""
    names = sorted(set(sources))
    if balanced:
        return {n: round(1 / len(names), 4) for n in names}
    return {n: round(sum(s == n for s in sources) / len(pool), 4) for n in names}
