import math

import pytest
import torch

from mmcli.training.losses import (
    LossWeights,
    cross_entropy,
    foreground_kl_consistency,
    pseudo_label_loss,
    soft_dice_loss,
    total_loss,
)


def test_cross_entropy_hand_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = torch.tensor([0, 1])
    # sample 0: -log(1/2); sample 1: p(1) = 1/4 -> -log(1/4)
    assert cross_entropy(logits, labels).item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)


def test_soft_dice_per_image_then_mean():
    # image 0: p = 0.5 everywhere (logit 0), mask = 2 ones of 4 pixels
    # dice0 = (2 * 1 + 1) / (2 + 2 + 1) = 0.6 ; image 1: p ~ 1 on all, mask all ones
    # dice1 = (2 * 4 + 1) / (4 + 4 + 1) = 1
    logits = torch.zeros(2, 1, 2, 2)
    logits[1] = 30.0
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    assert soft_dice_loss(logits, masks).item() == pytest.approx(((1 - 0.6) + 0.0) / 2, abs=1e-6)
    # empty mask, empty prediction: smoothing gives a perfect score, not 0/0
    assert soft_dice_loss(torch.full((1, 1, 2, 2), -40.0), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(0, abs=1e-6)


def test_pseudo_label_loss_hand_value_and_mean_over_whole_batch():
    weak = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0], [0.0, math.log(4.0)]])  # conf 0.9, 0.5, 0.8
    strong = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, math.log(3.0)]])
    loss, mask = pseudo_label_loss(weak, strong, threshold=0.7)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    # CE(strong0, 0) = log 2 ; CE(strong2, 1) = -log(3/4); divided by 3 (whole batch)
    assert loss.item() == pytest.approx((math.log(2) - math.log(0.75)) / 3, abs=1e-6)


def test_pseudo_label_mask_exactly_at_threshold():
    weak = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # confidences 0.5 (exact) and ~0.731
    strong = torch.zeros(2, 2)
    conf1 = float(torch.softmax(weak, 1)[1].max())
    assert pseudo_label_loss(weak, strong, 0.5)[1].tolist() == [1.0, 1.0]
    assert pseudo_label_loss(weak, strong, math.nextafter(0.5, 1.0))[1].tolist() == [0.0, 1.0]
    assert pseudo_label_loss(weak, strong, conf1)[1].tolist() == [0.0, 1.0]
    assert pseudo_label_loss(weak, strong, math.nextafter(conf1, 2.0))[1].tolist() == [0.0, 0.0]


def test_pseudo_labels_carry_no_gradient():
    weak = torch.tensor([[2.0, 0.0]], requires_grad=True)
    strong = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss, _ = pseudo_label_loss(weak, strong, 0.7)
    loss.backward()
    assert weak.grad is None or torch.all(weak.grad == 0)
    assert strong.grad.abs().sum() > 0


def test_consistency_hand_value():
    lab = torch.zeros(1, 1, 1, 1)  # P_l = 0.5
    unl = torch.full((2, 1, 1, 1), math.log(4.0))  # P_u = 0.8
    want = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert foreground_kl_consistency(lab, unl).item() == pytest.approx(want, abs=1e-6)
    # batch means, not per-sample: logits +-z average to 0.5 like logit 0
    unl2 = torch.tensor([3.0, -3.0]).reshape(2, 1, 1, 1)
    assert foreground_kl_consistency(lab, unl2).item() == pytest.approx(0.0, abs=1e-7)


def test_consistency_gradient_is_not_zero_and_only_on_unlabelled():
    torch.manual_seed(0)
    lab = torch.randn(3, 1, 8, 8, requires_grad=True)
    unl = torch.randn(4, 1, 8, 8, requires_grad=True)
    loss = foreground_kl_consistency(lab, unl)
    loss.backward()
    assert loss.item() > 0
    assert unl.grad is not None and unl.grad.abs().sum() > 0
    assert lab.grad is None or torch.all(lab.grad == 0)


def test_consistency_is_stable_for_extreme_logits():
    lab = torch.full((1, 1, 2, 2), 80.0)
    unl = torch.full((1, 1, 2, 2), -80.0, requires_grad=True)
    loss = foreground_kl_consistency(lab, unl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(unl.grad).all()


def test_total_loss_weights():
    w = LossWeights()
    terms = {"ce": torch.tensor(1.0), "pseudo": torch.tensor(2.0), "dice": torch.tensor(0.5),
             "consistency": torch.tensor(10.0)}
    assert total_loss(terms, w).item() == pytest.approx(1 + 0.25 * 2 + 5 * 0.5 + 0.01 * 10)
    assert total_loss({"dice": torch.tensor(0.5)}, w).item() == pytest.approx(2.5)
    with pytest.raises(ValueError):
        total_loss({"kl": torch.tensor(1.0)}, w)


def test_cross_entropy_with_label_smoothing_is_the_smoothed_target_s():
    from mmcli.training.losses import cross_entropy

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 3.0]])
    labels = torch.tensor([0, 1, 1])
    logp = torch.log_softmax(logits, dim=1)
    for e in (0.0, 0.1, 0.4):
        target = torch.full((3, 2), e / 2)
        target[torch.arange(3), labels] = 1 - e / 2
        want = -(target * logp).sum(1).mean()
        assert float(cross_entropy(logits, labels, e)) == pytest.approx(float(want), abs=1e-6)
    assert float(cross_entropy(logits, labels, 0.1)) != pytest.approx(float(cross_entropy(logits, labels)), abs=1e-3)
