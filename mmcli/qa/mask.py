"""Lung masks: make them anatomically plausible (keep the lungs, drop the rest, fill holes), split
them into the right and the left lung, say when they cannot be two lungs, and the report cells
they give.

Pure functions on numpy arrays (numpy and scipy only: no torch, no files, no logging). Every
number below was measured or fitted on the shared data by ``benchmarks/qa_masks.py``; rerun it
to check or refit them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from mmcli.qa.flags import MASK_IMPLAUSIBLE

__all__ = ["LEFT_LUNG", "MASK_STATS", "RIGHT_LUNG", "MaskStats", "anatomical_mask", "lung_cells", "lung_mask",
           "lung_sides", "mask_flags"]

# Share of the frame covered by the lungs: 0.5th..99.5th percentile of the 274 reference
# masks of seg-in + seg-cross (0.186, 0.555), widened by a quarter of that range at each end.
LUNG_FRACTION_RANGE = (0.094, 0.648)
# Largest piece / whole mask: at most 0.649 in the references and 0.695 in raw predictions
# of seg-in and seg-cross (benchmarks/qa_masks.py). Above 0.9 the smaller "lung" is under a
# ninth of the larger one. 0.8 flagged 7.7 % of the cls-in masks (paediatric pneumonia,
# where the model misses consolidated lung), 0.9 flags 3.7 %.
MAX_LARGEST_SHARE = 0.9
# Projected area of both lung fields on a frontal film, mm^2. A term newborn's lung fields
# span about 6 x 5 cm each (about 60 cm^2 together); a large adult's about 30 x 17 cm each
# (about 1000 cm^2). 30..1500 cm^2 leaves a factor 2 on both sides for magnification,
# premature infants and hyperinflation: outside it the spacing or the mask is wrong.
LUNG_AREA_MM2_RANGE = (3_000.0, 150_000.0)
MIN_COMPONENT = 0.005  # a piece below this share of the frame is a speck, not a lung
_LABEL_GRID = 512  # masks are labelled on a grid at most this big: exact up to 512 px


@dataclass(frozen=True)
class MaskStats:
    """Limits :func:`mask_flags` applies; the defaults are the module constants."""

    fraction: tuple[float, float] = LUNG_FRACTION_RANGE
    max_largest_share: float = MAX_LARGEST_SHARE
    area_mm2: tuple[float, float] = LUNG_AREA_MM2_RANGE
    min_component: float = MIN_COMPONENT


MASK_STATS = MaskStats()


@dataclass(frozen=True)
class _Parts:
    """Connected pieces of a mask labelled on a grid of ``f`` x ``f`` pixel cells."""

    labels: np.ndarray  # (h, w) int, 0 = no mask pixel in the cell
    counts: np.ndarray  # (h, w) mask pixels in each cell
    area: np.ndarray  # (n,) pixels per piece, at full resolution
    cy: np.ndarray  # (n,) centroid row / H
    cx: np.ndarray  # (n,) centroid column / W
    bottom: np.ndarray  # (n,) lowest row reached / H
    x0: np.ndarray  # (n,) first column reached / W
    x1: np.ndarray  # (n,) last column reached + 1, / W
    f: int


def _cells(m: np.ndarray, f: int) -> np.ndarray:
    """(H, W) bool as (h, f, w, f) cells, padded with False to multiples of ``f`` (a view when none is needed)."""
    h, w = -(-m.shape[0] // f), -(-m.shape[1] // f)
    if m.shape != (h * f, w * f):
        padded = np.zeros((h * f, w * f), bool)
        padded[: m.shape[0], : m.shape[1]] = m
        m = padded
    return np.ascontiguousarray(m).reshape(h, f, w, f)


def _cell_counts(m: np.ndarray, f: int) -> np.ndarray:
    """(H, W) bool -> (ceil(H / f), ceil(W / f)) number of True pixels in each f x f cell.

    Summed as f row slices, then f column slices, of bytes: the same integers as a sum over
    the cell axes, several times faster.
    """
    cells = _cells(m, f)
    h, w = cells.shape[0], cells.shape[2]
    grid = cells.reshape(h * f, w * f).view(np.uint8)
    wide: type[np.unsignedinteger] = np.uint16 if f * f < 2**16 else np.uint32
    rows = grid[0::f].astype(wide)
    for i in range(1, f):
        rows += grid[i::f]
    counts = rows[:, 0::f].copy()
    for j in range(1, f):
        counts += rows[:, j::f]
    return counts


def _parts(m: np.ndarray) -> _Parts:
    H, W = m.shape
    f = max(1, math.ceil(max(H, W) / _LABEL_GRID))
    counts = _cell_counts(m, f)
    labels, n = ndi.label(counts > 0, structure=np.ones((3, 3), bool))  # 8-connected pieces
    cells = np.flatnonzero(counts)  # empty cells weigh nothing: leaving them out changes no sum
    idx, wts = labels.ravel()[cells], counts.ravel()[cells].astype(np.float64)
    rows, cols = np.divmod(cells, counts.shape[1])
    area = np.bincount(idx, wts, n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(idx, wts * ((rows + 0.5) * f), n + 1)[1:] / area / H
        cx = np.bincount(idx, wts * ((cols + 0.5) * f), n + 1)[1:] / area / W
    # the lowest cell row and the column span of each piece, from its bounding box
    boxes = np.array([(b[0].stop, b[1].start, b[1].stop) for b in ndi.find_objects(labels, n)],
                     dtype=np.float64).reshape(-1, 3)
    bottom = np.minimum(boxes[:, 0] * f, H) / H
    x0, x1 = boxes[:, 1] * f / W, np.minimum(boxes[:, 2] * f, W) / W
    return _Parts(labels, counts, area, cy, cx, bottom, x0, x1, f)


def _fill_holes(m: np.ndarray, f: int, counts: np.ndarray | None = None) -> np.ndarray:
    """Fill background regions that do not reach the border.

    Exact when ``f == 1``. Otherwise a cell is filled only if its coarse background region
    (cells holding any background pixel, 4-connected) is closed, which never fills a pixel
    that can reach the border; a hole within ``f`` pixels of the outline may stay open.
    ``counts``: :func:`_cell_counts` of ``m``, when already known.
    """
    if counts is None:
        counts = _cell_counts(m, f)
    bg = counts < f * f  # a cell with any background pixel (the padding lies outside: background)
    labels, _ = ndi.label(bg)
    edge = np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    holes = (labels > 0) & ~np.isin(labels, edge)
    if not holes.any():
        return m
    if m.shape == (holes.shape[0] * f, holes.shape[1] * f):  # whole cells: fill through a view
        return (m.reshape(holes.shape[0], f, holes.shape[1], f) | holes[:, None, :, None]).reshape(m.shape)
    full = np.repeat(np.repeat(holes, f, axis=0), f, axis=1)[: m.shape[0], : m.shape[1]]
    return m | full


def anatomical_mask(
    mask: np.ndarray,
    *,
    min_area: float = MIN_COMPONENT,
    min_rel_largest: float = 0.1,
    centre_rows: tuple[float, float] = (0.15, 0.85),
    centre_cols: tuple[float, float] = (0.1, 0.9),
    min_bottom: float = 0.4,
    fill_holes: bool = True,
) -> np.ndarray:
    """Keep at most two pieces of a lung mask that can be lungs, and fill their holes.

    A piece can be a lung if it covers at least ``min_area`` of the frame and
    ``min_rel_largest`` of the largest such piece, its centroid lies within
    ``centre_rows`` x ``centre_cols`` (fractions of H and W), and it reaches down to at
    least ``min_bottom`` x H (a blob above the shoulder does not). Of those, the largest
    is kept, then the largest on the other side of the midline (else the next largest).
    The kept pieces keep their exact pixels; resolution independent (pieces closer than
    ``ceil(max(H, W) / 512)`` px count as one).

    Args:
        mask: (H, W) bool (or 0/1) lung mask.

    Returns:
        (H, W) bool mask; empty when no piece can be a lung.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), not of shape {m.shape}")
    p = _parts(m)
    ok = (p.area >= min_area * m.size) & (p.bottom >= min_bottom)
    ok &= (p.cy >= centre_rows[0]) & (p.cy <= centre_rows[1])
    ok &= (p.cx >= centre_cols[0]) & (p.cx <= centre_cols[1])
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return np.zeros_like(m)
    cand = cand[p.area[cand] >= min_rel_largest * p.area[cand].max()]
    order = cand[np.argsort(-p.area[cand], kind="stable")]
    keep = list(order[:1])
    if order.size > 1:
        other_side = [i for i in order[1:] if (p.cx[i] < 0.5) != (p.cx[order[0]] < 0.5)]
        keep.append(other_side[0] if other_side else order[1])
    lut = np.zeros(p.area.size + 1, bool)
    lut[np.asarray(keep) + 1] = True
    if lut[1:].all():  # every piece kept: the mask itself
        out, counts = m.copy(), p.counts
    else:
        kept = _cells(m, p.f) & lut[p.labels][:, None, :, None]
        out = np.ascontiguousarray(kept.reshape(kept.shape[0] * p.f, -1)[: m.shape[0], : m.shape[1]])
        counts = None
    return _fill_holes(out, p.f, counts) if fill_holes else out


