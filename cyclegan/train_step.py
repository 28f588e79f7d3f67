"""One CycleGAN iteration: the generator update, then the discriminator update.

The four nets may arrive wrapped (DDP, ``torch.compile``); the step never looks inside them except
to call a discriminator without its DDP wrapper during the generator update (see ``_g_step``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from cyclegan.config import LossConfig, ModelConfig, OptimConfig
from cyclegan.image_pool import ImagePool
from cyclegan.losses import gan_loss, l1_loss
from cyclegan.networks import build_discriminator, build_generator

LOSS_NAMES = (
    "loss/G_A",
    "loss/G_B",
    "loss/cycle_A",
    "loss/cycle_B",
    "loss/idt_A",
    "loss/idt_B",
    "loss/G",
    "loss/D_A",
    "loss/D_B",
)


@dataclass
class CycleGANNets:
    """G_A: A -> B, G_B: B -> A, D_A judges domain B, D_B judges domain A."""

    G_A: nn.Module
    G_B: nn.Module
    D_A: nn.Module
    D_B: nn.Module

    def items(self) -> list[tuple[str, nn.Module]]:
        return [("G_A", self.G_A), ("G_B", self.G_B), ("D_A", self.D_A), ("D_B", self.D_B)]


@dataclass
class Optimizers:
    G: torch.optim.Optimizer
    D: torch.optim.Optimizer


@dataclass
class Pools:
    """``fake_A`` feeds D_B, ``fake_B`` feeds D_A."""

    fake_A: ImagePool
    fake_B: ImagePool


def build_nets(cfg: ModelConfig) -> CycleGANNets:
    return CycleGANNets(
        G_A=build_generator(cfg),
        G_B=build_generator(cfg.reversed()),
        D_A=build_discriminator(cfg, cfg.output_nc),
        D_B=build_discriminator(cfg, cfg.input_nc),
    )


def build_optimizers(nets: CycleGANNets, cfg: OptimConfig, fused: bool | None = None) -> Optimizers:
    """One Adam for both generators, one for both discriminators."""

    def adam(*modules: nn.Module) -> torch.optim.Adam:
        params = [p for m in modules for p in m.parameters()]
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)

    return Optimizers(G=adam(nets.G_A, nets.G_B), D=adam(nets.D_A, nets.D_B))


def build_pools(size: int, seed: int) -> Pools:
    return Pools(fake_A=ImagePool(size, seed), fake_B=ImagePool(size, seed + 1))


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``.module``); other modules unchanged."""
    return getattr(net, "module", net)


def _set_requires_grad(nets: tuple[nn.Module, ...], flag: bool) -> None:
    for net in nets:
        net.requires_grad_(flag)


def _apply_pair(net: nn.Module, x: torch.Tensor, y: torch.Tensor, fuse: bool):
    """``net(x), net(y)``; as one batched call when the nets normalise per sample."""
    if fuse:
        out = net(torch.cat([x, y]))
        return out[: len(x)], out[len(x) :]
    return net(x), net(y)


