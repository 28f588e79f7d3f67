"""The official implementation's iteration, as the baseline of ``bench step``.

``CycleGANModel.optimize_parameters`` of the authors' repository (pytorch-CycleGAN-and-pix2pix),
written out call for call on this project's nets, optimizers and pools, so that the two steps
do the same math on the same weights: the forward (G_A(real_A), G_B(fake_B), G_B(real_B),
G_A(fake_A)), the identity passes, the generator losses and one backward; then each
discriminator on its real and its pooled fake batch in separate calls, each with its own
backward. fp32, contiguous memory, one call per image batch: what that code does on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cyclegan.config import LossConfig
from cyclegan.train_step import CycleGANNets, Optimizers, Pools


def _gan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    # GANLoss('lsgan'): MSE against a target tensor of the prediction's shape.
    target = torch.tensor(1.0 if real else 0.0).expand_as(pred)
    return F.mse_loss(pred, target)


def _set_requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for param in net.parameters():
            param.requires_grad = flag


def official_step(
    nets: CycleGANNets,
    opts: Optimizers,
    pools: Pools,
    real_A: torch.Tensor,
    real_B: torch.Tensor,
    cfg: LossConfig,
) -> dict[str, float]:
    """One iteration as ``optimize_parameters`` runs it (lsgan, identity loss on)."""
    # forward()
    fake_B = nets.G_A(real_A)
    rec_A = nets.G_B(fake_B)
    fake_A = nets.G_B(real_B)
    rec_B = nets.G_A(fake_A)
    # G_A and G_B
    _set_requires_grad([nets.D_A, nets.D_B], False)
    opts.G.zero_grad()
    idt_A = nets.G_A(real_B)
    loss_idt_A = F.l1_loss(idt_A, real_B) * cfg.lambda_B * cfg.lambda_identity
    idt_B = nets.G_B(real_A)
    loss_idt_B = F.l1_loss(idt_B, real_A) * cfg.lambda_A * cfg.lambda_identity
    loss_G_A = _gan(nets.D_A(fake_B), True)
    loss_G_B = _gan(nets.D_B(fake_A), True)
    loss_cycle_A = F.l1_loss(rec_A, real_A) * cfg.lambda_A
    loss_cycle_B = F.l1_loss(rec_B, real_B) * cfg.lambda_B
    loss_G = loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B
    loss_G.backward()
    opts.G.step()
    # D_A and D_B
    _set_requires_grad([nets.D_A, nets.D_B], True)
    opts.D.zero_grad()
    losses = {}
    for name, net, real, pool, fake in (
        ("D_A", nets.D_A, real_B, pools.fake_B, fake_B),
        ("D_B", nets.D_B, real_A, pools.fake_A, fake_A),
    ):
        pooled = pool.query(fake)
        loss_D = (_gan(net(real), True) + _gan(net(pooled.detach()), False)) * 0.5
        loss_D.backward()
        losses[f"loss/{name}"] = loss_D.item()
    opts.D.step()
    return {"loss/G": loss_G.item(), **losses}
