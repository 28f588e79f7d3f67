"""Typed configuration of the model, the losses, the optimiser and the image preprocessing.

Defaults are the paper's settings (256 px, 9 residual blocks). Every dataclass validates itself
when built and raises ``ValueError`` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

NORMS = ("instance", "batch", "none")
INITS = ("normal", "xavier", "kaiming", "orthogonal")
GAN_MODES = ("lsgan", "vanilla", "hinge")
PREPROCESS = ("resize_and_crop", "crop", "scale_width_and_crop", "none")
MAX_SIZE = 8192  # px: load_size and crop_size
MAX_CHANNELS = 64
MAX_FILTERS = 1024
MAX_BLOCKS = 64
MAX_LAYERS_D = 8


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


def _check_range(value, low, high, field: str) -> None:
    _check(low <= value <= high, field, f"must be in [{low}, {high}], got {value}")


def _check_finite(section, prefix: str) -> None:
    """Every float field of ``section`` is a finite number: NaN compares false with everything
    and inf passes every lower bound, so bounds alone do not catch them."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}.{f.name}: must be a finite number, got {value}")


def _check_choice(value: str, choices: tuple[str, ...], field: str) -> None:
    _check(value in choices, field, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """Architecture of the two generators and two discriminators."""

    input_nc: int = 3
    """Channels of domain A images (1 to 64)."""
    output_nc: int = 3
    """Channels of domain B images (1 to 64)."""
    ngf: int = 64
    """Filters in the generator's first conv layer (1 to 1024)."""
    ndf: int = 64
    """Filters in the discriminator's first conv layer (1 to 1024)."""
    n_blocks: int = 9
    """Residual blocks in the generator (0 to 64; 9 at 256 px, 6 at 128 px in the paper)."""
    n_layers_D: int = 3
    """Strided conv layers in the PatchGAN discriminator (1 to 8; 3 gives 70x70 patches)."""
    norm: str = "instance"
    """Normalisation layer: instance, batch or none."""
    init_type: str = "normal"
    """Weight init: normal, xavier, kaiming or orthogonal."""
    init_gain: float = 0.02
    """Standard deviation (or gain) of the weight init (finite, > 0)."""

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        for name in ("input_nc", "output_nc"):
            _check_range(getattr(self, name), 1, MAX_CHANNELS, f"model.{name}")
        for name in ("ngf", "ndf"):
            _check_range(getattr(self, name), 1, MAX_FILTERS, f"model.{name}")
        _check_range(self.n_blocks, 0, MAX_BLOCKS, "model.n_blocks")
        _check_range(self.n_layers_D, 1, MAX_LAYERS_D, "model.n_layers_D")
        _check_choice(self.norm, NORMS, "model.norm")
        _check_choice(self.init_type, INITS, "model.init_type")
        _check(self.init_gain > 0, "model.init_gain", "must be > 0")

    def reversed(self) -> ModelConfig:
        """The config of the reverse generator G_B (B -> A): channels exchanged."""
        return dataclasses.replace(self, input_nc=self.output_nc, output_nc=self.input_nc)


@dataclass
class LossConfig:
    """Weights of the loss terms and the image history pool."""

    gan_mode: str = "lsgan"
    """Adversarial loss: lsgan (least squares), vanilla (BCE with logits) or hinge."""
    lambda_A: float = 10.0
    """Weight of the forward cycle loss A -> B -> A."""
    lambda_B: float = 10.0
    """Weight of the backward cycle loss B -> A -> B."""
    lambda_identity: float = 0.5
    """Identity loss weight, as a fraction of lambda_A / lambda_B (0 disables it)."""
    lambda_gan: float = 1.0
    """Weight of the generators' adversarial losses (0 trains with cycle losses alone)."""
    pool_size: int = 50
    """Fake images kept per discriminator in the history pool (0 disables the pool)."""

    def __post_init__(self) -> None:
        _check_finite(self, "loss")
        _check_choice(self.gan_mode, GAN_MODES, "loss.gan_mode")
        for name in ("lambda_A", "lambda_B", "lambda_identity", "lambda_gan"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")
        _check(self.pool_size >= 0, "loss.pool_size", "must be >= 0")


@dataclass
class OptimConfig:
    """Adam and the learning-rate schedule (constant, then linear decay)."""

    lr: float = 2e-4
    """Initial learning rate of both Adam optimisers."""
    beta1: float = 0.5
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    n_epochs: int = 100
    """Epochs at the initial learning rate."""
    n_epochs_decay: int = 100
    """Epochs of linear decay to zero after n_epochs."""

    def __post_init__(self) -> None:
        _check_finite(self, "optim")
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(0 <= self.beta1 < 1, "optim.beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "optim.beta2", "must be in [0, 1)")
        _check(self.n_epochs >= 0, "optim.n_epochs", "must be >= 0")
        _check(self.n_epochs_decay >= 0, "optim.n_epochs_decay", "must be >= 0")
        _check(self.n_epochs + self.n_epochs_decay >= 1, "optim.n_epochs", "no epochs to train")

    @property
    def total_epochs(self) -> int:
        return self.n_epochs + self.n_epochs_decay


@dataclass
class AugmentConfig:
    """How training images are resized, cropped and flipped."""

    preprocess: str = "resize_and_crop"
    """resize_and_crop, crop, scale_width_and_crop or none."""
    load_size: int = 286
    """Size images are resized to (the width for scale_width_and_crop) before cropping (4 to
    8192 px)."""
    crop_size: int = 256
    """Size of the random square crop fed to the networks (4 to 8192 px)."""
    flip: bool = True
    """Random horizontal flips."""

    def __post_init__(self) -> None:
        _check_choice(self.preprocess, PREPROCESS, "data.preprocess")
        _check_range(self.crop_size, 4, MAX_SIZE, "data.crop_size")
        _check_range(self.load_size, 4, MAX_SIZE, "data.load_size")
        if self.preprocess in ("resize_and_crop", "scale_width_and_crop"):
            _check(
                self.crop_size <= self.load_size,
                "data.crop_size",
                f"crop_size {self.crop_size} is larger than load_size {self.load_size}",
            )


# Image sizes of a configuration (here, not in transforms: Ray Data's decode tasks and
# coordinators use them and need no torch).


def load_size(cfg: AugmentConfig) -> tuple[int, int] | Callable[[int, int], tuple[int, int]] | None:
    """The size training loads an image at before its random crop: a (width, height), a
    function of the image's (width, height), or None to keep it (crop, none)."""
    if cfg.preprocess == "resize_and_crop":
        return cfg.load_size, cfg.load_size
    if cfg.preprocess == "scale_width_and_crop":

        def scale_width(width: int, height: int) -> tuple[int, int]:
            # Width becomes load_size; height keeps the aspect ratio but never drops below the
            # crop. Capped at 4x the width: a 1x32768 strip must not become a multi-GB canvas.
            new_h = min(max(cfg.load_size * height / width, cfg.crop_size), 4 * cfg.load_size)
            return cfg.load_size, int(new_h)

        return scale_width
    return None


def eval_size(cfg: AugmentConfig) -> tuple[int, int] | None:
    """The fixed whole-image view at the training resolution (samples, evaluation)."""
    return None if cfg.preprocess == "none" else (cfg.crop_size, cfg.crop_size)
