"""mmcli.qa: mask post-processing and plausibility on hand-made masks, image flags on
synthetic inputs and on the shipped example radiographs (and their inversions and turns)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmcli.io.readers import read_radiograph
from mmcli.qa import flags as qa_flag
from mmcli.qa import image as qa_image
from mmcli.qa import mask as qa_mask

SCANS = Path(__file__).parents[1] / "examples" / "scans"


def two_lungs(n: int = 256) -> np.ndarray:
    """(n, n) bool: two lung-sized rectangles left and right of the midline, 43 % of the frame."""
    m = np.zeros((n, n), bool)
    s = n // 256
    m[60 * s:220 * s, 30 * s:118 * s] = True
    m[60 * s:220 * s, 138 * s:226 * s] = True
    return m


def flags(x: np.ndarray, colour: bool = False) -> list[str]:
    return qa_image.image_flags(x, height=x.shape[0], width=x.shape[1], colour=colour)


# --- anatomical_mask -----------------------------------------------------------------------

def test_keeps_the_two_lungs_and_drops_a_speck_and_a_blob_above_the_shoulder():
    lungs = two_lungs()
    m = lungs.copy()
    m[240:243, 5:8] = True  # speck
    m[0:40, 100:160] = True  # blob above the shoulders, touching the top border (3.7 % of the frame)
    out = qa_mask.anatomical_mask(m)
    assert out.dtype == bool and out.shape == m.shape
    np.testing.assert_array_equal(out, lungs)


def test_fills_a_hole_and_keeps_one_big_component():
    m = np.zeros((256, 256), bool)
    m[50:220, 40:216] = True
    m[100:120, 100:130] = False  # hole
    out = qa_mask.anatomical_mask(m)
    assert out[50:220, 40:216].all() and out.sum() == 170 * 176
    assert not qa_mask.anatomical_mask(m, fill_holes=False)[100:120, 100:130].any()


def test_prefers_a_piece_on_the_other_side_to_a_second_piece_of_the_same_lung():
    m = two_lungs()
    m[60:220, 138:226] = False
    m[60:140, 138:226] = True  # right lung, upper part (larger)
    m[150:220, 138:226] = True  # right lung, lower part (split off)
    m[60:220, 30:118] = False
    m[80:160, 50:100] = True  # left lung, smaller than both right pieces
    out = qa_mask.anatomical_mask(m)
    assert out[100, 70] and out[100, 180]  # both sides kept
    assert qa_mask._parts(out).area.size == 2


def test_is_exact_at_native_size_and_ignores_implausible_only_masks():
    lungs = two_lungs(2048)
    m = lungs.copy()
    m[2000:2010, 20:30] = True
    np.testing.assert_array_equal(qa_mask.anatomical_mask(m), lungs)
    blob = np.zeros((256, 256), bool)
    blob[0:30, 0:30] = True  # corner blob only: nothing is a lung
    assert not qa_mask.anatomical_mask(blob).any()
    assert not qa_mask.anatomical_mask(np.zeros((5, 7), bool)).any()


def test_cell_counts_and_parts_match_direct_sums():
    rng = np.random.default_rng(0)
    for shape, f in [((40, 36), 4), ((41, 35), 4), ((30, 31), 3), ((9, 7), 1), ((33, 65), 16)]:
        m = rng.random(shape) < 0.4
        h, w = -(-shape[0] // f), -(-shape[1] // f)
        padded = np.zeros((h * f, w * f), bool)
        padded[: shape[0], : shape[1]] = m
        expected = padded.reshape(h, f, w, f).sum(axis=(1, 3))
        np.testing.assert_array_equal(qa_mask._cell_counts(m, f), expected)
    # pieces at 2048 px (cells of 4): areas, centroids and lowest rows of two rectangles
    p = qa_mask._parts(two_lungs(2048))
    np.testing.assert_array_equal(p.area, [160 * 8 * 88 * 8] * 2)
    np.testing.assert_allclose(p.cy, [140 * 8 / 2048] * 2)
    np.testing.assert_allclose(p.cx, [74 * 8 / 2048, 182 * 8 / 2048])
    np.testing.assert_allclose(p.bottom, [220 * 8 / 2048] * 2)


def test_fills_holes_through_whole_and_ragged_cells():
    for n in (2048, 2041):  # cells of 4 that tile the frame, and ragged ones
        lungs = two_lungs(2048)[:n, :n]
        holed = lungs.copy()
        holed[800:840, 400:440] = False  # a closed hole inside the left lung
        np.testing.assert_array_equal(qa_mask.anatomical_mask(holed), lungs)


# --- mask_flags ----------------------------------------------------------------------------

def test_mask_flags_on_hand_made_masks():
    good = two_lungs()
    assert qa_mask.mask_flags(good) == []
    assert qa_mask.mask_flags(good, pixel_spacing=(1.0, 1.0)) == []  # 282 cm^2
    small = np.zeros((256, 256), bool)
    small[100:130, 60:100] = small[100:130, 150:190] = True  # 3.7 % of the frame
    assert qa_mask.mask_flags(small) == [qa_flag.MASK_IMPLAUSIBLE]
    huge = np.zeros((256, 256), bool)
    huge[10:250, 5:125] = huge[10:250, 131:251] = True  # 88 %
    assert qa_mask.mask_flags(huge) == [qa_flag.MASK_IMPLAUSIBLE]
    one = np.zeros((256, 256), bool)
    one[40:230, 30:226] = True  # one lung-sized piece
    assert qa_mask.mask_flags(one) == [qa_flag.MASK_IMPLAUSIBLE]
    joined = good.copy()
    joined[120:140, 100:160] = True  # the two lungs touch at the mediastinum: one piece with a waist
    assert qa_mask._parts(joined).area.size == 1 and qa_mask.mask_flags(joined) == []
    assert set(np.unique(qa_mask.lung_sides(joined))) == {0, qa_mask.RIGHT_LUNG, qa_mask.LEFT_LUNG}
    lopsided_joined = joined.copy()
    lopsided_joined[40:230, 138:226] = False
    lopsided_joined[120:140, 118:170] = True  # a band out of one lung: no waist, not a second lung
    assert qa_mask._parts(lopsided_joined).area.size == 1
    assert qa_mask.mask_flags(lopsided_joined) == [qa_flag.MASK_IMPLAUSIBLE]
    lopsided = good.copy()
    lopsided[60:220, 138:226] = False
    lopsided[100:120, 160:180] = True  # other "lung" 400 px: the first holds over 90 % of the area
    assert qa_mask.mask_flags(lopsided) == [qa_flag.MASK_IMPLAUSIBLE]
    # 28 160 px: 0.1 mm pixels give 2.8 cm^2 (too small), 3 mm ones 2534 cm^2 (too big)
    assert qa_mask.mask_flags(good, pixel_spacing=(0.1, 0.1)) == [qa_flag.MASK_IMPLAUSIBLE]
    assert qa_mask.mask_flags(good, pixel_spacing=(3.0, 3.0)) == [qa_flag.MASK_IMPLAUSIBLE]
    assert qa_mask.mask_flags(good, pixel_spacing=(0.5, 0.5)) == []
    assert qa_mask.mask_flags(good, stats=qa_mask.MaskStats(fraction=(0.5, 0.9))) == [qa_flag.MASK_IMPLAUSIBLE]


# --- image_flags ---------------------------------------------------------------------------

def test_image_flags_exact_rules():
    rng = np.random.default_rng(0)
    film = read_radiograph(SCANS / "nih_siim_example.dcm").pixels
    assert flags(film) == []
    assert qa_image.image_flags(film, height=63, width=1024) == [qa_flag.NOT_RADIOGRAPH]  # source side 63 px
    assert flags(film[:63]) == [qa_flag.NOT_RADIOGRAPH]
    assert flags(np.full((1, 1), 0.5, np.float32)) == [qa_flag.NOT_RADIOGRAPH]
    assert flags(np.full((300, 200), 0.7, np.float32)) == [qa_flag.NOT_RADIOGRAPH]  # constant
    assert flags(np.zeros((256, 256), np.float32)) == [qa_flag.NOT_RADIOGRAPH]
    assert flags(rng.random((256, 256), dtype=np.float32)) == [qa_flag.NOT_RADIOGRAPH]  # noise
    assert flags(np.tile(np.linspace(0, 1, 512, dtype=np.float32), (512, 1))) == [qa_flag.NOT_RADIOGRAPH]
    yy, xx = np.mgrid[:256, :256]
    assert flags((((yy // 32) + (xx // 32)) % 2).astype(np.float32)) == [qa_flag.NOT_RADIOGRAPH]
    assert flags(film, colour=True) == [qa_flag.NOT_RADIOGRAPH]
    with pytest.raises(ValueError):
        flags(film * 2)
    with pytest.raises(ValueError):
        flags(np.zeros((4, 4, 3), np.float32))


def test_thumbnail_is_a_box_average():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(qa_image.thumbnail(x, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert qa_image.thumbnail(np.ones((2047, 1001)), 256).shape == (256, 256)


@pytest.fixture(scope="module")
def examples() -> dict[str, np.ndarray]:
    files = sorted(p for p in SCANS.iterdir() if p.suffix in (".jpeg", ".dcm"))
    return {p.name: read_radiograph(p).pixels for p in files}


def test_real_examples_are_not_flagged_and_their_inversions_and_turns_are(examples):
    assert len(examples) == 5
    for name, x in examples.items():
        assert flags(x) == [], name
        assert flags(1.0 - x) == [qa_flag.INVERTED], name
        for turned in (np.rot90(x), np.rot90(x, -1), np.rot90(x, 2), x[::-1]):
            assert flags(np.ascontiguousarray(turned)) == [qa_flag.ROTATED], name
        assert flags(np.ascontiguousarray(1.0 - np.rot90(x))) == [qa_flag.INVERTED, qa_flag.ROTATED], name
