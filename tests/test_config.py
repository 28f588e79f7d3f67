"""Config validation (every bad value names its field) and the learning-rate schedule."""

from __future__ import annotations

import io

import pytest
import torch

from cyclegan.config import AugmentConfig, LossConfig, ModelConfig, OptimConfig
from cyclegan.schedules import build_scheduler, lr_factor


def test_defaults_are_the_paper_settings():
    model, loss, optim, data = ModelConfig(), LossConfig(), OptimConfig(), AugmentConfig()
    assert (model.ngf, model.ndf, model.n_blocks, model.n_layers_D) == (64, 64, 9, 3)
    assert (model.norm, model.init_type, model.init_gain) == ("instance", "normal", 0.02)
    assert (loss.gan_mode, loss.lambda_A, loss.lambda_B) == ("lsgan", 10.0, 10.0)
    assert (loss.lambda_identity, loss.pool_size) == (0.5, 50)
    assert (optim.lr, optim.beta1, optim.beta2) == (2e-4, 0.5, 0.999)
    assert (optim.n_epochs, optim.n_epochs_decay, optim.total_epochs) == (100, 100, 200)
    assert (data.load_size, data.crop_size, data.flip) == (286, 256, True)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: LossConfig(lambda_A=-1.0), "loss.lambda_A"),
        (lambda: LossConfig(lambda_B=-0.1), "loss.lambda_B"),
        (lambda: LossConfig(lambda_identity=-0.5), "loss.lambda_identity"),
        (lambda: LossConfig(lambda_gan=-1.0), "loss.lambda_gan"),
        (lambda: LossConfig(gan_mode="wgan"), "loss.gan_mode"),
        (lambda: LossConfig(pool_size=-1), "loss.pool_size"),
        (lambda: ModelConfig(norm="group"), "model.norm"),
        (lambda: ModelConfig(init_type="uniform"), "model.init_type"),
        (lambda: ModelConfig(init_gain=0.0), "model.init_gain"),
        (lambda: ModelConfig(ngf=0), "model.ngf"),
        (lambda: ModelConfig(ndf=0), "model.ndf"),
        (lambda: ModelConfig(input_nc=0), "model.input_nc"),
        (lambda: ModelConfig(n_layers_D=0), "model.n_layers_D"),
        (lambda: ModelConfig(n_blocks=-1), "model.n_blocks"),
        (lambda: OptimConfig(lr=0.0), "optim.lr"),
        (lambda: OptimConfig(lr=-2e-4), "optim.lr"),
        (lambda: OptimConfig(beta1=1.0), "optim.beta1"),
        (lambda: OptimConfig(beta2=-0.1), "optim.beta2"),
        (lambda: OptimConfig(n_epochs=-1), "optim.n_epochs"),
        (lambda: OptimConfig(n_epochs_decay=-1), "optim.n_epochs_decay"),
        (lambda: OptimConfig(n_epochs=0, n_epochs_decay=0), "optim.n_epochs"),
        (lambda: AugmentConfig(load_size=256, crop_size=286), "data.crop_size"),
        (
            lambda: AugmentConfig(preprocess="scale_width_and_crop", load_size=100, crop_size=128),
            "data.crop_size",
        ),
        (lambda: AugmentConfig(crop_size=2), "data.crop_size"),
        (lambda: AugmentConfig(load_size=3, crop_size=4, preprocess="crop"), "data.load_size"),
        (lambda: AugmentConfig(preprocess="rotate"), "data.preprocess"),
    ],
)
def test_invalid_values_raise_naming_the_field(build, field):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(f"{field}:")


def test_unknown_choice_lists_the_valid_ones():
    with pytest.raises(ValueError, match="instance, batch, none"):
        ModelConfig(norm="group")


def test_valid_edge_values_are_accepted():
    LossConfig(lambda_identity=0.0, lambda_gan=0.0, pool_size=0)
    ModelConfig(n_blocks=0, norm="none")
    OptimConfig(n_epochs=0, n_epochs_decay=1)
    AugmentConfig(load_size=256, crop_size=256)
    # Without a resize, load_size plays no part and may be smaller than the crop.
    AugmentConfig(preprocess="crop", load_size=128, crop_size=256)


# learning-rate schedule


def official_factor(epoch: int, n_epochs: int, n_epochs_decay: int) -> float:
    return 1.0 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)


def lrs_per_epoch(cfg: OptimConfig) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=cfg.lr)
    scheduler = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.total_epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_lr_is_constant_then_decays_linearly():
    cfg = OptimConfig(lr=1.0, n_epochs=3, n_epochs_decay=3)
    assert lrs_per_epoch(cfg) == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(("n_epochs", "n_epochs_decay"), [(100, 100), (5, 0), (0, 4), (7, 2)])
def test_lr_follows_the_official_formula(n_epochs, n_epochs_decay):
    cfg = OptimConfig(lr=2e-4, n_epochs=n_epochs, n_epochs_decay=n_epochs_decay)
    lrs = lrs_per_epoch(cfg)
    expected = [official_factor(e, n_epochs, n_epochs_decay) for e in range(cfg.total_epochs)]
    assert [lr_factor(e, cfg) for e in range(cfg.total_epochs)] == pytest.approx(expected)
    assert lrs == pytest.approx([2e-4 * f for f in expected])
    assert all(lr == 2e-4 for lr in lrs[:n_epochs])
    decay = lrs[max(n_epochs - 1, 0) :]
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert steps == pytest.approx([2e-4 / (n_epochs_decay + 1)] * len(steps))
    assert min(lrs) > 0


def test_scheduler_state_round_trip_resumes_at_the_same_lr():
    cfg = OptimConfig(lr=1e-3, n_epochs=2, n_epochs_decay=6)

    def make():
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([param], lr=cfg.lr)
        return opt, build_scheduler(opt, cfg)

    opt, scheduler = make()
    for _ in range(4):
        opt.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    opt2, scheduler2 = make()
    opt2.load_state_dict(state["opt"])
    scheduler2.load_state_dict(state["sched"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < cfg.lr
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for _ in range(4):
        for o, s in ((opt, scheduler), (opt2, scheduler2)):
            o.step()
            s.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_set_base_lr_keeps_the_schedule_position():
    from cyclegan.schedules import set_base_lr

    cfg = OptimConfig(lr=2e-4, n_epochs=1, n_epochs_decay=4)
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    for _ in range(3):
        opt.step()
        sched.step()
    factor = lr_factor(3, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * factor)
    set_base_lr(sched, 1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(4, cfg))
    # It survives a state round trip, as a checkpoint would make.
    again = build_scheduler(torch.optim.Adam(net.parameters(), lr=1e-3), cfg)
    again.load_state_dict(sched.state_dict())
    assert again.base_lrs == [1e-3]
