"""What quality control does to a case's row: the ``--qa`` policy, one rule for every command.

The flags come from :mod:`mmcli.qa` (the image, the mask) and :mod:`mmcli.ood` (the
features); this module only decides what a flagged case becomes:

* ``warn`` (default): the outputs are written and ``qa_flags`` lists the flags (``;``
  separated). A case flagged ``not_radiograph``, ``inverted`` or ``rotated`` gets the label
  ``uncertain``: the model has no grounds for a finding on such an image.
* ``refuse``: a case with any flag gets status ``error``, the flags as its reason and no
  label (exit code 1, as for any failed case).
* ``off``: no checks, no flags (the mask is still post-processed unless ``--raw-masks``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mmcli.qa import INVERTED, LEFT_LUNG, NOT_RADIOGRAPH, RIGHT_LUNG, ROTATED, anatomical_mask, mask_flags

__all__ = ["NO_GROUNDS", "OUT_OF_DISTRIBUTION", "QA_POLICIES", "UNCERTAIN", "apply_policy", "case_flags",
           "is_flagged", "lung_cells", "lung_mask", "native_lung_mask"]

QA_POLICIES: tuple[str, ...] = ("warn", "refuse", "off")
OUT_OF_DISTRIBUTION = "out_of_distribution"
NO_GROUNDS = (NOT_RADIOGRAPH, INVERTED, ROTATED)
"""Flags that leave the model no grounds for a label."""
UNCERTAIN = "uncertain"


def lung_mask(raw: np.ndarray, raw_masks: bool) -> np.ndarray:
    """The mask a case reports: the anatomical one (at most two plausible lungs, holes filled),
    or the network's own with ``--raw-masks``."""
    return raw if raw_masks else anatomical_mask(raw)


def native_lung_mask(pred: Any, k: int, height: int, width: int, raw_masks: bool) -> np.ndarray:
    """Case ``k``'s reported lung mask (:func:`lung_mask`), ``(height, width)`` bool at the image's native size:
    the one the device brought back (``pred.native_mask(k)``), else its ``(1, S, S)`` logits resized here."""
    native = pred.native_mask(k)
    if native is None:
        from mmcli.data.transforms import mask_to_native  # torch: only where the logits are still on the grid

        native = mask_to_native(pred.mask_logits[k], height, width).numpy()
    return lung_mask(native, raw_masks)


def lung_cells(sides: np.ndarray, pixel_spacing: Sequence[float] | None) -> dict[str, float | None]:
    """Report cells of a lung label map (:func:`mmcli.qa.lung_sides`, (H, W) at native size): the share of
    the image each lung and both cover, and with the (row, col) ``pixel_spacing`` in mm, their areas in mm^2."""
    right, left = int(np.count_nonzero(sides == RIGHT_LUNG)), int(np.count_nonzero(sides == LEFT_LUNG))
    cells: dict[str, float | None] = {}
    for name, pixels in (("lung", right + left), ("right_lung", right), ("left_lung", left)):
        cells[f"{name}_fraction"] = round(pixels / sides.size, 6)
        cells[f"{name}_area_mm2"] = round(pixels * float(pixel_spacing[0]) * float(pixel_spacing[1]), 2) \
            if pixel_spacing else None
    return cells


def case_flags(meta: Mapping[str, Any], mask: np.ndarray | None, pred: Any, k: int, policy: str) -> list[str]:
    """Every flag of case ``k`` of a batch: the image's (``meta["image_flags"]``), the mask's, and
    ``out_of_distribution`` where the weights carry feature statistics (``pred.ood_distance``)."""
    if policy == "off":
        return []
    flags = list(meta.get("image_flags", ()))
    if mask is not None:
        flags += mask_flags(mask, pixel_spacing=meta.get("pixel_spacing"))
    if pred.ood_distance is not None and float(pred.ood_distance[k]) > pred.ood_threshold:
        flags.append(OUT_OF_DISTRIBUTION)
    return flags


def apply_policy(row: dict[str, Any], flags: Iterable[str], policy: str) -> dict[str, Any]:
    """Set ``row``'s ``qa_flags`` and, as ``policy`` says, its label or status (in place; returned)."""
    if policy == "off":
        row["qa_flags"] = None
        return row
    found = list(dict.fromkeys(flags))
    row["qa_flags"] = ";".join(found) or None
    if not found:
        return row
    if policy == "refuse":
        row.update(status="error", error=f"refused by quality control: {';'.join(found)}", label=None)
    elif any(flag in NO_GROUNDS for flag in found) and row.get("label") is not None:
        row["label"] = UNCERTAIN
    return row


def is_flagged(row: dict[str, Any]) -> bool:
    """Whether a row carries any quality-control flag."""
    return bool(row.get("qa_flags"))
