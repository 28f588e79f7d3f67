"""One training iteration: which nets change, the loss values, and the fast paths (fused calls,
bf16 autocast, channels_last) against the plain fp32 step."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cyclegan.config import LossConfig, ModelConfig, OptimConfig
from cyclegan.train_step import (
    LOSS_NAMES,
    CycleGANNets,
    Optimizers,
    build_nets,
    build_optimizers,
    build_pools,
    train_step,
    translate_cycle,
)

TINY = ModelConfig(ngf=8, ndf=8, n_blocks=2)


pytestmark = pytest.mark.usefixtures("one_thread")


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


# Tolerances for two ways of computing one training step (channels_last or contiguous, one
# batched call or two, the official loop), derived from fp32 arithmetic: eps32 = 2**-23 = 1.2e-7.
# The paths run other kernels (and oneDNN blocks differently per CPU: AVX2, AVX-512), so their
# sums of K terms round in another order and differ by about eps32 * sqrt(K) of their size,
# eps32 * K at worst.
#
# Forward values are continuous in those errors. A loss chains G_A, G_B and an L1 mean (or a
# generator and D): about 25 reductions in series with sum K ~ 16,500 (convs K = C_in*kh*kw <=
# 392, instance norms over H*W <= 1024, the L1 mean over 2*3*32*32 = 6,144), so eps32 *
# sqrt(16,500) = 1.5e-5 relative (measured on AVX2 and AVX-512: <= 1.5e-6 over 30 seeds);
# LOSS_RTOL is 6x that and still 20x under the worst case eps32 * 16,500 = 2e-3.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6  # the atol only for losses that are exactly 0
# One generator's output (tanh: |y| <= 1, slope <= 1): sum K ~ 5,200, eps32 * sqrt(5,200) =
# 8.6e-6 absolute; 12x that (the worst case is 6e-4).
OUTPUT_ATOL = 1e-4
# Gradients are not continuous: an L1 term |rec - real|, a ReLU and a LeakyReLU change branch
# where their input crosses 0, and an input within rounding of 0 can land on either side in the
# two paths: ~0.4 M such inputs per step x 2 * 1e-6 (the forward's rounding) x ~0.4 (their
# density at 0) ~ 0.3 switches per step (measured: 5 of 30 seeds had one). A switch changes one
# term of a gradient of N terms, by about 2/sqrt(N) of its norm: 2.6e-2 for an L1 mean over
# N = 2*3*32*32 (measured: 3.0e-2 of a generator's gradient norm), less in larger maps, up to
# 0.8/sqrt(2*64*3*3) = 2.4e-2 for a LeakyReLU on D's last map. Compared per net and norm-wise,
# with room for two switches (rounding alone, eps32 * 4,096 for the longest reduction: 5e-4):
GRAD_RTOL = 6e-2
# Adam's first step is -lr * g / (|g| + eps) = -lr * sign(g), up to lr * eps / |g|. Where both
# paths' gradients have one sign and |g| >= 100 * eps, the updated weights agree within 2 * lr /
# 100 plus the rounding of w (ulp(0.1) = 7e-9); elsewhere (a gradient within noise of 0) they may
# be 2 * lr apart and are not compared. A switch moves a net's gradient elements by ~GRAD_RTOL of
# their rms, so signs can differ only for a fraction ~2 * 0.06 * 0.4 = 5% of them:
SAME_SIGN_MIN = 0.9  # the share of each net's weights that must be compared


def normalised_away(net: nn.Module) -> set[str]:
    """Names of conv biases that the instance norm right after the conv cancels.

    Their true gradient is zero, so what two exact-in-theory computations give them is rounding
    noise (and Adam turns it into full-size steps); nothing the nets compute depends on them, so
    they are left out of the comparisons.
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


@dataclass
class Step:
    """One training step as seen from outside: its losses, each parameter's gradient as the
    optimizer got it, and the weights before and after (keyed ``G_A.model.1.weight``)."""

    losses: dict[str, float]
    grads: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    first_adam_step: bool
    lr: float
    eps: float


def weights(nets: CycleGANNets) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.detach().clone()
        for name, net in nets.items()
        for key, p in net.named_parameters()
    }


@contextlib.contextmanager
def recorded(nets: CycleGANNets, opts: Optimizers):
    """Yields a dict that collects every gradient as ``opts`` step with it."""
    names = {
        id(p): f"{name}.{key}" for name, net in nets.items() for key, p in net.named_parameters()
    }
    grads: dict[str, torch.Tensor] = {}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()

    hooks = [opts.G.register_step_pre_hook(record), opts.D.register_step_pre_hook(record)]
    try:
        yield grads
    finally:
        for hook in hooks:
            hook.remove()


def run_step(nets, opts, pools, real_A, real_B, cfg: LossConfig, **kwargs) -> Step:
    before, first = weights(nets), not opts.G.state and not opts.D.state
    with recorded(nets, opts) as grads:
        losses = train_step(nets, opts, pools, real_A, real_B, cfg, **kwargs)
    group = opts.G.param_groups[0]
    return Step(losses, grads, before, weights(nets), first, group["lr"], group["eps"])


