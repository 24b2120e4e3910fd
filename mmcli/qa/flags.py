"""The registry of quality-control flags: every flag mmcli can raise, what it means, the stage of the
pipeline that computes it, and whether it leaves the model no grounds for a finding.

A flag is raised at exactly one stage:

* ``image``: from the pixels as read, before the model runs (:func:`mmcli.qa.image.image_flags`);
* ``mask``: from the lung mask at the image's native size (:func:`mmcli.qa.mask.mask_flags`);
* ``features``: from the network's features and the statistics the weights carry
  (:class:`mmcli.qa.ood.OODStats`).

A flag with ``no_grounds`` makes the label ``uncertain`` under ``--qa warn``
(:func:`mmcli.qa.policy.apply_policy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FLAGS", "INVERTED", "MASK_IMPLAUSIBLE", "NOT_RADIOGRAPH", "NO_GROUNDS", "OUT_OF_DISTRIBUTION",
           "ROTATED", "Flag", "Stage"]

Stage = Literal["image", "mask", "features"]

NOT_RADIOGRAPH = "not_radiograph"
INVERTED = "inverted"
ROTATED = "rotated"
MASK_IMPLAUSIBLE = "mask_implausible"
OUT_OF_DISTRIBUTION = "out_of_distribution"


@dataclass(frozen=True)
class Flag:
    """One quality-control flag.

    Attributes:
        name: as written in ``qa_flags``.
        meaning: one line for people (the README's table says the same).
        stage: where in the pipeline it is computed.
        no_grounds: whether the model has no grounds for a label on a flagged image.
    """

    name: str
    meaning: str
    stage: Stage
    no_grounds: bool


FLAGS: dict[str, Flag] = {f.name: f for f in (
    Flag(NOT_RADIOGRAPH, "not a radiograph: too small, colour, constant, noise, text or a drawing", "image", True),
    Flag(INVERTED, "a negative film: bone dark, air bright", "image", True),
    Flag(ROTATED, "turned by 90 or 180 degrees, or upside down", "image", True),
    Flag(MASK_IMPLAUSIBLE, "the lung mask cannot be two lungs: wrong share of the frame or area, "
         "not two pieces, or one piece holding nearly all of it", "mask", False),
    Flag(OUT_OF_DISTRIBUTION, "the image's features lie far from those of the training films", "features", False),
)}

NO_GROUNDS: tuple[str, ...] = tuple(name for name, flag in FLAGS.items() if flag.no_grounds)
"""Flags that leave the model no grounds for a label."""
