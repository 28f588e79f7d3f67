"""The checkpoint dict: save, safe load, restore, and a resume that is exact to the bit."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch

from cyclegan.checkpoint import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    load_official_generator,
    make_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from cyclegan.config import LossConfig, ModelConfig, OptimConfig
from cyclegan.schedules import build_scheduler
from cyclegan.train_step import build_nets, build_optimizers, build_pools, train_step

MODEL = ModelConfig(ngf=8, ndf=8, n_blocks=2)
OPTIM = OptimConfig(n_epochs=2, n_epochs_decay=3)
LOSS = LossConfig(pool_size=3)
KEYS = {
    "version",
    "step",
    "epoch",
    "config",
    "nets",
    "optimizers",
    "schedulers",
    "pools",
    "rng",
    "mlflow_run_id",
    "metrics",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_state(seed: int):
    torch.manual_seed(seed)
    nets = build_nets(MODEL)
    opts = build_optimizers(nets, OPTIM)
    schedulers = {"G": build_scheduler(opts.G, OPTIM), "D": build_scheduler(opts.D, OPTIM)}
    pools = build_pools(LOSS.pool_size, seed)
    return nets, opts, schedulers, pools


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.rand(2, 3, 32, 32, generator=gen)


def run(state, steps: range) -> list[dict[str, float]]:
    """Train ``steps`` (one epoch per two steps, as a scheduler sees it)."""
    nets, opts, schedulers, pools = state
    losses = []
    for step in steps:
        losses.append(train_step(nets, opts, pools, *batch(step), LOSS))
        if step % 2 == 1:
            for scheduler in schedulers.values():
                scheduler.step()
    return losses


def checkpoint_of(state, step: int, **extra) -> dict:
    nets, opts, schedulers, pools = state
    return make_checkpoint(
        step=step,
        epoch=step // 2,
        config={"model": asdict(MODEL), "loss": asdict(LOSS), "optim": asdict(OPTIM)},
        nets=nets,
        optimizers=opts,
        schedulers=schedulers,
        pools=pools,
        **extra,
    )


def test_resume_is_bit_for_bit(tmp_path):
    state = make_state(seed=0)
    run(state, range(5))  # 5 steps: the pools are full and swapping, the lr has decayed
    ckpt = checkpoint_of(state, step=5, mlflow_run_id="run-123")
    adam_G = copy.deepcopy(state[1].G.state_dict())
    lrs = [s.get_last_lr() for s in state[2].values()]
    assert lrs[0][0] < OPTIM.lr
    # The run without a reload continues first: the checkpoint must not follow it.
    expected_losses = run(state, range(5, 8))
    path = save_checkpoint(ckpt, tmp_path / "ckpt" / "step_5.pt")

    loaded = load_checkpoint(path)
    assert set(loaded) == KEYS
    assert loaded["mlflow_run_id"] == "run-123"
    assert loaded["config"]["model"]["ngf"] == 8
    resumed = make_state(seed=1)  # different init, pools and rng: everything must come from ckpt
    step, epoch = restore_checkpoint(loaded, *resumed)
    assert (step, epoch) == (5, 2)

    # Adam's moments and step counts are restored exactly.
    restored_G = resumed[1].G.state_dict()
    assert restored_G["param_groups"] == adam_G["param_groups"]
    assert restored_G["state"].keys() == adam_G["state"].keys()
    for i, moments in adam_G["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored_G["state"][i][key], moments[key]), (i, key)
    assert [s.get_last_lr() for s in resumed[2].values()] == lrs
    assert [g["lr"] for g in resumed[1].G.param_groups] == lrs[0]

    resumed_losses = run(resumed, range(5, 8))
    assert resumed_losses == expected_losses
    for (name, net), (_, ref) in zip(resumed[0].items(), state[0].items(), strict=True):
        ref_state = ref.state_dict()
        for key, value in net.state_dict().items():
            assert torch.equal(value, ref_state[key]), f"{name}.{key}"
    for pool, ref in ((resumed[3].fake_A, state[3].fake_A), (resumed[3].fake_B, state[3].fake_B)):
        assert torch.equal(torch.stack(pool.images), torch.stack(ref.images))
    for resumed_opt, ref_opt in ((resumed[1].G, state[1].G), (resumed[1].D, state[1].D)):
        for i, moments in ref_opt.state_dict()["state"].items():
            for key, value in moments.items():
                assert torch.equal(resumed_opt.state_dict()["state"][i][key], value)


def test_checkpoint_is_a_snapshot_of_the_moment_it_was_made():
    state = make_state(seed=0)
    run(state, range(2))
    ckpt = checkpoint_of(state, step=2)
    weights = ckpt["nets"]["G_A"]["model.1.weight"].clone()
    exp_avg = ckpt["optimizers"]["D"]["state"][0]["exp_avg"].clone()
    lr_epoch = ckpt["schedulers"]["G"]["last_epoch"]
    run(state, range(2, 4))
    assert ckpt["schedulers"]["G"]["last_epoch"] == lr_epoch
    assert not torch.equal(state[0].G_A.model[1].weight, weights)
    assert torch.equal(ckpt["nets"]["G_A"]["model.1.weight"], weights)
    assert torch.equal(ckpt["optimizers"]["D"]["state"][0]["exp_avg"], exp_avg)


def test_restore_also_restores_the_global_rng():
    state = make_state(seed=0)
    ckpt = checkpoint_of(state, step=0)
    expected = torch.rand(4)
    restore_checkpoint(ckpt, *make_state(seed=7))
    assert torch.equal(torch.rand(4), expected)


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = save_checkpoint(checkpoint_of(make_state(seed=0), step=0), tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == CHECKPOINT_VERSION
    assert set(raw["nets"]) == {"G_A", "G_B", "D_A", "D_B"}
    assert set(raw["optimizers"]) == {"G", "D"}
    assert set(raw["schedulers"]) == {"G", "D"}
    assert set(raw["pools"]) == {"fake_A", "fake_B"}


def test_save_is_atomic_and_overwrites(tmp_path):
    target = tmp_path / "nested" / "dir" / "latest.pt"
    state = make_state(seed=0)
    save_checkpoint(checkpoint_of(state, step=1), target)
    save_checkpoint(checkpoint_of(state, step=2), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest.pt", "latest.pt.sha256"]
    assert load_checkpoint(target)["step"] == 2


def test_truncated_checkpoint_raises_value_error_naming_the_path(tmp_path):
    good = save_checkpoint(checkpoint_of(make_state(seed=0), step=0), tmp_path / "good.pt")
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)


def test_missing_checkpoint_raises_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_official_generator(missing)


def test_restore_rejects_another_version():
    state = make_state(seed=0)
    ckpt = checkpoint_of(state, step=0)
    ckpt["version"] = CHECKPOINT_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        restore_checkpoint(ckpt, *state)


def test_restore_rejects_another_pool_size():
    ckpt = checkpoint_of(make_state(seed=0), step=0)
    nets, opts, schedulers, _ = make_state(seed=0)
    with pytest.raises(ValueError, match="loss.pool_size"):
        restore_checkpoint(ckpt, nets, opts, schedulers, build_pools(LOSS.pool_size + 1, 0))


def test_training_checkpoint_is_not_an_official_generator(tmp_path):
    path = save_checkpoint(checkpoint_of(make_state(seed=0), step=0), tmp_path / "train.pt")
    with pytest.raises(ValueError, match="train.pt"):
        load_official_generator(path, MODEL)


def test_altered_checkpoint_fails_its_checksum(tmp_path):
    target = tmp_path / "ck.pt"
    save_checkpoint(checkpoint_of(make_state(seed=0), step=1), target)
    load_checkpoint(target)  # intact
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same length
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_checkpoint(target)


def test_a_run_restored_at_its_last_step_reports_the_losses_it_ended_with(tmp_path):
    """Population-based training may hand a trial a checkpoint of the last step: the trial
    trains no more, and its one report must still carry the loss the sweep ranks by."""
    from pipeline.config import tiny
    from pipeline.plan import RunPlan
    from pipeline.worker import Evaluator, build_state, report_finished, restore, state_checkpoint

    cfg = tiny()
    plan = RunPlan(config=cfg, counts={"A": 4, "B": 4}, paired=False, threads_per_worker=1,
                   address="")  # fmt: skip
    state = build_state(cfg, 0, torch.device("cpu"))
    state.step = 40
    losses = {"loss/cycle_A": 1.25, "loss/G": 7.5}
    path = save_checkpoint(state_checkpoint(plan, state, losses), tmp_path / "checkpoint.pt")

    class Runtime:
        rank, reports = 0, []

        def report(self, metrics: dict, checkpoint) -> None:
            self.reports.append(metrics)

    resumed = build_state(cfg, 0, torch.device("cpu"))
    restore(resumed, (str(path), load_checkpoint(path)), cfg, torch.device("cpu"))
    runtime = Runtime()
    report_finished(runtime, resumed, Evaluator(plan))
    assert runtime.reports == [{**losses, "step": 40, "epoch": 0}]
