"""What the model's output says about one image: the cells of its ``predict`` report row and its lung mask.

The one source of a case's result, for ``mmcli predict`` (:class:`mmcli.predict.PredictCase`) and the
Python API (:meth:`mmcli.api.Model.predict`): the probability (rounded to 6 places, as the report
holds it), the label (from the unrounded probability), the lung mask at native size, the lung
fractions and areas (:func:`mmcli.qa.mask.lung_cells`), and the quality-control flags and policy
(:func:`mmcli.qa.policy.apply_policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcli.io.image import ImageFacts
from mmcli.qa.mask import lung_cells, lung_mask, lung_sides
from mmcli.qa.policy import apply_policy, case_flags
from mmcli.status import Status

if TYPE_CHECKING:
    from mmcli.inference import BatchPrediction

__all__ = ["CaseOutcome", "case_outcome", "label_for"]

PROBABILITY_PLACES = 6
"""Decimal places of ``p_pneumonia`` in a report (and the API's result)."""


def label_for(probability: float, threshold: float, class_names: Sequence[str]) -> str:
    """The last class (pneumonia) from ``threshold`` on, else the first (normal)."""
    return class_names[-1] if probability >= threshold else class_names[0]


@dataclass(frozen=True)
class CaseOutcome:
    """One case's result.

    Attributes:
        cells: report cells: ``status``, ``height``, ``width``, ``qa_flags``; ``p_pneumonia`` and ``label``
            where the weights give a probability; the ``*lung_fraction`` and ``*lung_area_mm2`` cells
            where they give a mask; ``error`` (and no label) where ``--qa refuse`` refused the case.
        mask: ``(H, W)`` bool lung mask at native size, or None without a segmentation head.
        sides: ``(H, W)`` uint8 lung label map of ``mask`` (:func:`mmcli.qa.mask.lung_sides`), or None.
    """

    cells: dict[str, Any]
    mask: np.ndarray | None
    sides: np.ndarray | None

    @property
    def flags(self) -> tuple[str, ...]:
        """The quality-control flags, in the order they fired."""
        return tuple(f for f in (self.cells.get("qa_flags") or "").split(";") if f)


def case_outcome(pred: BatchPrediction, k: int, facts: ImageFacts, *, threshold: float,
                 class_names: Sequence[str], qa: str, raw_masks: bool) -> CaseOutcome:
    """Case ``k`` of a batch prediction, of an image whose reader gave ``facts`` (native size, spacing,
    image flags), under the ``--threshold``, ``--qa`` and ``--raw-masks`` settings."""
    height, width = facts.height, facts.width
    cells: dict[str, Any] = {"status": Status.OK, "height": height, "width": width}
    if pred.probabilities is not None:
        prob = float(pred.probabilities[k, -1])
        cells["p_pneumonia"] = round(prob, PROBABILITY_PLACES)
        cells["label"] = label_for(prob, threshold, class_names)
    mask = sides = None
    if pred.mask_logits is not None:
        mask = lung_mask(pred.mask_at(k, height, width), raw_masks)
        sides = lung_sides(mask)
        cells.update(lung_cells(sides, facts.pixel_spacing))
    apply_policy(cells, case_flags(facts, mask, pred, k, qa), qa)
    return CaseOutcome(cells, mask, sides)