def assert_steps_match(step: Step, ref: Step, nets: CycleGANNets) -> None:
    """The same step by two paths, to the tolerances above: losses, each net's gradients and,
    after Adam's first step, the weights whose gradient has a definite sign."""
    for name in LOSS_NAMES:
        expected = pytest.approx(ref.losses[name], rel=LOSS_RTOL, abs=LOSS_ATOL)
        assert step.losses[name] == expected, name
    for name, net in nets.items():
        skip = {f"{name}.{key}" for key in normalised_away(net)}
        assert skip, name
        keys = [f"{name}.{key}" for key, _ in net.named_parameters()]
        keys = [k for k in keys if k not in skip]
        assert set(step.grads) >= set(keys) and set(ref.grads) >= set(keys), name

        def flat(tensors: dict[str, torch.Tensor], keys=keys) -> torch.Tensor:
            return torch.cat([tensors[k].flatten() for k in keys])

        g, g_ref = flat(step.grads), flat(ref.grads)
        error = ((g - g_ref).norm() / g_ref.norm()).item()
        assert error <= GRAD_RTOL, f"{name}: gradients differ by {error:.1e} of their norm"
        assert torch.equal(flat(step.before), flat(ref.before)), f"{name}: different start"
        if not (step.first_adam_step and ref.first_adam_step):
            continue
        definite = (g.sign() == g_ref.sign()) & (
            torch.minimum(g.abs(), g_ref.abs()) >= 100 * ref.eps
        )
        assert definite.float().mean() >= SAME_SIGN_MIN, f"{name}: gradient signs differ"
        w, w_ref = flat(step.after)[definite], flat(ref.after)[definite]
        torch.testing.assert_close(w, w_ref, rtol=0, atol=2 * ref.lr / 100, msg=name)
        assert not torch.equal(w, flat(step.before)[definite]), f"{name}: not updated"


def reference_step(nets: CycleGANNets, real_A, real_B, cfg: LossConfig, optim: OptimConfig):
    """The official CycleGAN iteration written out on copies of the nets (lsgan, pool filling)."""
    G_A, G_B, D_A, D_B = (copy.deepcopy(net) for _, net in nets.items())
    ref_nets = CycleGANNets(G_A, G_B, D_A, D_B)
    betas = (optim.beta1, optim.beta2)
    opt_G = torch.optim.Adam(itertools.chain(G_A.parameters(), G_B.parameters()), optim.lr, betas)
    opt_D = torch.optim.Adam(itertools.chain(D_A.parameters(), D_B.parameters()), optim.lr, betas)
    before = weights(ref_nets)

    def mse_to(pred, value):
        return F.mse_loss(pred, torch.full_like(pred, value))

    with recorded(ref_nets, Optimizers(opt_G, opt_D)) as grads:
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
    step = Step(values, grads, before, weights(ref_nets), True, optim.lr, opt_G.defaults["eps"])
    return step, fake_A.detach(), fake_B.detach()


@pytest.mark.parametrize("fuse_calls", [False, True])
def test_step_matches_the_official_algorithm(fuse_calls):
    # Unequal weights catch a swapped lambda; pool filling returns the fakes themselves.
    cfg = LossConfig(lambda_A=3.0, lambda_B=7.0, lambda_identity=0.2, lambda_gan=0.5)
    nets, opts, pools = make_state(seed=1)
    real_A, real_B = make_batch(1)
    expected, fake_A, fake_B = reference_step(nets, real_A, real_B, cfg, OptimConfig())

    step = run_step(nets, opts, pools, real_A, real_B, cfg, fuse_calls=fuse_calls)

    assert list(step.losses) == list(LOSS_NAMES)
    assert_steps_match(step, expected, nets)
    # Each pool holds the fakes of the generator before its update: fake_B feeds D_A.
    for pooled, fake in ((pools.fake_B.images, fake_B), (pools.fake_A.images, fake_A)):
        torch.testing.assert_close(torch.stack(pooled), fake, rtol=0, atol=OUTPUT_ATOL)


def test_returns_the_loss_names_as_finite_floats():
    nets, opts, pools = make_state()
    losses = train_step(nets, opts, pools, *make_batch(0), LossConfig())
    assert tuple(losses) == LOSS_NAMES
    for name, value in losses.items():
        assert type(value) is float, name
        assert math.isfinite(value), name
    parts = ("loss/G_A", "loss/G_B", "loss/cycle_A", "loss/cycle_B", "loss/idt_A", "loss/idt_B")
    # Five fp32 additions of parts >= 0 against a float64 sum: <= 5 * eps32 = 6e-7 relative.
    assert losses["loss/G"] == pytest.approx(sum(losses[k] for k in parts), rel=1e-5)
    assert losses["loss/idt_A"] > 0


