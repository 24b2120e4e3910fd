import numpy as np
import pytest
import torch

from mmcli.config import PreprocessConfig
from mmcli.data.transforms import mask_to_native, normalize, preprocess, resize_to_model


def test_preprocess_shape_range_and_fixed_normalisation():
    cfg = PreprocessConfig(image_size=64, intensity="fixed", mean=0.5, std=0.5)
    pixels = np.full((300, 200), 0.25, dtype=np.float32)
    x = preprocess(pixels, cfg)
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, -0.5))


def test_minmax_makes_bit_depths_alike():
    cfg = PreprocessConfig(image_size=32, intensity="minmax")
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    a = preprocess(ramp, cfg)
    b = preprocess(ramp * (1023 / 65535), cfg)  # a 10-bit image scaled by a 16-bit range
    assert torch.allclose(a, b, atol=1e-5)
    assert float(a.min()) == pytest.approx(-1.0) and float(a.max()) == pytest.approx(1.0)


def test_normalize_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalize(torch.full((4, 4), 1.5), PreprocessConfig())


def test_resize_matches_area_average_when_shrinking_by_integer_factor():
    # Antialiased bilinear over an exact 2x reduction averages 2x2 blocks with a tent
    # kernel; on a constant-per-block image away from edges this is the block value.
    img = torch.zeros(8, 8)
    img[:, 4:] = 1.0
    small = resize_to_model(img, 4)
    assert small.shape == (4, 4)
    assert torch.allclose(small[:, 0], torch.zeros(4)) and torch.allclose(small[:, 3], torch.ones(4))


def test_mask_to_native_shape_and_geometry():
    logits = torch.full((1, 64, 64), -5.0)
    logits[0, :, :32] = 5.0  # left half is lung
    mask = mask_to_native(logits, 2140, 1760)
    assert mask.shape == (2140, 1760) and mask.dtype == torch.bool
    # the boundary maps to the native image's middle column
    assert mask[:, :880].all() and not mask[:, 880:].any()


def test_mask_round_trip_is_identity_on_model_grid():
    logits = torch.randn(64, 64)
    assert torch.equal(mask_to_native(logits, 64, 64), logits >= 0)


def test_mask_round_trip_through_native_grid_recovers_mask():
    # A blocky mask up-sampled to native size and back keeps its pixels.
    rng = np.random.default_rng(0)
    blocks = rng.random((8, 8)) > 0.5
    mask256 = np.kron(blocks, np.ones((32, 32), dtype=bool))
    logits = torch.as_tensor(np.where(mask256, 4.0, -4.0), dtype=torch.float32)
    native = mask_to_native(logits, 1024, 768)
    back = resize_to_model(native.float(), 256) >= 0.5
    agreement = (back.numpy() == mask256).mean()
    assert agreement > 0.995
