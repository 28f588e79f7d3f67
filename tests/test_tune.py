"""`python -m pipeline.tune` end to end on the shared Ray head: real trials, ASHA, MLflow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli import explain, seed_mlflow_store
from tests.conftest import running_mlflow_server
from tests.flaky_proxy import FlakyProxy

REPO = Path(__file__).resolve().parents[1]


def tune_cli(args, home, env):
    seed_mlflow_store(home)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tune", *args],
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            **env,
            "CYCLEGAN_HOME": str(home),
            "PYTHONUNBUFFERED": "1",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def tune_main(tmp_path, monkeypatch, capsys):
    """``python -m pipeline.tune ARGS`` refused for its flags, run in this process (no
    interpreter start, no imports to pay): returns (exit code, stderr). The command's changes
    to the environment and to SIGTERM are undone afterwards; ``--address`` points nowhere, so a
    check that let the sweep through fails at once instead of starting a Ray."""
    import signal

    from pipeline.tune import main

    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CYCLEGAN_HOME", str(tmp_path))
    sigterm = signal.getsignal(signal.SIGTERM)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = main([*args, "--address", "127.0.0.1:9"])
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        return code, capsys.readouterr().err

    return run


def test_unreported_metric_is_a_clear_error(scenes, unpaired_scenes, tune_main, tmp_path):
    code, err = tune_main("--data", scenes, "--metric", "eval/fid_AtoB")
    assert code == 2
    assert "--metric eval/fid_AtoB: trials do not report it" in err
    assert "eval/class_iou" in err  # the valid names are listed
    code, err = tune_main("--data", unpaired_scenes, "--metric", "eval/kid_AtoB")
    assert code == 2 and "set train.fid_weights" in err
    code, err = tune_main("--data", unpaired_scenes, "--metric", "eval/kid_AtoB",
                          "--set", f"train.fid_weights={tmp_path}/none.pth")  # fmt: skip
    assert code == 2 and "train.fid_weights:" in err and "is not a file" in err


def test_bad_space_is_a_clear_error(tune_main):
    code, err = tune_main("--space", "loss.lambda_X=uniform:1:2")
    assert code == 2 and "valid keys of loss" in err
    code, err = tune_main("--space", "loss.lambda_A=normal:1:2")
    assert code == 2 and "unknown kind" in err


def _children(home, tracking_uri: str | None = None):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or f"sqlite:///{home}/mlflow.db")
    exp = client.get_experiment_by_name("cyclegan")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parent = next((r for r in runs if r.data.tags.get("kind") == "tune"), None)
    kids = [
        r for r in runs if parent and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    return client, kids


TINY = ["--preset", "tiny", "--set", "tracking.log_model=false"]


@pytest.mark.integration
def test_asha_sweep_stops_a_bad_trial_and_writes_the_best_config(ray_head, scenes, tmp_path):
    # lr 1e-12 leaves the cycle loss where it starts; lr 2e-3 brings it down within steps.
    # One trial at a time, the good one first: it sets every rung the bad one is held to.
    args = [*TINY, "--data", scenes, "--max-steps", "20", "--set", "train.checkpoint_every=2",
            "--space", "optim.lr=grid:2e-3,1e-12", "--space", "loss.lambda_cyc=choice:7",
            "--num-samples", "1", "--grace-period", "1", "--max-concurrent", "1",
            "--metric", "loss/cycle_A", "--mode", "min", "--name", "asha"]  # fmt: skip
    # A tracking server slow to take metrics: from the bad trial on (the third run created:
    # sweep, good trial, bad trial) each metrics request is held 3 s. ASHA stops the bad trial
    # at its first report and Tune then ends its processes at once, so what the trial logged
    # before that report is in its run only if it was sent before the report.
    with running_mlflow_server(tmp_path / "server") as server:
        proxy = FlakyProxy(int(server.rsplit(":", 1)[1]))
        runs_created = []

        def bad_trial_metrics(request: bytes) -> bool:
            runs_created.extend(re.findall(rb"POST /api/2.0/mlflow/runs/create ", request))
            return len(runs_created) >= 3 and b"/runs/log-batch " in request

        proxy.delay(3.0, bad_trial_metrics)
        try:
            res = tune_cli(args, tmp_path, {**ray_head.env, "MLFLOW_TRACKING_URI": proxy.endpoint})
        finally:
            proxy.close()
        assert res.returncode == 0, explain(res)
        assert "best loss/cycle_A" in res.stdout
        assert "Progress bars disabled" not in res.stdout + res.stderr  # Ray Data in the trials
        assert len(runs_created) == 3
        _check_asha_sweep(*_children(tmp_path, server), tmp_path, res)


def _check_asha_sweep(client, kids, tmp_path, res):
    assert len(kids) == 2
    last = {}
    for kid in kids:
        history = client.get_metric_history(kid.info.run_id, "loss/cycle_A")
        assert history, f"{kid.info.run_name}: no loss/cycle_A in its run\n{explain(res)}"
        last[float(kid.data.params["optim.lr"])] = max(m.step for m in history)
        assert client.get_metric_history(kid.info.run_id, "eval/class_iou")  # trials evaluate
        assert (
            float(kid.data.params["loss.lambda_A"]) == float(kid.data.params["loss.lambda_B"]) == 7
        )
    assert last[2e-3] == 20  # the good trial ran to the end
    assert last[1e-12] < 20  # the bad one was stopped early

    sweep_dir = tmp_path / "checkpoints" / "tune" / "asha"
    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert best["optim"]["lr"] == 2e-3 and best["loss"]["lambda_A"] == best["loss"]["lambda_B"] == 7
    assert best["storage"]["name"] == ""
    # The best config is a valid --config for pipeline.train.
    from pipeline.flags import build_config
    from pipeline.train import build_parser

    cfg = build_config(build_parser().parse_args(["--config", str(sweep_dir / "best_config.yaml")]))
    assert cfg.optim.lr == 2e-3 and cfg.loss.lambda_B == 7
    parent_id = kids[0].data.tags["mlflow.parentRunId"]
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"results.md", "best_config.yaml"} <= artifacts
    assert "best/loss/cycle_A" in client.get_run(parent_id).data.metrics


@pytest.mark.integration
def test_pbt_copies_the_better_trial_into_the_worse(ray_head, scenes, tmp_path):
    # lr 1e-12 freezes a trial where it starts; PBT must copy the learning one into it. With
    # --synch the copy happens at step 16 (the fourth report) whichever trial started first.
    args = [*TINY, "--data", scenes, "--max-steps", "32", "--set", "train.checkpoint_every=4",
            "--scheduler", "pbt", "--perturbation-interval", "4", "--synch", "--num-samples", "1",
            "--space", "optim.lr=grid:1e-12,2e-3", "--metric", "loss/cycle_A", "--mode", "min",
            "--name", "pbt"]  # fmt: skip
    res = tune_cli(args, tmp_path, ray_head.env)
    assert res.returncode == 0, explain(res)
    assert "Cloning trial" in res.stdout + res.stderr  # PBT's exploit step ran
    client, kids = _children(tmp_path)
    assert len(kids) == 2  # a restarted trial continues in its own child run
    for kid in kids:
        history = client.get_metric_history(kid.info.run_id, "loss/cycle_A")
        assert max(m.step for m in history) == 32
    frozen = next(k for k in kids if float(k.data.params["optim.lr"]) < 1e-9)
    history = client.get_metric_history(frozen.info.run_id, "loss/cycle_A")
    early = [m.value for m in history if m.step <= 8]
    late = [m.value for m in history if m.step >= 24]
    assert sum(late) / len(late) < sum(early) / len(early)  # it learned after the copy
    sweep_dir = tmp_path / "checkpoints" / "tune" / "pbt"
    assert (sweep_dir / "best_config.yaml").exists()


def test_pbt_refuses_values_that_cannot_change_mid_run(scenes, tune_main):
    code, err = tune_main("--data", scenes, "--scheduler", "pbt", "--space",
                          "loss.pool_size=choice:0,50")  # fmt: skip
    assert code == 2 and "loss.pool_size cannot do" in err
    code, err = tune_main("--data", scenes, "--scheduler", "pbt", "--num-workers", "2")
    assert code == 2 and "use --num-workers 1" in err
    code, err = tune_main("--data", scenes, "--synch")
    assert code == 2 and "--synch is a setting of --scheduler pbt" in err


@pytest.mark.integration
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(ray_head, scenes, tmp_path):
    import signal
    import time

    # tiny: 24 steps per epoch, 2 epochs; stop at 30.
    args = [*TINY, "--data", scenes, "--max-steps", "30", "--set", "train.checkpoint_every=5",
            "--space", "loss.lambda_cyc=grid:5,10", "--num-samples", "1", "--scheduler", "fifo",
            "--max-concurrent", "1", "--name", "killed"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(ray_head.env, CYCLEGAN_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    seed_mlflow_store(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.tune", *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:  # one trial done, the second one under way
            time.sleep(1)
            try:  # the sweep may still be creating the store
                _, kids = _children(tmp_path)
            except Exception:
                continue
            done = [k for k in kids if k.info.status == "FINISHED"]
            if done and len(kids) == 2:
                break
        else:
            raise AssertionError("the sweep did not reach its second trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = done[0].data.tags["ray.run_name"]
    before = sorted((tmp_path / "checkpoints" / finished).glob("checkpoint_*"))

    res = tune_cli(["--resume", "killed"], tmp_path, ray_head.env)
    assert res.returncode == 0, _failure(res)
    assert sorted((tmp_path / "checkpoints" / finished).glob("checkpoint_*")) == before
    client, kids = _children(tmp_path)
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    for kid in kids:
        history = client.get_metric_history(kid.info.run_id, "loss/G_A")
        assert max(m.step for m in history) == 30


def _failure(res) -> str:
    """The lines of a failed command that name an error, then the ends of its output (Tune's
    tables and Ray's worker logs can push a traceback out of a plain tail)."""
    output = res.stdout + res.stderr
    errors = [line for line in output.splitlines() if "rror" in line or "Traceback" in line]
    return "\n".join(errors[-40:]) + "\n--- stderr:\n" + res.stderr[-3000:]


def test_space_values_are_numbers_where_they_read_as_numbers():
    from pipeline.search import parse_space

    space = parse_space(["optim.lr=choice:2e-3,1e-4", "loss.pool_size=grid:0,50"])
    assert space["optim.lr"].categories == [2e-3, 1e-4]
    assert space["loss.pool_size"] == {"grid_search": [0, 50]}
    assert parse_space(["optim.lr=grid:1e-12,2e-3"], pbt=True)["optim.lr"] == [1e-12, 2e-3]
