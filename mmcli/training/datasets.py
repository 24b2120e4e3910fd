"""Training data: folders of radiographs with masks and labels, label budgets, splits, a cache.

A dataset folder holds images (``.png``, ``.jpg``, DICOM, ...), optionally
``masks/<stem>.png`` (binary lung masks) and ``labels.csv`` (``file,label``). Masks are
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

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmcli.data.transforms import resize_to_model
from mmcli.errors import InputError
from mmcli.io.readers import SUPPORTED_SUFFIXES, read_radiograph

logger = logging.getLogger(__name__)

__all__ = ["ImageTable", "Sample", "Splits", "epoch_batches", "load_table", "make_splits", "scan_folders",
           "stratified_pick"]


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


def _labels_csv(root: Path, class_names: Sequence[str]) -> dict[str, int]:
    path = root / "labels.csv"
    if not path.is_file():
        return {}
    out: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise InputError(f"{path}: needs the columns 'file,label'")
        for row in reader:
            label = (row["label"] or "").strip().lower()
            if label not in class_names:
                raise InputError(f"{path}: label {row['label']!r} of {row['file']} is not one of {list(class_names)}")
            out[row["file"].strip()] = class_names.index(label)
    return out


PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "subject_id")
"""Column names (compared in lower case) that give an image's patient id."""


def _patients_csv(root: Path) -> dict[str, str]:
    """``file -> patient id`` from ``labels.csv`` or ``meta.csv`` of ``root`` (first with a patient column)."""
    for name in ("labels.csv", "meta.csv"):
        path = root / name
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {c.strip().lower(): c for c in reader.fieldnames or ()}
            column = next((fields[c] for c in PATIENT_COLUMNS if c in fields), None)
            if column is None or "file" not in fields:
                continue
            return {row[fields["file"]].strip(): (row[column] or "").strip() for row in reader
                    if (row[column] or "").strip()}
    return {}


def scan_folders(seg_dirs: Sequence[Path], cls_dirs: Sequence[Path], class_names: Sequence[str]) -> list[Sample]:
    """All images of the folders (not recursive), with masks from seg folders and labels from cls folders.

    Raises:
        InputError: a folder is missing or holds no image, or a label is unknown.
    """
    found: dict[Path, Sample] = {}
    for root in list(seg_dirs) + list(cls_dirs):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"Data folder not found: {root}")
        images = sorted(p for p in root.iterdir()
                        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith("."))
        if not images:
            raise InputError(f"Found 0 images in {root}. Supported: {' '.join(SUPPORTED_SUFFIXES)}")
        labels = _labels_csv(root, class_names) if root in map(Path, cls_dirs) else {}
        patients = _patients_csv(root)
        use_masks = root in map(Path, seg_dirs)
        for p in images:
            key = p.resolve()
            old = found.get(key, Sample(key, str(root)))
            mask = root / "masks" / f"{p.stem}.png"
            patient = patients.get(p.name)
            found[key] = Sample(
                key, old.source,
                mask=mask if use_masks and mask.is_file() else old.mask,
                label=labels.get(p.name, old.label),
                patient=old.patient if patient is None else f"{root}::{patient}",
            )
    return [found[k] for k in sorted(found)]


def stratified_pick(labels: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """Positions of ``n`` items drawn at random, class proportions kept (largest remainder).

    Args:
        labels: class index per item.
        n: how many to keep (0 <= n <= len(labels)).
    """
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise InputError(f"cannot keep {n} labels out of {len(labels)}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels) if len(labels) else counts * 0.0
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[c] += 1
    picked: list[int] = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
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


def _budget(n: int | None, available: int, what: str) -> int:
    if n is None:
        return available
    if n > available:
        raise InputError(f"--{what}-labels {n}: only {available} labelled training images are available")
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
    n_seg = _budget(seg_labels, len(masked_train), "seg")
    seg_l = sorted(np.random.default_rng([seed, 2]).permutation(masked_train)[:n_seg].tolist())
    labelled_train = [i for i in train if samples[i].label is not None]
    n_cls = _budget(cls_labels, len(labelled_train), "cls")
    picks = stratified_pick([samples[i].label for i in labelled_train], n_cls, np.random.default_rng([seed, 3]))
    cls_l = [labelled_train[j] for j in picks]
    seg_set, cls_set = set(seg_l), set(cls_l)
    return Splits(
        val_seg=val_seg, val_cls=val_cls, seg_labelled=seg_l,
        seg_unlabelled=[i for i in train if i not in seg_set], cls_labelled=cls_l,
        cls_unlabelled=[i for i in train if i not in cls_set],
    )


class _Reader(Dataset[tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]]):
    def __init__(self, samples: Sequence[Sample], size: int) -> None:
        self.samples, self.size = list(samples), size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, str | None]:
        s = self.samples[i]
        try:
            image = resize_to_model(torch.from_numpy(read_radiograph(s.path).pixels), self.size).clamp_(0, 1)
            mask = None
            if s.mask is not None:
                m = resize_to_model(torch.from_numpy(read_radiograph(s.mask).pixels), self.size)
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


def load_table(samples: Sequence[Sample], size: int, workers: int = 0) -> tuple[ImageTable, list[tuple[int, str]]]:
    """Read and resize every sample (in ``workers`` processes).

    Returns:
        The table and ``(position, reason)`` of each sample that could not be read; such a
        sample keeps a zero image, no mask and no label: drop it with :meth:`ImageTable.subset`.
    """
    n = len(samples)
    images = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    has_mask = torch.zeros(n, dtype=torch.bool)
    labels = torch.tensor([-1 if s.label is None else s.label for s in samples], dtype=torch.long)
    errors: list[str] = []
    loader = DataLoader(_Reader(samples, size), batch_size=None, num_workers=workers)
    for i, image, mask, error in loader:
        if error is not None:
            errors.append((i, error))
            labels[i] = -1
            continue
        images[i] = image
        if mask is not None:
            masks[i], has_mask[i] = mask, True
    return ImageTable(images, masks, has_mask, labels), errors


def epoch_batches(pool: Sequence[int], steps: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, batch_size) positions from ``pool``: shuffled passes over it, as many as needed."""
    if not pool:
        raise InputError("an active training stream has no images")
    need = steps * batch_size
    chunks = [torch.randperm(len(pool), generator=gen) for _ in range(-(-need // len(pool)))]
    order = torch.cat(chunks)[:need]
    return torch.as_tensor(list(pool), dtype=torch.long)[order].reshape(steps, batch_size)
