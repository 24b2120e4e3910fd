"""MultiMix model, blocks and registry, on the tiny variant with 64x64 inputs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import mmcli.models
from mmcli.models import MultiMix, MultiMixOutput, create_model, list_models, model_kwargs
from mmcli.models.registry import register_model

SIZE = 64
TINY = (4, 8, 16, 32, 64)
# preset -> which of (cls_logits, seg_logits, saliency) it returns
PRESETS = {
    "multimix_tiny": (True, True, True),
    "multimix": (True, True, True),
    "umtls": (True, True, True),
    "umtl": (True, True, False),
    "unet": (False, True, False),
    "enc": (True, False, False),
}
PARAMS_MULTIMIX = 1_966_627


def tiny(name: str = "multimix_tiny", seed: int = 0, **overrides: object) -> MultiMix:
    torch.manual_seed(seed)
    model = create_model(name, widths=TINY, **overrides)
    assert isinstance(model, MultiMix)
    return model


def batch(n: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def reference_saliency(model: MultiMix, x: Tensor) -> Tensor:
    """|d logit of the predicted class / d x|, one image at a time, max-normalised."""
    maps = []
    for image in x:
        leaf = image[None].clone().requires_grad_(True)
        logits = model.classify(model.encode(leaf).bottleneck)[0]
        (grad,) = torch.autograd.grad(logits[logits.argmax()], leaf)
        maps.append(grad.abs() / grad.abs().max())
    return torch.cat(maps)


def assert_outputs_equal(a: MultiMixOutput, b: MultiMixOutput) -> None:
    for left, right in zip(a, b, strict=True):
        assert (left is None) == (right is None)
        if left is not None:
            assert torch.equal(left, right)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shapes(name: str) -> None:
    model = tiny(name).eval()
    with torch.no_grad():
        out = model(batch(3))
    assert isinstance(out, MultiMixOutput)
    shapes = ((3, 2), (3, 1, SIZE, SIZE), (3, 1, SIZE, SIZE))
    for tensor, present, shape in zip(out, PRESETS[name], shapes, strict=True):
        assert (tensor is not None) == present
        if tensor is not None:
            assert tuple(tensor.shape) == shape


def test_parameter_count_and_bridge_width() -> None:
    with torch.device("meta"):
        model = create_model("multimix")
        no_bridge = create_model("umtl")
    assert sum(p.numel() for p in model.parameters()) == PARAMS_MULTIMIX
    assert model.decoder[0].conv[0].in_channels == 256 + 128 + 2
    assert no_bridge.decoder[0].conv[0].in_channels == 256 + 128


def test_eval_is_deterministic() -> None:
    model, x = tiny().eval(), batch()
    first, second = model(x), model(x)
    assert_outputs_equal(first, second)
    with torch.no_grad():
        third, fourth = model(x), model(x)
    assert_outputs_equal(third, fourth)
    for graph, no_graph in zip(first, third, strict=True):
        torch.testing.assert_close(graph.detach(), no_graph)


def test_dropout_active_in_train() -> None:
    model, x = tiny().train(), batch()
    first, second = model(x), model(x)
    assert not torch.equal(first.cls_logits, second.cls_logits)
    assert not torch.equal(first.seg_logits, second.seg_logits)


def test_saliency_matches_independent_gradient() -> None:
    model, x = tiny().eval(), batch(3)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.saliency, reference_saliency(model, x))
    assert out.saliency.amin() >= 0
    torch.testing.assert_close(out.saliency.amax(dim=(1, 2, 3)), torch.ones(3))


def test_saliency_without_normalisation_is_raw_gradient() -> None:
    model, x = tiny(saliency_norm="none").eval(), batch()
    leaf = x.clone().requires_grad_(True)
    logits = model.classify(model.encode(leaf).bottleneck)
    (grad,) = torch.autograd.grad(logits.max(dim=1).values.sum(), leaf)
    with torch.no_grad():
        torch.testing.assert_close(model(x).saliency, grad.abs())


def test_samples_are_independent() -> None:
    model, x = tiny().eval(), batch()
    with torch.no_grad():
        together = model(x)
        alone = [model(x[i : i + 1]) for i in range(2)]
    for field, tensor in zip(together._fields, together, strict=True):
        torch.testing.assert_close(tensor, torch.cat([getattr(o, field) for o in alone]), msg=field)


def test_no_grad_outputs_and_no_grad_leakage() -> None:
    model = tiny().eval()
    x = batch().requires_grad_(True)
    with torch.no_grad():
        out = model(x)
    assert all(not t.requires_grad and t.grad_fn is None for t in out)
    model.train()
    train_out = model(x)
    assert train_out.cls_logits.requires_grad and train_out.seg_logits.requires_grad
    assert not train_out.saliency.requires_grad
    model(x.detach())
    assert x.grad is None
    assert all(p.grad is None for p in model.parameters())


def test_backward_reaches_every_parameter() -> None:
    model = tiny().train()
    out = model(batch())
    (out.seg_logits.mean() + out.cls_logits.logsumexp(dim=1).mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bridge_passes_no_gradient_to_encoder() -> None:
    model, x = tiny(dropout=0.0).eval(), batch()
    out = model(x)
    out.seg_logits.square().mean().backward()
    through_model = [p.grad.clone() for p in model.encoder.parameters()]
    model.zero_grad()
    features = model.encode(x)
    constant = out.saliency.clone()  # same values, no graph by construction
    bridge = model.bridge_input(x, constant, size=features.skips[-1].shape[-2:])
    model.decode(features, bridge).square().mean().backward()
    for grad, param in zip(through_model, model.encoder.parameters(), strict=True):
        torch.testing.assert_close(grad, param.grad)


def test_bridge_changes_segmentation() -> None:
    model, x = tiny().eval(), batch()
    with torch.no_grad():
        out = model(x)
        features = model.encode(x)
        size = features.skips[-1].shape[-2:]
        seg = model.decode(features, model.bridge_input(x, out.saliency, size))
        zeroed = model.decode(features, model.bridge_input(x, torch.zeros_like(out.saliency), size))
    torch.testing.assert_close(seg, out.seg_logits)
    assert (seg - zeroed).abs().max() > 1e-4


def test_bf16_autocast_close_to_fp32() -> None:
    model, x = tiny().eval(), batch()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert all(torch.isfinite(t).all() for t in low)
    torch.testing.assert_close(low.cls_logits.float(), ref.cls_logits, atol=0.1, rtol=0.1)
    torch.testing.assert_close(low.seg_logits.float(), ref.seg_logits, atol=0.3, rtol=0.1)
    assert (low.saliency - ref.saliency).abs().mean() < 0.1


def test_channels_last_matches_contiguous() -> None:
    model, x = tiny().eval(), batch()
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    for left, right in zip(out, ref, strict=True):
        torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-4)


def test_inference_mode() -> None:
    model, plain = tiny().eval(), tiny("umtl").eval()
    with torch.inference_mode():
        x = batch()
        with pytest.raises(RuntimeError, match="no_grad"):
            model(x)
        assert plain(x).saliency is None
    with torch.no_grad():  # an inference tensor used outside inference mode still works
        assert torch.isfinite(model(x).saliency).all()


@pytest.mark.parametrize(("shape", "match"), [((1, 1, 60, 64), "divisible by 16"), ((1, 3, 64, 64), "shape")])
def test_bad_input_raises(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny()(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seg_head": False},
        {"cls_head": False},
        {"saliency_norm": "l2"},
        {"widths": (4, 8, 16, 32)},
        {"dropout": 1.0},
    ],
)
def test_bad_config_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MultiMix(**kwargs)


def test_registry_lists_and_rejects_unknown() -> None:
    assert set(PRESETS) <= set(list_models())
    with pytest.raises(ValueError, match=r"Unknown model 'nope'\. Available: .*multimix_tiny"):
        create_model("nope")
    with pytest.raises(ValueError, match="Unknown model"):
        model_kwargs("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_model("multimix")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="both heads"):
        create_model("unet", bridge=True)


def test_model_kwargs_rebuild_the_model() -> None:
    kwargs = model_kwargs("enc", widths=TINY, num_classes=3)
    assert kwargs["seg_head"] is False and kwargs["bridge"] is False
    assert kwargs["num_classes"] == 3 and tuple(kwargs["widths"]) == TINY
    model = tiny("enc", num_classes=3)
    rebuilt = MultiMix(**json.loads(json.dumps(kwargs)))
    assert rebuilt.init_kwargs == model.init_kwargs == kwargs
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes


def test_models_import_only_torch() -> None:
    allowed = {"__future__", "collections", "typing", "torch", "mmcli"}
    for path in Path(mmcli.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("mmcli"):  # the models and the bottom layer of shared settings only
                    assert name.startswith(("mmcli.models", "mmcli.config")), f"{path.name} imports {name}"


def test_instance_norm_equals_torch_instance_norm():
    from mmcli.models.blocks import InstanceNorm

    torch.manual_seed(0)
    ours, ref = InstanceNorm(6), torch.nn.InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 20, 12) * 4 + 2
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_fast_cpu_dropout_is_dropout() -> None:
    from mmcli.models.blocks import Dropout

    drop = Dropout(0.25).train()
    x = torch.rand(200_003) + 0.5  # odd size: the byte mask is cut to length
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    # each element dropped with probability 1/4 (binomial sd about 0.001), survivors scaled by 4/3
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.005
    torch.testing.assert_close(y[kept], x[kept] * (4 / 3))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global generator fixes it
    assert not torch.equal(drop(x), y)
    # neighbouring bytes of one 64-bit draw are independent: pairs follow 1/4 x 1/4
    pairs = (~kept[: 200_000]).view(-1, 2).all(dim=1).float().mean().item()
    assert abs(pairs - 1 / 16) < 0.004
    # gradient: the same mask and scale
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    out = drop(xg)
    out.sum().backward()
    torch.testing.assert_close(xg.grad, (out != 0).float() * (4 / 3))
    assert torch.equal(drop.eval()(x), x)
    # p with 256 p fractional falls back to nn.Dropout
    odd = Dropout(0.3).train()
    assert abs((odd(x) == 0).float().mean().item() - 0.3) < 0.005


def _pool_input() -> Tensor:
    """Random maps with every kind of tie a 2 x 2 window can hold (constant bands, equal pairs)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 10)
    x[0, 0, :6] = 0.5  # constant: all four tie, the top-left one wins
    x[0, 1, 0, 1] = x[0, 1, 1, 0] = 9.0  # top-right and bottom-left tie
    x[1, 2, 4, 0] = x[1, 2, 5, 1] = 9.0  # top-left and bottom-right tie
    x[1, 1, 2, 3] = x[1, 1, 3, 3] = 9.0  # the right column ties with itself
    return x


