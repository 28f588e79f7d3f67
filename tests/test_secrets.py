"""No credential is written anywhere: a canary password inside the tracking URI and a canary
AWS secret key in the environment go through a training run, a sweep and an evaluation on the
local S3 server and a real MLflow server, then every byte those wrote is searched: the home
folder, the bucket, the MLflow server's store and artifacts, Ray's session folder, and the
commands' output."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_storage_faults import _objects
from tests.test_train_cli import REPO

pytestmark = pytest.mark.integration

AWS_CANARY = "Canary-Aws-Secret-51d7f0"
PASSWORD_CANARY = "Canary-Tracking-Password-9e2c4b"


def _run(module: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _files(root: Path):
    # os.walk, not rglob: a folder removed while it is walked is skipped, not an error.
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _contents(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes; a file that a live process (Ray, the MLflow
    server's database journal) replaces or removes between the listing and the read is left out."""
    found = {}
    for path in _files(root):
        with contextlib.suppress(FileNotFoundError):
            found[str(path)] = path.read_bytes()
    return found


def test_credentials_reach_no_file_param_output_or_ray_session(
    ray_head,
    s3_server,
    s3_env,
    mlflow_server,
    tmp_path,
):
    from pipeline.scenes import write_scenes

    bucket = s3_env
    data, runs = f"{bucket}/scenes", f"{bucket}/runs"
    write_scenes(data, size=48, train_a=24, train_b=16, test=4, seed=0)
    host = mlflow_server.uri.removeprefix("http://")
    env = {
        **os.environ,
        **ray_head.env,
        "CYCLEGAN_HOME": str(tmp_path / "home"),
        "PYTHONUNBUFFERED": "1",
        "AWS_SECRET_ACCESS_KEY": AWS_CANARY,  # the local S3 server takes any key
        "MLFLOW_TRACKING_URI": f"http://cyclegan:{PASSWORD_CANARY}@{host}",
    }
    common = ["--preset", "tiny", "--data", data, "--storage", runs,
              "--set", "train.checkpoint_every=3"]  # fmt: skip
    outputs = []
    train = _run("pipeline.train", [*common, "--name", "secret-run", "--max-steps", "6"], env)
    outputs.append(train.stdout + train.stderr)
    assert train.returncode == 0, outputs[-1][-3000:]
    sweep = _run("pipeline.tune", [*common, "--name", "secret-sweep", "--max-steps", "3",
                                   "--num-samples", "1", "--scheduler", "fifo",
                                   "--space", "loss.lambda_cyc=choice:5",
                                   "--set", "tracking.log_model=false"], env)  # fmt: skip
    outputs.append(sweep.stdout + sweep.stderr)
    assert sweep.returncode == 0, outputs[-1][-3000:]
    evaluation = _run("pipeline.evaluate", ["--model", "secret-run", "--storage", runs,
                                            "--data", data, "--out", str(tmp_path / "eval")],
                      env)  # fmt: skip
    outputs.append(evaluation.stdout + evaluation.stderr)
    assert evaluation.returncode == 0, outputs[-1][-3000:]
    assert "logged eval/* to MLflow run" in outputs[-1]

    # What was written: the home (MLflow is a server here), the evaluation report, the MLflow
    # server's store and artifacts (under tmp_path/server), the bucket, and Ray's temp folder.
    written = _contents(tmp_path)
    written.update({f"{bucket}/{k}": v for k, v in _objects(s3_server, bucket).items()})
    assert any("/server/artifacts/" in k for k in written), "no MLflow artifacts were written"
    assert any(k.startswith(f"{bucket}/runs/secret-run/checkpoint_") for k in written)
    ray_files = _contents(Path(ray_head.temp))
    assert any("runtime_env" in k or "raylet" in k for k in ray_files), "no Ray session found"
    written.update(ray_files)
    for canary in (AWS_CANARY, PASSWORD_CANARY):
        for output in outputs:
            assert canary not in output
        leaks = [name for name, body in written.items() if canary.encode() in body]
        assert not leaks, f"{canary} written to {leaks[:5]}"