def train_step(
    nets: CycleGANNets,
    opts: Optimizers,
    pools: Pools,
    real_A: torch.Tensor,
    real_B: torch.Tensor,
    cfg: LossConfig,
    autocast_dtype: torch.dtype | None = None,
    fuse_calls: bool = True,
    skip_nonfinite: bool = False,
) -> dict[str, float]:
    """Update both generators, then both discriminators, on one (A, B) batch.

    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward passes under autocast; losses
    are computed in fp32. ``fuse_calls`` batches a generator's two inputs into one call, which is
    exact for instance norm (per-sample statistics) and must be off for batch norm.
    ``skip_nonfinite`` leaves the weights of an update whose loss is NaN/Inf untouched (at the
    cost of one host sync per update). Returns the losses as floats, keyed by ``LOSS_NAMES``.
    """
    # Long on purpose: the paper's iteration (G step, then D step) reads best as one piece, like the original.
    device_type = real_A.device.type
    autocast = (
        torch.autocast(device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    use_idt = cfg.lambda_identity > 0

    # Generator update, discriminators frozen.
    _set_requires_grad((nets.D_A, nets.D_B), False)
    with autocast:
        if use_idt:
            fake_B, idt_A = _apply_pair(nets.G_A, real_A, real_B, fuse_calls)
            fake_A, idt_B = _apply_pair(nets.G_B, real_B, real_A, fuse_calls)
        else:
            fake_B, fake_A = nets.G_A(real_A), nets.G_B(real_B)
        rec_A = nets.G_B(fake_B)
        rec_B = nets.G_A(fake_A)
        # The frozen discriminators are called unwrapped: their parameters take no gradient in
        # this backward, so DDP has nothing to reduce and must not expect a reduction.
        loss_G_A = gan_loss(unwrap(nets.D_A)(fake_B), True, cfg.gan_mode, False)
        loss_G_B = gan_loss(unwrap(nets.D_B)(fake_A), True, cfg.gan_mode, False)
    loss_cycle_A = l1_loss(rec_A, real_A) * cfg.lambda_A
    loss_cycle_B = l1_loss(rec_B, real_B) * cfg.lambda_B
    if use_idt:
        loss_idt_A = l1_loss(idt_A, real_B) * cfg.lambda_B * cfg.lambda_identity
        loss_idt_B = l1_loss(idt_B, real_A) * cfg.lambda_A * cfg.lambda_identity
    else:
        loss_idt_A = loss_idt_B = torch.zeros((), device=real_A.device)
    loss_G = (
        cfg.lambda_gan * (loss_G_A + loss_G_B)
        + loss_cycle_A
        + loss_cycle_B
        + loss_idt_A
        + loss_idt_B
    )
    g_losses = [loss_G_A, loss_G_B, loss_cycle_A, loss_cycle_B, loss_idt_A, loss_idt_B, loss_G]
    opts.G.zero_grad(set_to_none=True)
    if skip_nonfinite and not torch.isfinite(loss_G):
        # Skip the whole iteration: non-finite fakes must not enter the pools either.
        _set_requires_grad((nets.D_A, nets.D_B), True)
        nan = torch.full((), float("nan"), device=real_A.device)
        return _as_floats([*g_losses, nan, nan])
    loss_G.backward()
    opts.G.step()

    # Discriminator update on real images and pooled, detached fakes.
    _set_requires_grad((nets.D_A, nets.D_B), True)
    pooled_B = pools.fake_B.query(fake_B.detach())
    pooled_A = pools.fake_A.query(fake_A.detach())
    with autocast:
        real_pred_A, fake_pred_A = _apply_pair(
            nets.D_A, real_B, pooled_B.to(real_B.dtype), fuse_calls
        )
        real_pred_B, fake_pred_B = _apply_pair(
            nets.D_B, real_A, pooled_A.to(real_A.dtype), fuse_calls
        )
    mode = cfg.gan_mode
    loss_D_A = 0.5 * (
        gan_loss(real_pred_A, True, mode, True) + gan_loss(fake_pred_A, False, mode, True)
    )
    loss_D_B = 0.5 * (
        gan_loss(real_pred_B, True, mode, True) + gan_loss(fake_pred_B, False, mode, True)
    )
    opts.D.zero_grad(set_to_none=True)
    loss_D = loss_D_A + loss_D_B
    if not (skip_nonfinite and not torch.isfinite(loss_D)):
        loss_D.backward()
        opts.D.step()

    return _as_floats([*g_losses, loss_D_A, loss_D_B])


def _as_floats(losses: list[torch.Tensor]) -> dict[str, float]:
    # One device-to-host copy for all losses.
    values = torch.stack([x.detach().float() for x in losses]).cpu().tolist()
    return dict(zip(LOSS_NAMES, values, strict=True))


@torch.no_grad()
def translate_cycle(
    nets: CycleGANNets, real_A: torch.Tensor, real_B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """fake_B, rec_A, fake_A, rec_B for sample grids and evaluation (no gradients)."""
    G_A, G_B = unwrap(nets.G_A), unwrap(nets.G_B)
    fake_B, fake_A = G_A(real_A), G_B(real_B)
    return {"fake_B": fake_B, "rec_A": G_B(fake_B), "fake_A": fake_A, "rec_B": G_A(fake_A)}