def test_fast_cpu_max_pool_is_max_pool() -> None:
    from mmcli.models.blocks import MaxPool2x2

    x = _pool_input()
    ours, ref = MaxPool2x2(), nn.MaxPool2d(2)
    assert torch.equal(ours(x), ref(x))
    g = torch.randn(2, 3, 6, 5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(ours(xa), xa, g)
    (gb,) = torch.autograd.grad(ref(xb), xb, g)
    assert torch.equal(ga, gb)  # the same winners, ties included
    assert ga[0, 0, 0, 0] == g[0, 0, 0, 0] and ga[0, 1, 0, 1] == g[0, 1, 0, 0] and ga[0, 1, 1, 0] == 0
    # odd sizes and other layouts take PyTorch's kernel
    odd = torch.randn(1, 2, 7, 9)
    assert torch.equal(ours(odd), ref(odd))
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(cl), ref(cl))


def test_fast_cpu_upsample_is_bilinear() -> None:
    from mmcli.models.blocks import upsample2x

    torch.manual_seed(0)
    for shape in [(2, 3, 5, 7), (1, 1, 1, 1), (1, 4, 16, 16)]:
        x = torch.randn(*shape)
        ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        got = upsample2x(x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # with autograd it is PyTorch's own, so gradients flow
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    upsample2x(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))


