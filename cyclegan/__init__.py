"""CycleGAN in pure PyTorch: networks, losses, image pool, schedules, the train step,
checkpoints and metrics. No Ray, MLflow or torch.distributed here.

The names below load their module on first use, so that ``cyclegan.config`` (plain
dataclasses, what every process that reads a run's config needs) does not bring in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AugmentConfig": "cyclegan.config",
    "LossConfig": "cyclegan.config",
    "ModelConfig": "cyclegan.config",
    "OptimConfig": "cyclegan.config",
    "ImagePool": "cyclegan.image_pool",
    "NLayerDiscriminator": "cyclegan.networks",
    "ResnetGenerator": "cyclegan.networks",
    "count_parameters": "cyclegan.networks",
    "CycleGANNets": "cyclegan.train_step",
    "Optimizers": "cyclegan.train_step",
    "Pools": "cyclegan.train_step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cyclegan' has no attribute {name!r}")
