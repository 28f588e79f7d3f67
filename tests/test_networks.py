"""Generator and discriminator: shapes, parameter counts, the official key layout, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cyclegan.checkpoint import load_official_generator
from cyclegan.config import ModelConfig
from cyclegan.networks import (
    NLayerDiscriminator,
    ResnetGenerator,
    build_discriminator,
    build_generator,
    count_parameters,
    init_weights,
    norm_layer,
)

TINY = {"ngf": 8, "n_blocks": 2}


def official_generator_layout(
    input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9
) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict keys and shapes of the official ResnetGenerator, from its layout rules.

    ``model`` is one ``nn.Sequential``: pad, conv7 (1), norm, relu; two downsampling blocks of
    conv3 s2, norm, relu (convs at 4 and 7); ``n_blocks`` residual blocks (10 ...), each with
    ``conv_block`` = pad, conv (1), norm, relu, pad, conv (5), norm; two upsampling blocks of
    transposed conv, norm, relu; pad, conv7, tanh.
    """
    layout: list[tuple[str, tuple[int, ...]]] = []

    def conv(prefix: str, out_c: int, in_c: int, k: int) -> None:
        layout.append((f"{prefix}.weight", (out_c, in_c, k, k)))
        layout.append((f"{prefix}.bias", (out_c,)))

    def transposed(prefix: str, in_c: int, out_c: int, k: int) -> None:
        # ConvTranspose2d stores its weight as (in_channels, out_channels, k, k).
        layout.append((f"{prefix}.weight", (in_c, out_c, k, k)))
        layout.append((f"{prefix}.bias", (out_c,)))

    conv("model.1", ngf, input_nc, 7)
    conv("model.4", 2 * ngf, ngf, 3)
    conv("model.7", 4 * ngf, 2 * ngf, 3)
    for block in range(10, 10 + n_blocks):
        conv(f"model.{block}.conv_block.1", 4 * ngf, 4 * ngf, 3)
        conv(f"model.{block}.conv_block.5", 4 * ngf, 4 * ngf, 3)
    up = 10 + n_blocks
    transposed(f"model.{up}", 4 * ngf, 2 * ngf, 3)
    transposed(f"model.{up + 3}", 2 * ngf, ngf, 3)
    conv(f"model.{up + 7}", output_nc, ngf, 7)
    return layout


def official_instance_norm_prefixes(n_blocks: int = 9) -> list[tuple[str, int]]:
    """(module prefix, channels) of every instance norm in the official 9-block, ngf 64 layout."""
    ngf = 64
    prefixes = [("model.2", ngf), ("model.5", 2 * ngf), ("model.8", 4 * ngf)]
    for block in range(10, 10 + n_blocks):
        prefixes += [(f"model.{block}.conv_block.2", 4 * ngf)]
        prefixes += [(f"model.{block}.conv_block.6", 4 * ngf)]
    up = 10 + n_blocks
    prefixes += [(f"model.{up + 1}", 2 * ngf), (f"model.{up + 4}", ngf)]
    return prefixes


# shapes


@pytest.mark.parametrize("size", [(32, 32), (33, 33), (30, 45), (7, 9), (36, 20), (5, 6)])
def test_generator_output_has_input_size(size):
    torch.manual_seed(0)
    net = ResnetGenerator(**TINY)
    x = torch.randn(2, 3, *size)
    y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert y.abs().max() <= 1.0  # tanh output


def test_generator_multiple_of_four_needs_no_padding():
    torch.manual_seed(0)
    net = ResnetGenerator(**TINY)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(net(x), net.model(x))


def test_generator_maps_between_channel_counts():
    net = ResnetGenerator(input_nc=1, output_nc=3, **TINY)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 3, 16, 16)


def test_generator_samples_are_independent_with_instance_norm():
    torch.manual_seed(0)
    net = ResnetGenerator(**TINY)
    x = torch.randn(3, 3, 16, 16)
    batched = net(x)
    single = torch.cat([net(x[i : i + 1]) for i in range(3)])
    # Batch 3 and batch 1 may take other conv kernels, so sums round in another order: a tanh
    # output (|y| <= 1, slope <= 1) after ~20 reductions with sum K ~ 3,000 (convs C_in*kh*kw
    # <= 392, instance norms over H*W <= 256) differs by ~eps32 * sqrt(3,000) = 6.5e-6
    # (measured: 2e-6 on AVX2 and AVX-512). 15x that, under the worst case eps32 * K = 3.6e-4;
    # statistics shared across the batch would differ by O(0.1).
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