def test_fast_cpu_kernels_keep_the_model_outputs() -> None:
    from conftest import load_benchmark

    from mmcli.models.blocks import MaxPool2x2

    torch.manual_seed(0)
    model = MultiMix().eval()
    ref = load_benchmark("model_kernels").torch_kernels(MultiMix().eval())  # PyTorch's own kernels
    ref.load_state_dict(model.state_dict())
    assert not any(isinstance(m, MaxPool2x2) for m in ref.modules())
    assert not any(m.inplace for m in ref.modules() if isinstance(m, nn.LeakyReLU))
    x = torch.rand(2, 1, 64, 64)
    x[1, :, :16] = 0.0  # a blank band: ties in every pool
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert torch.equal(ours.cls_logits, theirs.cls_logits)
    assert torch.equal(ours.saliency, theirs.saliency)
    torch.testing.assert_close(ours.seg_logits, theirs.seg_logits, atol=1e-5, rtol=0)


def test_model_arguments_are_bounded() -> None:
    from mmcli.models.multimix import MAX_WIDTH

    with torch.device("meta"):
        create_model("multimix", widths=(16, 32, 64, 128, MAX_WIDTH))
        for bad in ({"widths": (16, 32, 64, 128, MAX_WIDTH + 1)}, {"widths": (0, 8, 16, 32, 64)},
                    {"in_chans": 5}, {"num_classes": 0}):
            with pytest.raises(ValueError, match="widths|in_chans"):
                create_model("multimix", **bad)
