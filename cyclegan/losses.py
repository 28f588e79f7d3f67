"""Adversarial losses (least squares, vanilla, hinge) and the L1 cycle/identity loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gan_loss(
    pred: torch.Tensor, target_is_real: bool, mode: str, for_discriminator: bool
) -> torch.Tensor:
    """Adversarial loss of discriminator output ``pred`` against a real (1) or fake (0) target.

    ``lsgan``: mean squared error to 1/0. ``vanilla``: BCE with logits. ``hinge``: the
    discriminator minimises relu(1 - pred) on reals and relu(1 + pred) on fakes; the generator
    minimises -pred.
    """
    pred = pred.float()  # losses in fp32 even under autocast
    if mode == "lsgan":
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        return F.mse_loss(pred, target)
    if mode == "vanilla":
        target = torch.ones_like(pred) if target_is_real else torch.zeros_like(pred)
        return F.binary_cross_entropy_with_logits(pred, target)
    if mode == "hinge":
        if not for_discriminator:
            return -pred.mean()
        return F.relu(1.0 - pred).mean() if target_is_real else F.relu(1.0 + pred).mean()
    raise ValueError(f"loss.gan_mode: unknown mode {mode!r}")


def l1_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, computed in fp32 (the cycle and identity losses)."""
    return F.l1_loss(x.float(), target.float())
