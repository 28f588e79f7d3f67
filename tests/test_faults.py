"""Failures that must not lose work: a killed driver, a corrupt checkpoint, a tracking outage."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from cyclegan.checkpoint import load_checkpoint
from tests.cli import explain, seed_mlflow_store
from tests.test_train_cli import (
    checkpoint_dirs,
    final_checkpoint,
    runs_of,
    settled,
    start_train,
    train_cli,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_killed_driver_resumes_past_a_corrupt_checkpoint_as_if_never_stopped(
    ray_head, scenes, tmp_path
):
    """The driver is killed; the newest checkpoint it left is then truncated (a copy cut
    short): the resume says so, continues from the one before, and ends in the same run, with
    the same weights as a run that went straight to the same step (across an epoch boundary:
    the learning-rate schedule and the data order are restored too)."""
    seed_mlflow_store(tmp_path)
    env = {**os.environ, **ray_head.env, "CYCLEGAN_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    common = ["--preset", "tiny", "--data", scenes, "--set", "train.checkpoint_every=5",
              "--set", "train.num_to_keep=100", "--set", "tracking.log_model=false"]  # fmt: skip
    proc = start_train([*common, "--name", "victim", "--max-steps", "400"], env, subprocess.DEVNULL)
    run_dir = tmp_path / "checkpoints" / "victim"
    try:
        wait_for(lambda: len(checkpoint_dirs(run_dir)) >= 3, 300, "three checkpoints")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    settled(run_dir)  # a checkpoint copy under way when the driver died ends (or stops)
    # The newest whole checkpoint is cut short: the resume must pass over it, say so, and use
    # the one before (Ray's own record of the newest may lag the folders on disk).
    steps = {}
    for folder in checkpoint_dirs(run_dir):
        try:
            steps[folder / "checkpoint.pt"] = load_checkpoint(folder / "checkpoint.pt")["step"]
        except (ValueError, FileNotFoundError):
            continue
    assert len(steps) >= 2
    cut = max(steps, key=lambda path: (steps[path], str(path)))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    del steps[cut]
    fallback = max(steps, key=lambda path: (steps[path], str(path)))
    target = steps[fallback] + 20  # >= 30: past the first epoch's end (tiny: 24 steps)

    args = ["--resume", "victim", "--set", f"train.max_steps={target}"]
    res = train_cli(args, tmp_path, ray_head.env)
    assert res.returncode == 0, explain(res)
    out = res.stdout + res.stderr
    shown = "\n".join(line for line in out.splitlines() if "[train]" in line)
    assert f"{cut} is unusable" in out, shown
    assert f"resuming from {fallback} (step {steps[fallback]})" in out, shown
    resumed = final_checkpoint(tmp_path, "victim")
    assert resumed["step"] == target
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/G_A")}
    assert set(range(2, target + 1, 2)) <= logged  # one run's curves, no gap (log_every 2)

    res = train_cli([*common, "--name", "straight", "--max-steps", str(target)], tmp_path,
                    ray_head.env)  # fmt: skip
    assert res.returncode == 0, explain(res)
    straight = final_checkpoint(tmp_path, "straight")
    for net in ("G_A", "G_B", "D_A", "D_B"):
        for key, value in straight["nets"][net].items():
            assert torch.equal(value, resumed["nets"][net][key]), f"{net}.{key} differs"


def test_tracking_outage_does_not_stop_training(ray_head, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from pipeline.scenes import write_scenes
    from tests.flaky_proxy import FlakyProxy

    # The run reaches the server through a proxy that goes away for a few seconds: an outage
    # of a fixed length (restarting the server itself took anywhere from 3 s to longer than
    # the rest of the run).
    proxy = FlakyProxy(int(mlflow_server.uri.rsplit(":", 1)[1]))
    env = {
        **os.environ,
        **ray_head.env,
        "CYCLEGAN_HOME": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": proxy.endpoint,
    }
    # 400-image epochs: 600 tiny steps, long enough to outlast the outage.
    data = str(tmp_path / "data")
    write_scenes(data, size=32, train_a=400, train_b=50, test=2, seed=1)
    args = ["--preset", "tiny", "--data", data, "--name", "offline", "--max-steps", "600",
            "--set", "train.log_every=10", "--set", "train.sample_every=1000",
            "--set", "train.checkpoint_every=1000", "--set", "tracking.log_model=false"]  # fmt: skip
    proc = start_train(args, env)
    client = MlflowClient(mlflow_server.uri)

    def runs():
        exp = client.get_experiment_by_name("cyclegan")
        return client.search_runs([exp.experiment_id]) if exp else []

    def logged_steps():
        found = runs() if proc.poll() is None else []
        return found and client.get_metric_history(found[0].info.run_id, "loss/G_A")

    try:
        wait_for(logged_steps, 300, "metrics on the tracking server")
        proxy.outage(3.0)
        output, _ = proc.communicate(timeout=600)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    lines = [line for line in output.splitlines() if "goes on" in line]
    assert len(lines) == 1, lines  # reported once, not per step
    run = runs()[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/G_A")]
    assert max(steps) == 600  # logging resumed after the outage
    assert "MLflow reachable again" in output
    assert len(proxy.outages) == 2 and proxy.outages[0][1] - proxy.outages[0][0] >= 2.9
    assert final_checkpoint(tmp_path, "offline")["step"] == 600