RIGHT_LUNG, LEFT_LUNG = 1, 2
"""Values of :func:`lung_sides`' label map: also the segment numbers of the DICOM SEG."""
# A mask treated as a whole is two lungs joined at the mediastinum when, in the middle half of
# its column span, some column holds at most this share of the fullest column on either side of it
WAIST = 0.5
# With no such waist, a mask with at least this share of its pixels on each side of the image's
# mid column is both lungs fused (cut at the mid column); with less it is one lung
MIN_SIDE_SHARE = 0.2


def lung_sides(mask: np.ndarray, *, min_component: float = MIN_COMPONENT) -> np.ndarray:
    """Split a lung mask into the patient's right and left lung, as seen on a standard PA/AP film:
    the patient's right lung lies on the image's left (the smaller column indices).

    1. Two lungs apart: when the two largest pieces of at least ``min_component`` of the frame lie
       side by side (their column spans overlap by less than half the narrower span), the one whose
       centroid has the smaller column is the right lung, the other the left lung. Any other piece
       (``--raw-masks``) joins the side of the cut (midway between the lungs' inner edges, or
       between their centroids where the spans overlap) that its centroid lies on.
    2. Otherwise (one piece, or pieces stacked in one lung) the mask is judged as a whole:

       a. two lungs joined at the mediastinum: in the middle half of the mask's column span some
          column holds at most ``WAIST`` of the fullest column on either side of it; cut at the
          first such lowest column;
       b. no waist, but at least ``MIN_SIDE_SHARE`` of the pixels on each side of the image's mid
          column: both lungs fused; cut at the mid column ``W // 2``;
       c. else one lung, wholly on the side of the mid column where its centroid lies.

       Across a cut, columns left of it are the right lung.

    Args:
        mask: (H, W) bool (or 0/1) lung mask, ideally from :func:`anatomical_mask`.

    Returns:
        (H, W) uint8: 0 background, ``RIGHT_LUNG`` (1) or ``LEFT_LUNG`` (2); nonzero exactly on ``mask``.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), not of shape {m.shape}")
    if not m.any():
        return np.zeros(m.shape, np.uint8)
    p = _parts(m)
    big = np.flatnonzero(p.area >= min_component * m.size)
    big = big[np.argsort(-p.area[big], kind="stable")][:2]
    if big.size == 2:
        a, b = sorted(big, key=lambda i: p.cx[i])
        overlap = min(p.x1[a], p.x1[b]) - max(p.x0[a], p.x0[b])
        if overlap < 0.5 * min(p.x1[a] - p.x0[a], p.x1[b] - p.x0[b]):
            cut = (p.x1[a] + p.x0[b]) / 2 if overlap <= 0 else (p.cx[a] + p.cx[b]) / 2
            side = np.where(p.cx < cut, RIGHT_LUNG, LEFT_LUNG)
            side[a], side[b] = RIGHT_LUNG, LEFT_LUNG
            cells = np.r_[0, side].astype(np.uint8)[p.labels]
            full = np.repeat(np.repeat(cells, p.f, axis=0), p.f, axis=1)[: m.shape[0], : m.shape[1]]
            return np.where(m, full, np.uint8(0))
    profile = np.count_nonzero(m, axis=0)
    cut = _waist(profile)
    if cut is None:
        half = m.shape[1] // 2
        right_share = profile[:half].sum() / profile.sum()
        one_lung = min(right_share, 1.0 - right_share) < MIN_SIDE_SHARE  # then the cut lies beyond it
        cut = (m.shape[1] if right_share >= 0.5 else 0) if one_lung else half
    out = m.astype(np.uint8) * np.uint8(LEFT_LUNG)
    out[:, :cut][m[:, :cut]] = RIGHT_LUNG
    return out


def _waist(profile: np.ndarray) -> int | None:
    """The first lowest column in the middle half of the span of ``profile`` (W,) (mask pixels per
    column) when it holds at most ``WAIST`` of the fullest column on either side of it, else None."""
    cols = np.flatnonzero(profile)
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    lo, hi = c0 + (c1 - c0) // 4, c1 - (c1 - c0) // 4
    if hi - lo < 1 or lo <= c0:
        return None
    cut = lo + int(np.argmin(profile[lo:hi]))
    sides = min(int(profile[c0:cut].max()), int(profile[cut + 1: c1].max(initial=0)))
    return cut if profile[cut] <= WAIST * sides else None


def mask_flags(
    mask: np.ndarray, *, pixel_spacing: tuple[float, float] | None = None, stats: MaskStats = MASK_STATS
) -> list[str]:
    """``["mask_implausible"]`` when a (post-processed) lung mask cannot be two lungs, else ``[]``.

    Implausible: the lung share of the frame is outside ``stats.fraction``; or there are
    not exactly two lungs: two pieces of at least ``stats.min_component`` of the frame, or one
    such piece that is two lungs joined at the mediastinum (a waist in the middle half of its
    column span, as :func:`lung_sides` cuts it); or the larger lung holds more than
    ``stats.max_largest_share`` of both; or, with ``pixel_spacing`` (row, col) in mm, the lung
    area in mm^2 is outside ``stats.area_mm2``.

    The joined lungs count since weights v3, whose masks include the lung behind the heart
    (the V7 and COVID-19 convention), so that on children's and supine films the two lungs
    often touch: counted as one piece, 8.2 % of held-out Kermany films and 7.4 % of adult AP
    films were flagged, against 0.7 % and 0.9 % counted as lungs (``benchmarks/qa_mask_rule.py``).

    Args:
        mask: (H, W) bool mask at the image's own resolution, ideally from
            :func:`anatomical_mask` (specks below ``stats.min_component`` are ignored).
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D (H, W) array, not of shape {m.shape}")
    total = float(np.count_nonzero(m))
    pieces = np.sort(_parts(m).area)[::-1]
    pieces = pieces[pieces >= stats.min_component * m.size]
    if pieces.size == 1:  # two lungs joined at the mediastinum are two lungs, as lung_sides splits them
        profile = np.count_nonzero(m, axis=0)
        cut = _waist(profile)
        if cut is not None:
            pieces = np.sort([float(profile[:cut].sum()), float(profile[cut:].sum())])[::-1]
    bad = not stats.fraction[0] <= total / m.size <= stats.fraction[1]
    bad |= pieces.size != 2 or pieces[0] > stats.max_largest_share * pieces.sum()
    if pixel_spacing is not None:
        area = total * float(pixel_spacing[0]) * float(pixel_spacing[1])
        bad |= not stats.area_mm2[0] <= area <= stats.area_mm2[1]
    return [MASK_IMPLAUSIBLE] if bad else []


def lung_mask(raw: np.ndarray, raw_masks: bool) -> np.ndarray:
    """The mask a case reports: the anatomical one (at most two plausible lungs, holes filled),
    or the network's own with ``--raw-masks``."""
    return raw if raw_masks else anatomical_mask(raw)


def lung_cells(sides: np.ndarray, pixel_spacing: Sequence[float] | None) -> dict[str, float | None]:
    """Report cells of a lung label map (:func:`lung_sides`, (H, W) at native size): the share of
    the image each lung and both cover, and with the (row, col) ``pixel_spacing`` in mm, their areas in mm^2."""
    right, left = int(np.count_nonzero(sides == RIGHT_LUNG)), int(np.count_nonzero(sides == LEFT_LUNG))
    cells: dict[str, float | None] = {}
    for name, pixels in (("lung", right + left), ("right_lung", right), ("left_lung", left)):
        cells[f"{name}_fraction"] = round(pixels / sides.size, 6)
        cells[f"{name}_area_mm2"] = round(pixels * float(pixel_spacing[0]) * float(pixel_spacing[1]), 2) \
            if pixel_spacing else None
    return cells
