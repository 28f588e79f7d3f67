"""CycleGAN in pure PyTorch: networks, losses, image pool, schedules, the train step,
checkpoints and metrics. No Ray, MLflow or torch.distributed here."""

from cyclegan.config import AugmentConfig, LossConfig, ModelConfig, OptimConfig
from cyclegan.image_pool import ImagePool
from cyclegan.networks import NLayerDiscriminator, ResnetGenerator, count_parameters
from cyclegan.train_step import CycleGANNets, Optimizers, Pools, train_step

__all__ = [
    "AugmentConfig",
    "CycleGANNets",
    "ImagePool",
    "LossConfig",
    "ModelConfig",
    "NLayerDiscriminator",
    "OptimConfig",
    "Optimizers",
    "Pools",
    "ResnetGenerator",
    "count_parameters",
    "train_step",
]
