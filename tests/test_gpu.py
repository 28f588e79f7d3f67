"""The CUDA tier: the train step's CUDA paths (bf16 autocast, fused Adam, channels_last,
torch.compile with and without CUDA graphs) against plain fp32, checkpoints moving between GPU
and CPU, and a training run on two GPUs. Each test needs a CUDA device and is skipped without
one; ``python -m pipeline.bench gpu`` (``make gpu-check``) runs them with ``pytest -m gpu``.

Tolerances come from the arithmetic. fp32 references run with TF32 off (IEEE fp32 convs), so
they round at u32 = 2**-24 like the CPU tier's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cyclegan.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from cyclegan.config import LossConfig, OptimConfig
from cyclegan.networks import build_generator
from cyclegan.schedules import build_scheduler
from cyclegan.train_step import (
    LOSS_NAMES,
    CycleGANNets,
    build_nets,
    build_optimizers,
    build_pools,
    train_step,
)
from tests.cli import explain
from tests.test_train_cli import final_checkpoint, runs_of, train_cli
from tests.test_train_step import GRAD_RTOL, TINY, make_batch, normalised_away, run_step

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

DEVICE = torch.device("cuda")
U32 = 2.0**-24
"""fp32 unit roundoff."""
U_BF16 = 2.0**-8
"""bf16 unit roundoff: 8 significant bits."""


@pytest.fixture
def ieee_fp32():
    """cuDNN convs in IEEE fp32 (no TF32), deterministic algorithms, no timing-based choice."""
    with torch.backends.cudnn.flags(
        enabled=True, benchmark=False, deterministic=True, allow_tf32=False
    ):
        yield


def cuda_state(seed: int, channels_last: bool = False, fused: bool = True):
    """TINY nets on the GPU (as pipeline/worker.py builds them: fused Adam), optimizers, pools."""
    torch.manual_seed(seed)
    nets = build_nets(TINY)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _, net in nets.items():
        net.to(DEVICE, memory_format=fmt)
    return nets, build_optimizers(nets, OptimConfig(), fused=fused), build_pools(50, seed)


def on_gpu(batch, channels_last: bool = False) -> tuple[torch.Tensor, ...]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tuple(x.to(DEVICE).contiguous(memory_format=fmt) for x in batch)


def convs(net: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in net.modules())


def reduction_lengths(net: nn.Module, x: torch.Tensor) -> int:
    """The summed lengths K of the reductions one forward pass of ``net`` makes in series: each
    conv's C_in / groups * kh * kw, each instance norm's H * W."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            total += module.in_channels // module.groups * kh * kw
        elif isinstance(module, nn.InstanceNorm2d):
            total += inputs[0].shape[-2] * inputs[0].shape[-1]

    hooks = [m.register_forward_hook(count) for m in net.modules()]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def flat_grads(net: nn.Module, skip: set[str] = frozenset()) -> torch.Tensor:
    return torch.cat(
        [p.grad.flatten() for name, p in net.named_parameters() if name not in skip]
    ).float()


def test_bf16_autocast_step_is_within_bf16_rounding_of_fp32(ieee_fp32):
    batch = on_gpu(make_batch(3))
    nets, opts, pools = cuda_state(seed=3)
    fp32 = train_step(nets, opts, pools, *batch, LossConfig())
    nets, opts, pools = cuda_state(seed=3)
    bf16 = train_step(nets, opts, pools, *batch, LossConfig(), autocast_dtype=torch.bfloat16)
    # Under autocast each conv rounds its input, its weight and its output to bf16, and the
    # instance norm after it rounds once more: 4 roundings of relative size <= u = 2**-8 per
    # conv. The longest chain from an input to a loss is the cycle (G_A, then G_B, then the L1
    # mean), R = 4 * 20 = 80 roundings for the 10-conv TINY generators; a GAN loss chains a
    # generator and a discriminator, fewer. Round-to-nearest errors are unbiased and
    # independent, so they grow like a random walk, not linearly: within lambda * sqrt(R) * u
    # with high probability (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019). lambda = 3:
    roundings = 4 * (convs(nets.G_A) + convs(nets.G_B))
    assert roundings >= 4 * (convs(nets.G_A) + convs(nets.D_A))
    rtol = 3 * math.sqrt(roundings) * U_BF16
    assert rtol < 0.11  # 3 * sqrt(80) * 2**-8 = 0.105: an O(1) error (a broken path) fails
    for name in LOSS_NAMES:
        assert math.isfinite(bf16[name]), name
        assert bf16[name] == pytest.approx(fp32[name], rel=rtol), name
    params = [p for _, net in nets.items() for p in net.parameters()]
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in params)
    assert all(torch.isfinite(p).all() for p in params)


