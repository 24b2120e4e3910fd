"""mmcli.qa.lung_sides: the patient's right and left lung, on hand-made masks and on the shared reference masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcli.qa import mask as qa_mask
from mmcli.qa.mask import LEFT_LUNG, RIGHT_LUNG, lung_sides

REFERENCE_MASKS = sorted((Path(__file__).parents[2] / "shared" / "data" / "seg-in" / "masks").glob("*.png"))


def two_lungs(n: int = 256) -> np.ndarray:
    """(n, n) bool: a larger lung on the image's left (the patient's right), a smaller one on its right."""
    m = np.zeros((n, n), bool)
    m[60:220, 30:118] = True
    m[70:210, 140:220] = True
    return m


def _check_partition(sides: np.ndarray, mask: np.ndarray) -> None:
    assert sides.dtype == np.uint8 and sides.shape == mask.shape
    assert set(np.unique(sides)) <= {0, RIGHT_LUNG, LEFT_LUNG}
    np.testing.assert_array_equal(sides > 0, mask)


def test_two_pieces_side_by_side_smaller_column_is_the_right_lung():
    m = two_lungs()
    sides = lung_sides(m)
    _check_partition(sides, m)
    assert (sides == RIGHT_LUNG).sum() == 160 * 88 and (sides == LEFT_LUNG).sum() == 140 * 80
    assert (sides[:, :118] != LEFT_LUNG).all() and (sides[:, 140:] != RIGHT_LUNG).all()


def test_mirrored_mask_swaps_the_sides():
    m = two_lungs()
    sides, mirrored = lung_sides(m), lung_sides(m[:, ::-1])
    np.testing.assert_array_equal(mirrored[:, ::-1], np.where(sides > 0, 3 - sides, 0))


def test_extra_pieces_join_the_side_of_their_centroid():
    m = two_lungs()
    m[230:234, 10:14] = True  # a speck far left: right lung side
    m[10:14, 240:244] = True  # a speck far right: left lung side
    sides = lung_sides(m)
    _check_partition(sides, m)
    assert (sides[230:234, 10:14] == RIGHT_LUNG).all() and (sides[10:14, 240:244] == LEFT_LUNG).all()


def test_lungs_joined_at_the_mediastinum_are_cut_at_the_waist():
    m = two_lungs()
    m[100:106, 118:140] = True  # a bridge between the lungs: one piece
    assert qa_mask._parts(m).area.size == 1
    sides = lung_sides(m)
    _check_partition(sides, m)
    cut = int(np.argmax((sides == LEFT_LUNG).any(axis=0)))
    assert 118 <= cut <= 140  # within the bridge
    assert (sides[:, :118][m[:, :118]] == RIGHT_LUNG).all() and (sides[:, 140:][m[:, 140:]] == LEFT_LUNG).all()


def test_one_lung_alone_is_one_side_and_a_fused_blob_is_cut_at_the_mid_column():
    m = two_lungs()
    m[:, 128:] = False  # the left lung missed entirely
    assert set(np.unique(lung_sides(m))) == {0, RIGHT_LUNG}
    m = two_lungs()
    m[:, :128] = False
    assert set(np.unique(lung_sides(m))) == {0, LEFT_LUNG}
    m = two_lungs()
    m[140:150, 30:118] = False  # the right lung in two stacked pieces, the left lung missed
    m[:, 128:] = False
    assert qa_mask._parts(m).area.size == 2 and set(np.unique(lung_sides(m))) == {0, RIGHT_LUNG}
    blob = np.zeros((200, 300), bool)
    blob[40:180, 60:260] = True  # no waist, 45 % / 55 % of it either side of column 150
    sides = lung_sides(blob)
    _check_partition(sides, blob)
    assert (sides[:, :150][blob[:, :150]] == RIGHT_LUNG).all() and (sides[:, 150:][blob[:, 150:]] == LEFT_LUNG).all()


def test_empty_and_wrong_shapes():
    assert not lung_sides(np.zeros((64, 64), bool)).any()
    with pytest.raises(ValueError, match="2-D"):
        lung_sides(np.zeros((2, 8, 8), bool))


def test_split_is_exact_at_native_size():
    """A large mask is labelled on a coarse grid; the split still covers exactly its pixels."""
    m = np.repeat(np.repeat(two_lungs(), 9, axis=0), 9, axis=1)[:2300, :2250]
    sides = lung_sides(m)
    _check_partition(sides, m)
    assert (sides[:, : 118 * 9] != LEFT_LUNG).all() and (sides[:, 140 * 9:] != RIGHT_LUNG).all()


@pytest.mark.skipif(not REFERENCE_MASKS, reason="shared reference masks (data/seg-in/masks) are not here")
def test_reference_masks_split_into_a_right_and_a_left_lung_even_when_joined():
    for path in REFERENCE_MASKS:
        mask = qa_mask.anatomical_mask(np.asarray(Image.open(path)) > 0)
        sides = lung_sides(mask)
        _check_partition(sides, mask)
        right, left = sides == RIGHT_LUNG, sides == LEFT_LUNG
        cols = np.arange(mask.shape[1])
        assert right.any() and left.any(), path.name
        assert (right * cols).sum() / right.sum() < mask.shape[1] / 2 < (left * cols).sum() / left.sum(), path.name
        assert 0.4 < right.sum() / left.sum() < 2.5, path.name  # the right lung is a little larger, not 2.5 times
        # join the lungs with a bar across the mediastinum at mid height: the cut still finds them
        rows = np.flatnonzero(mask.any(axis=1))
        mid = (rows[0] + rows[-1]) // 2
        joined = mask.copy()
        inner = np.flatnonzero(right[mid]).max(), np.flatnonzero(left[mid]).min()
        joined[mid - 2: mid + 3, inner[0]: inner[1] + 1] = True
        again = lung_sides(joined)
        assert qa_mask._parts(joined).area.size == 1, path.name
        np.testing.assert_array_equal(again[mask], sides[mask], err_msg=path.name)  # the lungs' own pixels: as apart
