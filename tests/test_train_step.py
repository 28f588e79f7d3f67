"""One training iteration: which nets change, the loss values, and the fast paths (fused calls,
bf16 autocast, channels_last) against the plain fp32 step."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cyclegan.config import LossConfig, ModelConfig, OptimConfig
from cyclegan.train_step import (
    LOSS_NAMES,
    CycleGANNets,
    build_nets,
    build_optimizers,
    build_pools,
    train_step,
    translate_cycle,
)

TINY = ModelConfig(ngf=8, ndf=8, n_blocks=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Nets this small gain nothing from intra-op threads, and on a busy machine waiting at the
    threads' barriers makes every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_state(seed: int = 0, model: ModelConfig = TINY, pool_size: int = 50, lr: float = 2e-4):
    torch.manual_seed(seed)
    nets = build_nets(model)
    opts = build_optimizers(nets, OptimConfig(lr=lr))
    pools = build_pools(pool_size, seed)
    return nets, opts, pools


def make_batch(seed: int, n: int = 2, size: int = 32, channels: tuple[int, int] = (3, 3)):
    gen = torch.Generator().manual_seed(seed)
    real_A = torch.rand(n, channels[0], size, size, generator=gen) * 2 - 1
    real_B = torch.rand(n, channels[1], size, size, generator=gen) * 2 - 1
    return real_A, real_B


def snapshot(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def unchanged(net: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


def all_params(nets: CycleGANNets) -> list[torch.Tensor]:
    return [p for _, net in nets.items() for p in net.parameters()]


def normalised_away(net: nn.Module) -> set[str]:
    """Names of conv biases that the instance norm right after the conv cancels.

    Their true gradient is zero, and Adam turns the rounding noise they get into full-size steps,
    so two exact-in-theory computations move them differently; they are compared through the
    nets' outputs instead, which do not depend on them.
    """
    names = set()
    for prefix, module in net.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (_, after) in zip(children, children[1:], strict=False):
            is_conv = isinstance(layer, nn.Conv2d | nn.ConvTranspose2d)
            if is_conv and layer.bias is not None and isinstance(after, nn.InstanceNorm2d):
                names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def assert_nets_close(nets: CycleGANNets, other: CycleGANNets, rtol: float, atol: float) -> None:
    """Same weights (but for biases cancelled by a norm) and the same outputs on a probe batch."""
    probe_A, probe_B = make_batch(99)
    for (name, net), (_, ref) in zip(nets.items(), other.items(), strict=True):
        skip = normalised_away(net)
        assert skip, name
        ref_params = dict(ref.named_parameters())
        for key, p in net.named_parameters():
            if key not in skip:
                torch.testing.assert_close(p, ref_params[key], rtol=rtol, atol=atol, msg=key)
    with torch.no_grad():
        for a, b, x in [
            (nets.G_A, other.G_A, probe_A),
            (nets.G_B, other.G_B, probe_B),
            (nets.D_A, other.D_A, probe_B),
            (nets.D_B, other.D_B, probe_A),
        ]:
            torch.testing.assert_close(a(x), b(x), rtol=rtol, atol=atol)


def reference_step(nets: CycleGANNets, real_A, real_B, cfg: LossConfig, optim: OptimConfig):
    """The official CycleGAN iteration written out on copies of the nets (lsgan, pool filling)."""
    G_A, G_B, D_A, D_B = (copy.deepcopy(net) for _, net in nets.items())
    betas = (optim.beta1, optim.beta2)
    opt_G = torch.optim.Adam(itertools.chain(G_A.parameters(), G_B.parameters()), optim.lr, betas)
    opt_D = torch.optim.Adam(itertools.chain(D_A.parameters(), D_B.parameters()), optim.lr, betas)

    def mse_to(pred, value):
        return F.mse_loss(pred, torch.full_like(pred, value))

    fake_B, fake_A = G_A(real_A), G_B(real_B)
    rec_A, rec_B = G_B(fake_B), G_A(fake_A)
    idt_A, idt_B = G_A(real_B), G_B(real_A)
    for p in itertools.chain(D_A.parameters(), D_B.parameters()):
        p.requires_grad_(False)
    losses = {
        "loss/G_A": mse_to(D_A(fake_B), 1.0),
        "loss/G_B": mse_to(D_B(fake_A), 1.0),
        "loss/cycle_A": (rec_A - real_A).abs().mean() * cfg.lambda_A,
        "loss/cycle_B": (rec_B - real_B).abs().mean() * cfg.lambda_B,
        "loss/idt_A": (idt_A - real_B).abs().mean() * cfg.lambda_B * cfg.lambda_identity,
        "loss/idt_B": (idt_B - real_A).abs().mean() * cfg.lambda_A * cfg.lambda_identity,
    }
    losses["loss/G"] = cfg.lambda_gan * (losses["loss/G_A"] + losses["loss/G_B"]) + sum(
        losses[k] for k in ("loss/cycle_A", "loss/cycle_B", "loss/idt_A", "loss/idt_B")
    )
    losses["loss/G"].backward()
    opt_G.step()
    for p in itertools.chain(D_A.parameters(), D_B.parameters()):
        p.requires_grad_(True)
    losses["loss/D_A"] = 0.5 * (mse_to(D_A(real_B), 1.0) + mse_to(D_A(fake_B.detach()), 0.0))
    losses["loss/D_B"] = 0.5 * (mse_to(D_B(real_A), 1.0) + mse_to(D_B(fake_A.detach()), 0.0))
    (losses["loss/D_A"] + losses["loss/D_B"]).backward()
    opt_D.step()
    values = {k: v.item() for k, v in losses.items()}
    return values, CycleGANNets(G_A, G_B, D_A, D_B), fake_A.detach(), fake_B.detach()


@pytest.mark.parametrize("fuse_calls", [False, True])
def test_step_matches_the_official_algorithm(fuse_calls):
    # Unequal weights catch a swapped lambda; pool filling returns the fakes themselves.
    cfg = LossConfig(lambda_A=3.0, lambda_B=7.0, lambda_identity=0.2, lambda_gan=0.5)
    optim = OptimConfig()
    nets, opts, pools = make_state(seed=1)
    real_A, real_B = make_batch(1)
    expected, ref_nets, fake_A, fake_B = reference_step(nets, real_A, real_B, cfg, optim)

    losses = train_step(nets, opts, pools, real_A, real_B, cfg, fuse_calls=fuse_calls)

    assert list(losses) == list(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert losses[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert_nets_close(nets, ref_nets, rtol=1e-4, atol=1e-5)
    # Each pool holds the fakes of the generator before its update: fake_B feeds D_A.
    torch.testing.assert_close(torch.stack(pools.fake_B.images), fake_B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(pools.fake_A.images), fake_A, rtol=1e-5, atol=1e-6)


def test_returns_the_loss_names_as_finite_floats():
    nets, opts, pools = make_state()
    losses = train_step(nets, opts, pools, *make_batch(0), LossConfig())
    assert tuple(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert type(value) is float, name
        assert math.isfinite(value), name
    parts = ("loss/G_A", "loss/G_B", "loss/cycle_A", "loss/cycle_B", "loss/idt_A", "loss/idt_B")
    assert losses["loss/G"] == pytest.approx(sum(losses[k] for k in parts), rel=1e-5)
    assert losses["loss/idt_A"] > 0


def test_step_updates_all_four_nets_and_leaves_them_trainable():
    nets, opts, pools = make_state()
    before = {name: snapshot(net) for name, net in nets.items()}
    train_step(nets, opts, pools, *make_batch(0), LossConfig())
    for name, net in nets.items():
        assert not unchanged(net, before[name]), name
        assert all(p.requires_grad for p in net.parameters()), name


def test_generator_step_does_not_touch_the_discriminators():
    nets, opts, pools = make_state()
    for group in opts.D.param_groups:
        group["lr"] = 0.0
    before = {name: snapshot(net) for name, net in nets.items()}
    train_step(nets, opts, pools, *make_batch(0), LossConfig())
    assert unchanged(nets.D_A, before["D_A"])
    assert unchanged(nets.D_B, before["D_B"])
    assert not unchanged(nets.G_A, before["G_A"])
    assert not unchanged(nets.G_B, before["G_B"])


def test_discriminator_step_does_not_touch_the_generators():
    nets, opts, pools = make_state()
    for group in opts.G.param_groups:
        group["lr"] = 0.0
    before = {name: snapshot(net) for name, net in nets.items()}
    train_step(nets, opts, pools, *make_batch(0), LossConfig())
    assert unchanged(nets.G_A, before["G_A"])
    assert unchanged(nets.G_B, before["G_B"])
    assert not unchanged(nets.D_A, before["D_A"])
    assert not unchanged(nets.D_B, before["D_B"])
    assert all(p.requires_grad for p in all_params(nets))


def test_optimizers_hold_disjoint_parameter_sets():
    nets, opts, _ = make_state()
    g = {id(p) for group in opts.G.param_groups for p in group["params"]}
    d = {id(p) for group in opts.D.param_groups for p in group["params"]}
    assert g == {id(p) for p in [*nets.G_A.parameters(), *nets.G_B.parameters()]}
    assert d == {id(p) for p in [*nets.D_A.parameters(), *nets.D_B.parameters()]}


def test_fused_calls_match_separate_calls_for_instance_norm():
    results = []
    for fuse in (True, False):
        nets, opts, pools = make_state(seed=2, pool_size=2)
        losses = [
            train_step(nets, opts, pools, *make_batch(s), LossConfig(pool_size=2), fuse_calls=fuse)
            for s in range(3)
        ]
        results.append((losses, nets))
    (losses_f, nets_f), (losses_s, nets_s) = results
    for a, b in zip(losses_f, losses_s, strict=True):
        for name in LOSS_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    assert_nets_close(nets_f, nets_s, rtol=1e-3, atol=1e-5)


def test_bf16_autocast_runs_on_cpu_close_to_fp32():
    batch = make_batch(3)
    nets, opts, pools = make_state(seed=3)
    fp32 = train_step(nets, opts, pools, *batch, LossConfig())
    nets, opts, pools = make_state(seed=3)
    bf16 = train_step(nets, opts, pools, *batch, LossConfig(), autocast_dtype=torch.bfloat16)
    for name in LOSS_NAMES:
        assert math.isfinite(bf16[name]), name
        assert bf16[name] == pytest.approx(fp32[name], rel=0.05, abs=0.02), name
    assert all(p.dtype == torch.float32 for p in all_params(nets))
    assert all(torch.isfinite(p).all() for p in all_params(nets))
    # A second step reuses the bf16 fakes now held in the pools.
    again = train_step(nets, opts, pools, *batch, LossConfig(), autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in again.values())


def test_channels_last_matches_contiguous():
    batch = make_batch(4)
    nets, opts, pools = make_state(seed=4)
    plain = train_step(nets, opts, pools, *batch, LossConfig())
    plain_nets = nets

    nets, opts, pools = make_state(seed=4)
    for _, net in nets.items():
        net.to(memory_format=torch.channels_last)
    real_A, real_B = (x.contiguous(memory_format=torch.channels_last) for x in batch)
    fast = train_step(nets, opts, pools, real_A, real_B, LossConfig())
    for name in LOSS_NAMES:
        assert fast[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-6), name
    assert_nets_close(nets, plain_nets, rtol=1e-3, atol=1e-5)
    conv_weight = nets.G_A.model[4].weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)


def test_no_identity_loss_reports_zero():
    nets, opts, pools = make_state()
    losses = train_step(nets, opts, pools, *make_batch(0), LossConfig(lambda_identity=0.0))
    assert losses["loss/idt_A"] == 0.0
    assert losses["loss/idt_B"] == 0.0
    assert losses["loss/cycle_A"] > 0
    parts = ("loss/G_A", "loss/G_B", "loss/cycle_A", "loss/cycle_B")
    assert losses["loss/G"] == pytest.approx(sum(losses[k] for k in parts), rel=1e-5)


def test_different_channel_counts_without_identity_loss():
    model = ModelConfig(input_nc=1, output_nc=3, ngf=8, ndf=8, n_blocks=1)
    nets, opts, pools = make_state(model=model)
    real_A, real_B = make_batch(0, channels=(1, 3))
    losses = train_step(nets, opts, pools, real_A, real_B, LossConfig(lambda_identity=0.0))
    assert all(math.isfinite(v) for v in losses.values())
    out = translate_cycle(nets, real_A, real_B)
    assert out["fake_B"].shape == real_B.shape
    assert out["rec_A"].shape == real_A.shape
    assert out["fake_A"].shape == real_A.shape
    assert out["rec_B"].shape == real_B.shape


@pytest.mark.parametrize("gan_mode", ["vanilla", "hinge"])
def test_other_gan_modes_train(gan_mode):
    nets, opts, pools = make_state()
    cfg = LossConfig(gan_mode=gan_mode)
    before = snapshot(nets.D_A)
    losses = train_step(nets, opts, pools, *make_batch(0), cfg)
    assert all(math.isfinite(v) for v in losses.values())
    assert not unchanged(nets.D_A, before)


def test_translate_cycle_composes_the_generators_without_gradients():
    nets, _, _ = make_state()
    real_A, real_B = make_batch(0)
    out = translate_cycle(nets, real_A, real_B)
    with torch.no_grad():
        torch.testing.assert_close(out["fake_B"], nets.G_A(real_A))
        torch.testing.assert_close(out["rec_A"], nets.G_B(nets.G_A(real_A)))
        torch.testing.assert_close(out["rec_B"], nets.G_A(nets.G_B(real_B)))
    assert not any(t.requires_grad for t in out.values())


def test_a_tiny_model_overfits_a_fixed_pair_of_batches():
    nets, opts, pools = make_state(seed=5, lr=1e-3)
    # Smooth images (8x8 noise upsampled): a net this small cannot memorise pixel noise quickly.
    batches = [
        tuple(F.interpolate(x, size=32, mode="bilinear") for x in make_batch(seed, size=8))
        for seed in (10, 11)
    ]
    cfg = LossConfig()
    history = []
    for step in range(200):
        losses = train_step(nets, opts, pools, *batches[step % 2], cfg)
        history.append(losses["loss/cycle_A"] + losses["loss/cycle_B"])
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.5 * first, (first, last)