def test_fused_adam_matches_the_unfused_one():
    nets, fused, _ = cuda_state(seed=1, fused=True)
    twin = copy.deepcopy(nets)
    plain = build_optimizers(twin, OptimConfig(), fused=False)
    assert fused.G.defaults["fused"] and fused.D.defaults["fused"]
    assert not plain.G.defaults["fused"] and not plain.D.defaults["fused"]
    params = [p for _, net in nets.items() for p in net.parameters()]
    twins = [p for _, net in twin.items() for p in net.parameters()]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    steps = 5
    for _ in range(steps):
        for p, q in zip(params, twins, strict=True):
            # Gradients over 6 decades, so the eps region of Adam's denominator is crossed too.
            scale = torch.empty(p.shape, device=DEVICE).uniform_(-14, 0, generator=gen).exp()
            g = torch.randn(p.shape, device=DEVICE, generator=gen) * scale
            p.grad, q.grad = g.clone(), g.clone()
        for opt in (fused.G, fused.D, plain.G, plain.D):
            opt.step()
    # Both compute one Adam update in fp32 from the same numbers, in another order (one kernel
    # per tensor, or one kernel per operation): m (3 roundings), v (4), the bias corrections (6),
    # sqrt, division, eps and lr (5) make 18 roundings; m and v carry each earlier step's
    # rounding on (<= 8 per step). Every term is at most lr * sqrt(t) in size: in the first t
    # steps |m_hat| <= sqrt(t * v_hat) (Cauchy-Schwarz). So the two updates of a step differ by
    # at most 2 * (18 + 8 * steps) * u32 * lr * sqrt(steps), summed over the steps; and the
    # weight each update lands on may round to neighbouring floats: 2 * u32 * |w| a step.
    lr = OptimConfig().lr
    atol = steps * 2 * (18 + 8 * steps) * U32 * lr * math.sqrt(steps)
    for p, q, p0 in zip(params, twins, start, strict=True):
        torch.testing.assert_close(p, q, rtol=2 * steps * U32, atol=atol)
        # The updates themselves are ~lr a step, far above that tolerance: both really moved.
        assert (p - p0).abs().max() > 100 * atol


def assert_steps_close(step, ref, nets: CycleGANNets, loss_rtol: float) -> None:
    """Two fp32 computations of one train step: losses within ``loss_rtol``, each net's
    gradients within GRAD_RTOL of their norm (tests/test_train_step.py derives it: inputs
    within rounding of a ReLU's or an L1's kink switch branch in one path and not the other)."""
    for name in LOSS_NAMES:
        assert step.losses[name] == pytest.approx(ref.losses[name], rel=loss_rtol), name
    for name, net in nets.items():
        skip = {f"{name}.{key}" for key in normalised_away(net)}
        keys = [f"{name}.{k}" for k, _ in net.named_parameters() if f"{name}.{k}" not in skip]
        g = torch.cat([step.grads[k].flatten() for k in keys])
        g_ref = torch.cat([ref.grads[k].flatten() for k in keys])
        error = ((g - g_ref).norm() / g_ref.norm()).item()
        assert error <= GRAD_RTOL, f"{name}: gradients differ by {error:.1e} of their norm"


def test_channels_last_step_matches_contiguous(ieee_fp32):
    batch = make_batch(4)
    nets, opts, pools = cuda_state(seed=4)
    plain = run_step(nets, opts, pools, *on_gpu(batch), LossConfig())
    nets, opts, pools = cuda_state(seed=4, channels_last=True)
    fast = run_step(nets, opts, pools, *on_gpu(batch, channels_last=True), LossConfig())
    assert nets.G_A.model[4].weight.is_contiguous(memory_format=torch.channels_last)
    # The formats run other cuDNN kernels, which sum each reduction of K terms in another
    # order: at worst K * u32 apart each, relative to the sum of the terms' sizes. A loss
    # chains G_A, G_B (or a generator and D) and a mean: the K of all those reductions add up
    # (about 16,500 here), and the worst case is 2 * u32 * sum K = 2e-3.
    x = on_gpu(batch)[0]
    longest = 2 * reduction_lengths(nets.G_A, x) + x.numel()
    assert_steps_close(fast, plain, nets, loss_rtol=2 * U32 * longest)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "cuda-graphs"])
