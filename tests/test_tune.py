"""`python -m pipeline.tune` end to end on the shared Ray head: real trials, ASHA, MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def tune_cli(args, home, env):
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


def test_sweep_runs_trials_and_writes_the_best_config(ray_head, scenes, tmp_path):
    args = [
        "--preset",
        "tiny",
        "--data",
        scenes,
        "--num-samples",
        "2",
        "--max-steps",
        "6",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "tracking.log_model=false",
        "--space",
        "loss.lambda_cyc=loguniform:1:30",
        "--space",
        "loss.pool_size=choice:0,50",
        "--grace-period",
        "1",
        "--name",
        "sweep",
    ]
    res = tune_cli(args, tmp_path, ray_head.env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "best eval/class_iou" in res.stdout

    sweep_dir = tmp_path / "checkpoints" / "tune" / "sweep"
    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert best["loss"]["lambda_A"] == best["loss"]["lambda_B"]
    assert 1 <= best["loss"]["lambda_A"] <= 30 and best["loss"]["pool_size"] in (0, 50)
    assert best["storage"]["name"] == ""
    # The best config is a valid --config for pipeline.train.
    from pipeline.train import build_config, build_parser

    cfg = build_config(build_parser().parse_args(["--config", str(sweep_dir / "best_config.yaml")]))
    assert cfg.loss.lambda_A == best["loss"]["lambda_A"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("cyclegan")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for child in children:
        assert client.get_metric_history(child.info.run_id, "eval/class_iou")
        assert client.get_metric_history(child.info.run_id, "loss/G_A")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "best_config.yaml"} <= artifacts
    assert "best/eval/class_iou" in parent.data.metrics
    checkpoints_before = sorted(
        str(p) for p in (tmp_path / "checkpoints").glob("sweep-*/checkpoint_*")
    )

    # Resuming a finished sweep reruns nothing.
    again = tune_cli(["--resume", "sweep"], tmp_path, ray_head.env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = sorted(str(p) for p in (tmp_path / "checkpoints").glob("sweep-*/checkpoint_*"))
    assert after == checkpoints_before
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId")]) == 2


def test_bad_space_is_a_clear_error(tmp_path):
    res = tune_cli(["--space", "loss.lambda_X=uniform:1:2"], tmp_path, {})
    assert res.returncode == 2
    assert "valid keys of loss" in res.stderr
    res = tune_cli(["--space", "loss.lambda_A=normal:1:2"], tmp_path, {})
    assert res.returncode == 2 and "unknown kind" in res.stderr
