"""Adversarial and L1 losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cyclegan.losses import gan_loss, l1_loss

PRED = [0.5, -1.0, 2.0, 0.0]


def pred() -> torch.Tensor:
    return torch.tensor(PRED).reshape(1, 1, 2, 2)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("for_discriminator", [True, False])
def test_lsgan_is_mse_to_one_and_zero(for_discriminator):
    # (0.5-1)^2 + (-1-1)^2 + (2-1)^2 + (0-1)^2 = 0.25 + 4 + 1 + 1 = 6.25
    assert gan_loss(pred(), True, "lsgan", for_discriminator).item() == pytest.approx(6.25 / 4)
    # 0.25 + 1 + 4 + 0 = 5.25
    assert gan_loss(pred(), False, "lsgan", for_discriminator).item() == pytest.approx(5.25 / 4)


@pytest.mark.parametrize("for_discriminator", [True, False])
def test_vanilla_is_bce_with_logits(for_discriminator):
    # -log(sigmoid(p)) = softplus(-p); -log(1 - sigmoid(p)) = softplus(p)
    real = sum(softplus(-p) for p in PRED) / 4
    fake = sum(softplus(p) for p in PRED) / 4
    assert real == pytest.approx(0.6518535, abs=1e-6)
    assert gan_loss(pred(), True, "vanilla", for_discriminator).item() == pytest.approx(real)
    assert gan_loss(pred(), False, "vanilla", for_discriminator).item() == pytest.approx(fake)


def test_hinge_for_the_discriminator():
    # relu(1 - p): 0.5, 2, 0, 1; relu(1 + p): 1.5, 0, 3, 1
    assert gan_loss(pred(), True, "hinge", True).item() == pytest.approx(3.5 / 4)
    assert gan_loss(pred(), False, "hinge", True).item() == pytest.approx(5.5 / 4)


def test_hinge_for_the_generator_is_minus_the_mean():
    assert gan_loss(pred(), True, "hinge", False).item() == pytest.approx(-1.5 / 4)


def test_lsgan_gradient():
    p = pred().requires_grad_(True)
    gan_loss(p, True, "lsgan", True).backward()
    expected = torch.tensor([2 * (v - 1) / 4 for v in PRED]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(p.grad, expected)


def test_losses_are_fp32_for_bf16_predictions():
    p = pred().bfloat16()
    for mode in ("lsgan", "vanilla", "hinge"):
        loss = gan_loss(p, True, mode, True)
        assert loss.dtype == torch.float32
    assert gan_loss(p, True, "lsgan", True).item() == pytest.approx(6.25 / 4)


def test_unknown_gan_mode_raises_naming_the_field():
    with pytest.raises(ValueError, match="loss.gan_mode"):
        gan_loss(pred(), True, "wgan", True)


def test_l1_is_mean_absolute_error():
    x = torch.tensor([1.0, 2.0, 3.0, -1.0])
    target = torch.tensor([0.0, 4.0, 3.0, 1.5])
    # 1 + 2 + 0 + 2.5 = 5.5
    assert l1_loss(x, target).item() == pytest.approx(5.5 / 4)
    assert l1_loss(x.bfloat16(), target).dtype == torch.float32
    assert l1_loss(x, x).item() == 0.0