def test_compiled_generator_matches_eager(ieee_fp32, mode):
    torch.manual_seed(0)
    eager = build_generator(TINY).to(DEVICE)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, mode=mode)
    skip = normalised_away(eager)
    # Inductor fuses the norms and activations and reduces in its own order; each of the
    # generator's reductions in series (sum K, from its layers) is at worst K * u32 off in each
    # path, and the tanh output is at most 1 in size: 2 * u32 * sum K absolute (6e-4 here).
    atol = 2 * U32 * reduction_lengths(eager, on_gpu(make_batch(10, n=2))[0])
    # Three rounds: with CUDA graphs the first warms up, the second records, the third replays
    # the recorded graph on new inputs.
    for i in range(3):
        x, target = on_gpu(make_batch(10 + i, n=2))
        y_ref, y = eager(x), compiled(x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=atol, msg=f"round {i}")
        (y_ref - target).abs().mean().backward()
        (y - target).abs().mean().backward()
        g, g_ref = flat_grads(twin, skip), flat_grads(eager, skip)
        error = ((g - g_ref).norm() / g_ref.norm()).item()
        assert error <= GRAD_RTOL, f"round {i}: gradients differ by {error:.1e} of their norm"
        eager.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)


def all_tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in all_tensors(v)]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in all_tensors(v)]
    return []


def state_tensors(nets, opts, pools) -> dict[str, torch.Tensor]:
    """Every tensor of the training state, keyed by where it lives."""
    out = {f"nets.{n}.{k}": v for n, net in nets.items() for k, v in net.state_dict().items()}
    for name, opt in (("G", opts.G), ("D", opts.D)):
        for index, state in opt.state_dict()["state"].items():
            out.update({f"opt.{name}.{index}.{k}": v for k, v in state.items()})
    for name, pool in (("fake_A", pools.fake_A), ("fake_B", pools.fake_B)):
        out.update({f"pool.{name}.{i}": im for i, im in enumerate(pool.images)})
    return out


def schedulers(opts) -> dict:
    return {
        "G": build_scheduler(opts.G, OptimConfig()),
        "D": build_scheduler(opts.D, OptimConfig()),
    }


def test_checkpoint_saved_on_gpu_loads_on_cpu_and_back_on_gpu(tmp_path):
    nets, opts, pools = cuda_state(seed=5)
    train_step(nets, opts, pools, *on_gpu(make_batch(5)), LossConfig(), torch.bfloat16)
    original = {k: v.detach().cpu() for k, v in state_tensors(nets, opts, pools).items()}
    assert {k.split(".")[0] for k in original} == {"nets", "opt", "pool"}
    ckpt = make_checkpoint(
        step=1,
        epoch=0,
        config={"preset": "tiny"},
        nets=nets,
        optimizers=opts,
        schedulers=schedulers(opts),
        pools=pools,
    )
    loaded = load_checkpoint(save_checkpoint(ckpt, tmp_path / "checkpoint.pt"))
    assert all(t.device.type == "cpu" for t in all_tensors(loaded))
    # Nothing is computed on the way, only copied: every tensor must be equal to the bit.
    for device, fused in (("cpu", None), (DEVICE, True)):
        torch.manual_seed(99)  # other weights first, so a restore that does nothing fails
        fresh = build_nets(TINY)
        for _, net in fresh.items():
            net.to(device)
        fresh_opts = build_optimizers(fresh, OptimConfig(), fused=fused)
        fresh_pools = build_pools(50, 0)
        scheds = schedulers(fresh_opts)
        step, _ = restore_checkpoint(loaded, fresh, fresh_opts, scheds, fresh_pools, device)
        assert step == 1
        restored = state_tensors(fresh, fresh_opts, fresh_pools)
        assert restored.keys() == original.keys()
        for key, value in restored.items():
            if not key.endswith(".step"):  # Adam's step counter stays on the CPU unless fused
                assert value.device.type == torch.device(device).type, key
            assert torch.equal(value.cpu(), original[key]), key
    # The state restored on the GPU trains on.
    losses = train_step(fresh, fresh_opts, fresh_pools, *on_gpu(make_batch(6)), LossConfig())
    assert all(math.isfinite(v) for v in losses.values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpu_workers_train_through_ray(ray_head, scenes, tmp_path):
    res = train_cli(
        [
            "--preset", "tiny", "--gpu", "--num-workers", "2", "--data", scenes,
            "--name", "two-gpus", "--max-steps", "6", "--set", "train.precision=bf16",
        ],
        tmp_path,
        ray_head.env,
    )  # fmt: skip
    assert res.returncode == 0, explain(res)
    assert "2 worker(s)" in res.stdout and "device cuda" in res.stdout
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["scaling.num_workers"] == "2" and params["scaling.use_gpu"] == "True"
    history = client.get_metric_history(runs[0].info.run_id, "loss/G_A")
    assert history and all(math.isfinite(m.value) for m in history)
    assert final_checkpoint(tmp_path, "two-gpus")["step"] == 6
