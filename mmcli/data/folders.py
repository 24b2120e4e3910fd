"""The one rule for dataset folders: which images a folder holds, and each image's mask, label and patient.

Training (:func:`mmcli.training.datasets.scan_folders`) and evaluation
(:func:`mmcli.evaluation.find_references`) both read dataset folders through this module.

A dataset folder holds radiographs at any depth (whatever
:func:`mmcli.io.discover.discover_inputs` finds: ``.png``, ``.jpg``, DICOM, ...) and may hold

* ``masks/<key>.png``: the binary lung mask of the image with key ``<key>``, at that
  image's size; pixels above 127 are lung. ``masks/`` is never searched for images.
* ``labels.csv``: columns ``file,label`` (any case), the label one of
  :data:`mmcli.config.CLASS_NAMES` (any case, spaces stripped).
* a patient id: a column ``patient``, ``patient_id``, ``patientid`` or ``subject_id`` (any
  case) of ``labels.csv`` or, when ``labels.csv`` has none, of ``meta.csv`` (``file,...``).

The *key* of an image is its path relative to the folder, posix, without its image
suffix (``sub/a.png`` -> ``sub/a``; the suffix is kept only where two images would
otherwise share a key). A CSV row names the image whose key is its ``file`` value with
an image suffix dropped, so ``sub/a.png``, ``sub/a`` and ``sub/a.jpeg`` all name ``sub/a``.
Rows that give one key two different labels are refused; a repeated row is harmless.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from mmcli.config import CLASS_NAMES
from mmcli.errors import CaseError, InputError
from mmcli.io.discover import discover_inputs
from mmcli.io.readers import SUPPORTED_SUFFIXES
from mmcli.io.writers import read_mask_png

logger = logging.getLogger(__name__)

__all__ = ["LABELS_CSV", "MASKS_DIR", "META_CSV", "PATIENT_COLUMNS", "FolderImage", "read_labels_csv",
           "read_mask", "row_key", "scan_dataset"]

LABELS_CSV = "labels.csv"
META_CSV = "meta.csv"
MASKS_DIR = "masks"
PATIENT_COLUMNS = ("patient", "patient_id", "patientid", "subject_id")
"""Column names (compared in lower case) that give an image's patient id."""


@dataclass(frozen=True)
class FolderImage:
    """One image of a dataset folder.

    ``path`` is absolute and resolved; ``key`` is the image's key (see the module
    docstring); ``mask`` is ``masks/<key>.png`` when that file exists (and masks were
    asked for); ``label`` is a class name of :data:`~mmcli.config.CLASS_NAMES`;
    ``patient`` is the patient id as the folder writes it. None: the folder does not say.
    """

    path: Path
    key: str
    mask: Path | None = None
    label: str | None = None
    patient: str | None = None


def row_key(file: str) -> str:
    """The key that a CSV ``file`` value names: posix, an image suffix (any case) dropped."""
    path = PurePosixPath(file.strip().replace("\\", "/"))
    return str(path.with_suffix("")) if path.suffix.lower() in SUPPORTED_SUFFIXES else str(path)


@dataclass(frozen=True)
class _Table:
    """A CSV file: ``columns`` maps each lower-case, stripped column name to the name as written."""

    path: Path
    columns: dict[str, str]
    rows: list[dict[str, str | None]]

    @classmethod
    def read(cls, path: Path) -> _Table:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
                reader = csv.DictReader(f)
                rows = list(reader)
                names = reader.fieldnames or []
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise InputError(f"{path}: cannot be read as a UTF-8 CSV file ({err})") from None
        return cls(path, {n.strip().lower(): n for n in names}, rows)

    def cell(self, row: dict[str, str | None], column: str) -> str:
        """The stripped value of ``column`` (a lower-case name) in ``row``; "" when missing."""
        return (row.get(self.columns[column]) or "").strip()


def _labels(table: _Table) -> dict[str, str]:
    if not {"file", "label"} <= table.columns.keys():
        found = ", ".join(table.columns.values()) or "none"
        raise InputError(f"{table.path}: needs the columns file,label; found {found}")
    labels: dict[str, str] = {}
    for row in table.rows:
        file, label = table.cell(row, "file"), table.cell(row, "label").lower()
        if label not in CLASS_NAMES:
            raise InputError(f"{table.path}: label {row[table.columns['label']]!r} of {file!r} is not one of "
                             f"{', '.join(CLASS_NAMES)}")
        key = row_key(file)
        if labels.get(key, label) != label:
            raise InputError(f"{table.path}: {key!r} is labelled both {labels[key]!r} and {label!r} "
                             "(one label per image: remove the wrong row)")
        labels[key] = label
    return labels


def _patients(table: _Table) -> dict[str, str] | None:
    """``key -> patient id`` from the table's patient column; None when it has no file or patient column."""
    column = next((c for c in PATIENT_COLUMNS if c in table.columns), None)
    if column is None or "file" not in table.columns:
        return None
    return {row_key(table.cell(row, "file")): pid for row in table.rows if (pid := table.cell(row, column))}


def read_labels_csv(path: Path) -> dict[str, str]:
    """A ``labels.csv`` as ``{key: class name}`` (keys as the module docstring says).

    Raises:
        InputError: the file lacks the columns ``file,label`` or a label is not a class name.
    """
    return _labels(_Table.read(Path(path)))


def scan_dataset(folder: Path, *, masks: bool = True, labels: bool = True) -> list[FolderImage]:
    """Every image of ``folder`` (recursive, ``masks/`` left out, sorted), with its mask, label and patient.

    Args:
        folder: the dataset folder.
        masks: look for ``masks/<key>.png`` (False: every ``mask`` is None).
        labels: read the labels of ``labels.csv`` (False: every ``label`` is None and the
            file is only read for patient ids).

    Raises:
        InputError: ``folder`` is not a folder or holds no image, or a CSV file is malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Dataset folder not found: {folder}")
    mask_dir = folder / MASKS_DIR
    table = _Table.read(folder / LABELS_CSV) if (folder / LABELS_CSV).is_file() else None
    by_key = _labels(table) if labels and table is not None else {}
    patients = _patients(table) if table is not None else None
    if patients is None and (folder / META_CSV).is_file():
        patients = _patients(_Table.read(folder / META_CSV))
    patients = patients or {}

    images = []
    for file in discover_inputs([folder], exclude=[mask_dir]):
        key = file.case_id  # relative to the folder since it is the only root; right for symlinked files too
        mask = mask_dir / f"{key}.png"
        images.append(FolderImage(file.path, key, mask if masks and mask.is_file() else None,
                                  by_key.get(key), patients.get(key)))
    unmatched = sorted(by_key.keys() - {im.key for im in images})
    if unmatched:
        logger.warning("%s: %d row(s) name no image of the folder (first: %r)",
                       folder / LABELS_CSV, len(unmatched), unmatched[0])
    return images


def read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A mask file as an ``(H, W)`` bool array (pixel > 127), checked against its image's ``(H, W)``.

    Raises:
        CaseError: the file cannot be read as an image or its size is not ``shape``.
    """
    try:
        mask = read_mask_png(path)
    except (OSError, ValueError) as err:
        raise CaseError(path, f"cannot read the mask: {err}") from None
    if mask.shape != tuple(shape):
        raise CaseError(path, f"the mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                              f"{shape[1]}x{shape[0]}")
    return mask
