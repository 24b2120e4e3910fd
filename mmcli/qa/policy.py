"""What quality control does to a case's row: the ``--qa`` policy, one rule for every command.

The flags come from the three stages of :mod:`mmcli.qa.flags`; this module gathers a case's flags
and decides what a flagged case becomes:

* ``warn`` (default): the outputs are written and ``qa_flags`` lists the flags (``;``
  separated). A case with a flag of :data:`~mmcli.qa.flags.NO_GROUNDS` (``not_radiograph``,
  ``inverted``, ``rotated``) gets the label ``uncertain``: the model has no grounds for a
  finding on such an image.
* ``refuse``: a case with any flag gets status ``error``, the flags as its reason and no
  label (exit code 1, as for any failed case).
* ``off``: no checks, no flags (the mask is still post-processed unless ``--raw-masks``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from mmcli.io.image import ImageFacts
from mmcli.qa.flags import NO_GROUNDS, OUT_OF_DISTRIBUTION
from mmcli.qa.mask import mask_flags
from mmcli.status import Status

__all__ = ["UNCERTAIN", "apply_policy", "case_flags"]

UNCERTAIN = "uncertain"


class _Distances(Protocol):
    """What :func:`case_flags` reads of a batch prediction."""

    @property
    def ood_distance(self) -> Any: ...  # (B,) distances, or None without statistics

    @property
    def ood_threshold(self) -> float | None: ...


def case_flags(facts: ImageFacts, mask: np.ndarray | None, pred: _Distances, k: int, policy: str) -> list[str]:
    """Every flag of case ``k`` of a batch: the image's (``facts.image_flags``), the mask's (``mask`` at the
    image's native size, judged with ``facts.pixel_spacing``), and ``out_of_distribution`` where the weights
    carry feature statistics (``pred.ood_distance``)."""
    if policy == "off":
        return []
    flags = list(facts.image_flags)
    if mask is not None:
        flags += mask_flags(mask, pixel_spacing=facts.pixel_spacing)
    distance, threshold = pred.ood_distance, pred.ood_threshold
    if distance is not None and threshold is not None and float(distance[k]) > threshold:
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
        row.update(status=Status.ERROR, error=f"refused by quality control: {';'.join(found)}", label=None)
    elif any(flag in NO_GROUNDS for flag in found) and row.get("label") is not None:
        row["label"] = UNCERTAIN
    return row