def test_step_updates_all_four_nets_and_leaves_them_trainable():
    nets, opts, pools = make_state()
    before = {name: snapshot(net) for name, net in nets.items()}
    train_step(nets, opts, pools, *make_batch(0), LossConfig())
    for name, net in nets.items():
        assert not unchanged(net, before[name]), name
        assert all(p.requires_grad for p in net.parameters()), name


@pytest.mark.parametrize(
    ("frozen", "stepped", "untouched"),
    [("D", ("G_A", "G_B"), ("D_A", "D_B")), ("G", ("D_A", "D_B"), ("G_A", "G_B"))],
    ids=["generator_step_leaves_discriminators", "discriminator_step_leaves_generators"],
)
def test_each_step_updates_only_its_own_nets(frozen, stepped, untouched):
    """With one optimiser's lr at 0, only the other's nets change: the generator step does
    not update the discriminators through the shared graph, nor the other way round."""
    nets, opts, pools = make_state()
    for group in getattr(opts, frozen).param_groups:
        group["lr"] = 0.0
    before = {name: snapshot(net) for name, net in nets.items()}
    train_step(nets, opts, pools, *make_batch(0), LossConfig())
    for name in untouched:
        assert unchanged(getattr(nets, name), before[name]), name
    for name in stepped:
        assert not unchanged(getattr(nets, name), before[name]), name
    assert all(p.requires_grad for p in all_params(nets))


def test_optimizers_hold_disjoint_parameter_sets():
    nets, opts, _ = make_state()
    g = {id(p) for group in opts.G.param_groups for p in group["params"]}
    d = {id(p) for group in opts.D.param_groups for p in group["params"]}
    assert g == {id(p) for p in [*nets.G_A.parameters(), *nets.G_B.parameters()]}
    assert d == {id(p) for p in [*nets.D_A.parameters(), *nets.D_B.parameters()]}


def test_fused_calls_match_separate_calls_for_instance_norm():
    # Three steps (the pools fill, then swap images), each from one state on both paths: the
    # separate calls go on from their own result and the fused ones start each step from a copy
    # of it (a gradient noise apart, Adam would take the paths 2 * lr apart at some weights).
    nets, opts, pools = make_state(seed=2, pool_size=2)
    cfg = LossConfig(pool_size=2)
    for seed in range(3):
        fused = copy.deepcopy((nets, opts, pools))
        step = run_step(*fused, *make_batch(seed), cfg, fuse_calls=True)
        ref = run_step(nets, opts, pools, *make_batch(seed), cfg, fuse_calls=False)
        assert step.first_adam_step == (seed == 0)
        assert_steps_match(step, ref, nets)


def test_bf16_autocast_runs_on_cpu_close_to_fp32():
    batch = make_batch(3)
    nets, opts, pools = make_state(seed=3)
    fp32 = train_step(nets, opts, pools, *batch, LossConfig())
    nets, opts, pools = make_state(seed=3)
    bf16 = train_step(nets, opts, pools, *batch, LossConfig(), autocast_dtype=torch.bfloat16)
    for name in LOSS_NAMES:
        assert math.isfinite(bf16[name]), name
        # bf16 keeps 8 significant bits (unit roundoff 2**-8 = 3.9e-3) and autocast rounds each
        # conv's input, weight and output: sqrt(3) * 3.9e-3 = 6.8e-3 per layer, ~15 layers from
        # an input to a GAN loss: sqrt(15) * 6.8e-3 = 2.6e-2 (measured: <= 1.4e-2). 2x that:
        assert bf16[name] == pytest.approx(fp32[name], rel=0.05), name
    assert all(p.dtype == torch.float32 for p in all_params(nets))
    assert all(torch.isfinite(p).all() for p in all_params(nets))
    # A second step reuses the bf16 fakes now held in the pools.
    again = train_step(nets, opts, pools, *batch, LossConfig(), autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in again.values())


def test_channels_last_matches_contiguous():
    batch = make_batch(4)
    nets, opts, pools = make_state(seed=4)
    plain = run_step(nets, opts, pools, *batch, LossConfig())

    nets, opts, pools = make_state(seed=4)
    for _, net in nets.items():
        net.to(memory_format=torch.channels_last)
    real_A, real_B = (x.contiguous(memory_format=torch.channels_last) for x in batch)
    fast = run_step(nets, opts, pools, real_A, real_B, LossConfig())
    assert_steps_match(fast, plain, nets)
    conv_weight = nets.G_A.model[4].weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)


def test_no_identity_loss_reports_zero():
    nets, opts, pools = make_state()
    losses = train_step(nets, opts, pools, *make_batch(0), LossConfig(lambda_identity=0.0))
    assert losses["loss/idt_A"] == 0.0
    assert losses["loss/idt_B"] == 0.0
    assert losses["loss/cycle_A"] > 0
    parts = ("loss/G_A", "loss/G_B", "loss/cycle_A", "loss/cycle_B")
    # As above: a few fp32 additions of parts >= 0, <= 5 * eps32 = 6e-7 relative.
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