def patchgan_output_size(size: int, n_layers: int = 3) -> int:
    """4x4 convs with padding 1: n_layers with stride 2, then two with stride 1."""
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1
    for _ in range(2):
        size = size + 2 - 4 + 1
    return size


def test_patchgan_on_256_gives_30x30():
    net = NLayerDiscriminator(ndf=8)
    assert net(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)


@pytest.mark.parametrize(
    ("height", "width", "n_layers"),
    [(128, 128, 3), (256, 128, 3), (70, 70, 3), (100, 37, 3), (64, 64, 2), (96, 80, 4)],
)
def test_patchgan_output_size_formula(height, width, n_layers):
    net = NLayerDiscriminator(ndf=4, n_layers=n_layers)
    out = net(torch.randn(2, 3, height, width))
    expected = (2, 1, patchgan_output_size(height, n_layers), patchgan_output_size(width, n_layers))
    assert out.shape == expected


def test_patchgan_receptive_field_is_70x70():
    # Without normalisation an output only depends on its receptive field (LeakyReLU never
    # zeroes a gradient), so the rows and columns reached by its gradient are exactly that field.
    torch.manual_seed(0)
    net = NLayerDiscriminator(ndf=4, norm="none")
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    out = net(x)
    out[0, 0, 15, 15].backward()
    reached = x.grad[0].abs().sum(0) > 0
    rows = reached.any(1).nonzero().flatten()
    cols = reached.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


# parameter counts


def test_parameter_counts_match_the_paper():
    assert count_parameters(ResnetGenerator(ngf=64, n_blocks=9)) == 11_378_179
    assert count_parameters(ResnetGenerator(ngf=64, n_blocks=6)) == 7_837_699
    assert count_parameters(NLayerDiscriminator(ndf=64, n_layers=3)) == 2_764_737


def test_build_from_default_config_is_the_paper_model():
    cfg = ModelConfig()
    assert count_parameters(build_generator(cfg)) == 11_378_179
    assert count_parameters(build_discriminator(cfg)) == 2_764_737


# official key layout


def test_generator_keys_and_shapes_are_the_official_ones():
    expected = official_generator_layout()
    # The rules above reproduce the published parameter count on their own.
    assert sum(math.prod(shape) for _, shape in expected) == 11_378_179
    state = ResnetGenerator(ngf=64, n_blocks=9).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected


def test_generator_key_layout_scales_with_blocks_and_width():
    state = ResnetGenerator(input_nc=1, output_nc=2, ngf=8, n_blocks=3).state_dict()
    expected = official_generator_layout(input_nc=1, output_nc=2, ngf=8, n_blocks=3)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected


def test_official_generator_file_loads_strictly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(shape, generator=gen) * 0.02 for k, shape in official_generator_layout()
    }
    # Files written by old PyTorch carry instance-norm running stats; DataParallel adds module.
    for prefix, channels in official_instance_norm_prefixes():
        state[f"{prefix}.running_mean"] = torch.zeros(channels)
        state[f"{prefix}.running_var"] = torch.ones(channels)
    state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "latest_net_G_A.pth"
    torch.save(state, path)

    net = load_official_generator(path)
    assert not net.training
    loaded = net.state_dict()
    assert len(loaded) == len(official_generator_layout())
    for key, _ in official_generator_layout():
        assert torch.equal(loaded[key], state[f"module.{key}"]), key
    with torch.no_grad():
        assert net(torch.randn(1, 3, 20, 20)).shape == (1, 3, 20, 20)


def test_official_generator_with_wrong_shapes_names_the_file(tmp_path):
    path = tmp_path / "small_net_G.pth"
    torch.save(ResnetGenerator(ngf=8, n_blocks=9).state_dict(), path)
    with pytest.raises(ValueError, match="small_net_G.pth"):
        load_official_generator(path)


def test_official_generator_with_missing_keys_names_the_file(tmp_path):
    path = tmp_path / "six_blocks_net_G.pth"
    torch.save(ResnetGenerator(ngf=8, n_blocks=6).state_dict(), path)
    with pytest.raises(ValueError, match="six_blocks_net_G.pth"):
        load_official_generator(path, ModelConfig(ngf=8, n_blocks=9))


