"""Failures that must not lose work: a killed driver, a corrupt checkpoint, a tracking outage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_fixtures import free_port
from tests.test_train_cli import REPO, checkpoint_dirs, final_checkpoint, runs_of, train_cli

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_driver_resumes_in_the_same_run(ray_head, scenes, tmp_path):
    env = {**os.environ, **ray_head.env, "CYCLEGAN_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        "--preset",
        "tiny",
        "--data",
        scenes,
        "--name",
        "victim",
        "--max-steps",
        "400",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "tracking.log_model=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "checkpoints" / "victim"
    try:
        wait_for(lambda: len(checkpoint_dirs(run_dir)) >= 2, 300, "two checkpoints")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = final_checkpoint(tmp_path, "victim")["step"]
    assert killed_at < 400

    res = train_cli(["--resume", "victim", "--set", "train.max_steps=40"], tmp_path, ray_head.env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert killed_at < 40
    assert final_checkpoint(tmp_path, "victim")["step"] == 40
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(ray_head, scenes, tmp_path):
    common = ["--set", "train.checkpoint_every=5", "--set", "tracking.log_model=false"]
    res = train_cli(
        ["--preset", "tiny", "--data", scenes, "--name", "bitrot", "--max-steps", "10", *common],
        tmp_path,
        ray_head.env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    newest = checkpoint_dirs(tmp_path / "checkpoints" / "bitrot")[-1] / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated

    res = train_cli(["--resume", "bitrot", "--max-steps", "15"], tmp_path, ray_head.env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"{newest} is unusable" in out
    assert "resuming from" in out and "(step 5)" in out
    assert final_checkpoint(tmp_path, "bitrot")["step"] == 15


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    class Server:
        uri = f"http://127.0.0.1:{port}"
        proc = None

        def start(self):
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            import urllib.request

            def up():
                try:
                    return urllib.request.urlopen(self.uri + "/health", timeout=2).status == 200
                except OSError:
                    return False

            wait_for(up, 90, "the MLflow server")

        def stop(self):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    server = Server()
    server.start()
    yield server
    server.stop()


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
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
