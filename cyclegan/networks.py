"""CycleGAN networks: the ResNet generator and the 70x70 PatchGAN discriminator.

Both follow the paper and the official implementation layer for layer, so parameter counts match
and the generator's ``state_dict`` keys are the official ones (``model.1.weight``,
``model.10.conv_block.1.weight``, ... ``model.26.weight``): official ``*_net_G_A.pth`` files load
with ``strict=True``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from cyclegan.config import ModelConfig

# helpers


def norm_layer(kind: str):
    """Return a constructor ``f(num_channels) -> nn.Module`` for a normalisation kind."""
    if kind == "instance":
        # The paper's instance norm: no affine parameters, no running statistics.
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if kind == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if kind == "none":
        return lambda _channels: nn.Identity()
    raise ValueError(f"model.norm: unknown normalisation {kind!r} (use instance, batch or none)")


def init_weights(net: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise conv/linear weights (N(0, gain) by default) and zero their biases, in place."""

    def init(m: nn.Module) -> None:
        name = type(m).__name__
        if hasattr(m, "weight") and m.weight is not None and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                nn.init.orthogonal_(m.weight, gain=gain)
            else:
                raise ValueError(f"model.init_type: unknown init {init_type!r}")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif "BatchNorm2d" in name:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)

    net.apply(init)
    return net


# blocks


class ResnetBlock(nn.Module):
    """Two reflection-padded 3x3 convs with a skip connection (official name: ``conv_block``)."""

    def __init__(self, dim: int, norm, use_bias: bool):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias),
            norm(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias),
            norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


# models


class ResnetGenerator(nn.Module):
    """``c7s1-ngf, d2ngf, d4ngf, R4ngf x n_blocks, u2ngf, ungf, c7s1-3`` with a tanh output.

    Inputs whose height or width is not a multiple of 4 are reflection-padded up to one and the
    output is cropped back, so the output always has the input's size.
    """

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        norm: str = "instance",
    ):
        super().__init__()
        make_norm = norm_layer(norm)
        # Convs keep their bias unless a batch norm follows (as in the official code).
        use_bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
            make_norm(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsampling
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                make_norm(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4, make_norm, use_bias) for _ in range(n_blocks)]
        for i in range(2):  # upsampling
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult,
                    ngf * mult // 2,
                    3,
                    stride=2,
                    padding=1,
                    output_padding=1,
                    bias=use_bias,
                ),
                make_norm(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [
            nn.ReflectionPad2d(3),
            nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 4, (-w) % 4
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > 3 else "replicate")
            return self.model(x)[..., :h, :w]
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``C64 (no norm) - C128 - C256 - C512 (stride 1) - 1`` for ``n_layers=3``.

    4x4 kernels, LeakyReLU 0.2; each output value judges a 70x70 patch of the input.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        make_norm = norm_layer(norm)
        use_bias = norm != "batch"
        kw, padw = 4, 1
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=padw, bias=use_bias),
                make_norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(ndf * mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_generator(cfg: ModelConfig) -> ResnetGenerator:
    """A generator for ``cfg``, initialised as the config says."""
    net = ResnetGenerator(cfg.input_nc, cfg.output_nc, cfg.ngf, cfg.n_blocks, cfg.norm)
    return init_weights(net, cfg.init_type, cfg.init_gain)


def build_discriminator(cfg: ModelConfig, input_nc: int | None = None) -> NLayerDiscriminator:
    """A PatchGAN discriminator for ``cfg`` (``input_nc`` defaults to the output channels)."""
    nc = cfg.output_nc if input_nc is None else input_nc
    net = NLayerDiscriminator(nc, cfg.ndf, cfg.n_layers_D, cfg.norm)
    return init_weights(net, cfg.init_type, cfg.init_gain)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
