"""What a training run learns from: a record of its lists (files, labels, masks, patients), and what changed.

``mmcli train`` keeps the record in ``state.pt`` and its sha256 in ``run.json``; ``--resume``
compares the record of the folders as they are now with it and refuses a run whose data
changed, naming what changed (a resumed run must see the data the run started with, or
it is no longer the run its splits, its history and its checkpoints describe).

A file counts as changed when its size or modification time changed (the same test as
the batch commands' resume; reading every image again would cost as much as the run's start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import UsageError
from mmcli.training.datasets import Sample

logger = logging.getLogger(__name__)

__all__ = ["check_resumed_data", "data_changes", "data_digest", "data_record"]

DataRecord = dict[str, list[object]]
"""``{image path: [label, mask path, patient, size, mtime_ns, mask size, mask mtime_ns]}``."""

_LABEL, _MASK, _PATIENT, _FILE, _MASK_FILE = 0, 1, 2, slice(3, 5), slice(5, 7)


def _stat(path: Path | None) -> list[int | None]:
    if path is None:
        return [None, None]
    try:
        info = os.stat(path)
    except OSError:
        return [None, None]
    return [info.st_size, info.st_mtime_ns]


def data_record(samples: Sequence[Sample], class_names: Sequence[str]) -> DataRecord:
    """The record of the scanned ``samples`` (labels as class names)."""
    return {str(s.path): [None if s.label is None else class_names[s.label], None if s.mask is None else str(s.mask),
                          s.patient, *_stat(s.path), *_stat(s.mask)] for s in samples}


def data_digest(record: DataRecord) -> str:
    """sha256 of the record, sorted by path: one string that changes whenever the record does."""
    return hashlib.sha256(json.dumps(sorted(record.items()), separators=(",", ":")).encode()).hexdigest()


def data_changes(old: DataRecord, new: DataRecord) -> str | None:
    """What changed from ``old`` to ``new`` (``"3 files deleted, 2 labels changed (first: ...)"``), or None."""
    gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    both = sorted(old.keys() & new.keys())
    kinds = {
        "deleted": gone, "added": added,
        "modified": [p for p in both if old[p][_FILE] != new[p][_FILE]],
    }
    fields = {"label": lambda r: r[_LABEL], "mask": lambda r: (r[_MASK], r[_MASK_FILE]),
              "patient id": lambda r: r[_PATIENT]}
    changed = {name: [p for p in both if get(old[p]) != get(new[p])] for name, get in fields.items()}
    parts = [f"{len(paths)} file{'s' * (len(paths) != 1)} {kind}" for kind, paths in kinds.items() if paths]
    parts += [f"{len(paths)} {name}{'s' * (len(paths) != 1)} changed" for name, paths in changed.items() if paths]
    if not parts:
        return None
    first = next(paths[0] for paths in [*kinds.values(), *changed.values()] if paths)
    return f"{', '.join(parts)} (first: {first})"


def check_resumed_data(state: dict[str, Any], record: DataRecord, out: Path) -> None:
    """Refuse to resume the run in ``out`` (its ``state.pt`` read as ``state``) on data other than its own.

    A run from before the record existed cannot be compared: it resumes, with a warning.

    Raises:
        UsageError: the files, labels, masks or patient ids changed, saying how.
    """
    if "data" not in state:
        logger.warning("--resume: %s does not record its training data, so it cannot be compared", out / "state.pt")
        return
    changed = data_changes(state["data"], record)
    if changed:
        raise UsageError(f"--resume: the training data changed since the run in {out} started: {changed}; "
                         "restore it, or start a new run in another --out")
