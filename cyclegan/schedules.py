"""The learning-rate schedule: constant for ``n_epochs``, then linear decay over ``n_epochs_decay``."""

from __future__ import annotations

import functools

import torch
from torch.optim.lr_scheduler import LambdaLR

from cyclegan.config import OptimConfig


def lr_factor(epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the initial lr during 0-based ``epoch`` (the official repo's formula).

    1.0 for the first ``n_epochs`` epochs, then falling by ``1 / (n_epochs_decay + 1)`` per epoch.
    """
    return 1.0 - max(0, epoch + 1 - cfg.n_epochs) / float(cfg.n_epochs_decay + 1)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> LambdaLR:
    """A scheduler stepped once per epoch; its ``state_dict`` holds only plain numbers."""
    return LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))


def set_base_lr(scheduler: LambdaLR, lr: float) -> None:
    """Give a (restored) schedule a new base learning rate, keeping its position: what a
    population-based search does when it perturbs ``lr`` of a copied run."""
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = group["lr"] * lr / base
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