def test_official_generator_with_matching_config_loads(tmp_path):
    source = ResnetGenerator(ngf=8, n_blocks=6)
    path = tmp_path / "net_G.pth"
    torch.save(source.state_dict(), path)
    net = load_official_generator(path, ModelConfig(ngf=8, n_blocks=6))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), source(x))


# init and normalisation


def conv_modules(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


def test_normal_init_has_std_002_and_zero_bias():
    torch.manual_seed(0)
    cfg = ModelConfig(ngf=32, ndf=32, n_blocks=2)
    for net in (build_generator(cfg), build_discriminator(cfg)):
        convs = conv_modules(net)
        weights = torch.cat([m.weight.detach().flatten() for m in convs])
        assert weights.numel() > 100_000
        assert abs(weights.mean().item()) < 1e-3
        assert weights.std().item() == pytest.approx(0.02, rel=0.02)
        for m in convs:
            if m.weight.numel() >= 10_000:
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
            assert m.bias is not None
            assert torch.count_nonzero(m.bias) == 0


def test_init_gain_sets_the_std():
    torch.manual_seed(0)
    net = build_generator(ModelConfig(ngf=32, n_blocks=1, init_gain=0.05))
    weights = torch.cat([m.weight.detach().flatten() for m in conv_modules(net)])
    assert weights.std().item() == pytest.approx(0.05, rel=0.02)


@pytest.mark.parametrize(
    ("init_type", "expected_std"),
    [
        # conv 64 -> 128, 3x3: fan_in = 576, fan_out = 1152
        ("xavier", 0.02 * math.sqrt(2.0 / (576 + 1152))),
        ("kaiming", math.sqrt(2.0 / 576)),
    ],
)
def test_other_inits_follow_their_formula(init_type, expected_std):
    torch.manual_seed(0)
    net = build_generator(ModelConfig(ngf=64, n_blocks=0, init_type=init_type))
    weight = net.model[4].weight.detach()
    assert weight.shape == (128, 64, 3, 3)
    assert weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert torch.count_nonzero(net.model[4].bias) == 0


def test_orthogonal_init_gives_orthogonal_rows():
    torch.manual_seed(0)
    net = build_generator(ModelConfig(ngf=8, n_blocks=0, init_type="orthogonal", init_gain=1.0))
    weight = net.model[4].weight.detach().flatten(1)  # 16 x 72
    torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)


def test_init_weights_rejects_unknown_init():
    with pytest.raises(ValueError, match="model.init_type"):
        init_weights(ResnetGenerator(**TINY), "uniform")


def test_instance_norm_has_no_parameters_or_buffers():
    net = ResnetGenerator(**TINY)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 5 + 2 * TINY["n_blocks"]
    for m in norms:
        assert m.weight is None
        assert m.running_mean is None
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())


def test_batch_norm_builds_runs_and_tracks_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(norm="batch", **TINY, ndf=8)
    G, D = build_generator(cfg), build_discriminator(cfg)
    bns = [m for net in (G, D) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (5 + 2 * TINY["n_blocks"]) + 3  # G, then D's three inner convs
    for m in bns:
        assert torch.count_nonzero(m.bias) == 0
        assert (m.weight - 1).abs().max() < 0.15  # N(1, 0.02)
    # Convs followed by batch norm have no bias (their bias would be cancelled).
    assert G.model[1].bias is None
    assert D.model[2].bias is None
    assert D.model[0].bias is not None
    x = torch.randn(4, 3, 32, 32)
    y = G(x)
    assert y.shape == x.shape
    assert D(y).shape == (4, 1, 2, 2)
    assert all(m.running_mean.abs().sum() > 0 for m in bns)


def test_no_norm_builds_and_runs():
    torch.manual_seed(0)
    cfg = ModelConfig(norm="none", **TINY, ndf=8)
    G, D = build_generator(cfg), build_discriminator(cfg)
    for net in (G, D):
        kinds = {type(m) for m in net.modules()}
        assert not kinds & {nn.InstanceNorm2d, nn.BatchNorm2d}
        assert all(m.bias is not None for m in conv_modules(net))
    x = torch.randn(2, 3, 32, 32)
    assert G(x).shape == x.shape
    assert D(x).shape == (2, 1, 2, 2)


def test_unknown_norm_raises_naming_the_field():
    with pytest.raises(ValueError, match="model.norm"):
        norm_layer("group")
    with pytest.raises(ValueError, match="model.norm"):
        ResnetGenerator(norm="layer")
    with pytest.raises(ValueError, match="model.norm"):
        NLayerDiscriminator(norm="layer")
