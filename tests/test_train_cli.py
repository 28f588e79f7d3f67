"""End-to-end tests of `python -m pipeline.train` through the real CLI, a real Ray head and a
real MLflow store, on tiny settings."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli import explain, seed_mlflow_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
FAULT_HOOKS = {"CYCLEGAN_FAULT_HOOKS": str(Path(__file__).resolve().parent / "fault_hooks.py")}


def train_cli(args, home, env_extra=None, timeout=420):
    import os

    seed_mlflow_store(home)
    env = {**os.environ, "CYCLEGAN_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def mlflow_client(home):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home}/mlflow.db")


def runs_of(home):
    client = mlflow_client(home)
    exp = client.get_experiment_by_name("cyclegan")
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def final_checkpoint(home, name):
    from cyclegan.checkpoint import load_checkpoint

    folders = checkpoint_dirs(Path(home) / "checkpoints" / name)
    assert folders, f"no checkpoints for {name}"
    states = []
    for folder in folders:
        try:
            states.append(load_checkpoint(folder / "checkpoint.pt"))
        except (ValueError, FileNotFoundError):  # corrupted on purpose, or cut short by a kill
            continue
    assert states, f"no loadable checkpoint for {name} in {folders}"
    return max(states, key=lambda s: s["step"])


def settled(folder: Path, quiet_s: float = 2.0, seconds: float = 120) -> None:
    """Wait until nothing under ``folder`` has changed (names, sizes) for ``quiet_s``: the
    processes of a killed run may still be writing a checkpoint for a while."""

    def snapshot():
        return {(str(p), p.stat().st_size) for p in folder.rglob("*") if p.is_file()}

    deadline, last, since = time.monotonic() + seconds, None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            now = snapshot()
        except FileNotFoundError:  # a file went away between the listing and the look
            now = None
        if now is None or now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)
    raise AssertionError(f"{folder} was still changing after {seconds} s")


@pytest.fixture(scope="module")
def e2e_run(ray_head, scenes, tmp_path_factory):
    """One finished 2-worker run with system metrics and registered models, shared by the
    checks of what it wrote and of how MLflow's UI shows it; yields (home, CLI result)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    res = train_cli(
        [
            "--preset",
            "tiny",
            "--data",
            scenes,
            "--num-workers",
            "2",
            "--name",
            "e2e",
            "--max-steps",
            "12",
            "--set",
            "train.checkpoint_every=4",
            "--set",
            "tracking.system_metrics=true",
            "--register",
            "e2e",
        ],
        tmp_path,
        # A sample a second (MLflow's default is 10 s; this run may be shorter than that).
        {**ray_head.env, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    assert res.returncode == 0, explain(res)
    return tmp_path, res


def test_two_workers_end_to_end(e2e_run):
    """2 CPU workers, 32 px: metrics at several steps, sample grids, checkpoints, a model."""
    tmp_path, res = e2e_run
    assert "scaling.num_workers=2" in res.stdout  # the config's changes from its preset
    # Ray's and MLflow's own chatter stays off the console (--verbose brings it back).
    for noise in ("Progress bars disabled", "execution finished in", "Downloading artifacts",
                  "monitoring system metrics"):  # fmt: skip
        assert noise not in res.stdout + res.stderr, noise
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.lambda_A"] == "10.0"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["checkpoint.storage"].endswith("/e2e")
    assert run.data.tags["data.count_A"] == "24"
    # MLflow's own tags, which its UI shows; the experiment opens in the training layout.
    assert run.data.tags["mlflow.source.name"] == "pipeline.train"
    assert run.data.tags["mlflow.runName"] == "e2e"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for key in (
        "loss/G_A",
        "loss/G_B",
        "loss/D_A",
        "loss/D_B",
        "loss/cycle_A",
        "loss/idt_B",
        "lr",
        "throughput/images_per_s",
        "data/wait_fraction",
    ):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) >= 3 and steps == sorted(steps), key
    # The paired test split is scored during training (photo->labels, labels->photo).
    evals = client.get_metric_history(run.info.run_id, "eval/per_pixel_acc")
    assert evals and all(0 <= m.value <= 1 for m in evals)
    assert client.get_metric_history(run.info.run_id, "eval/l1_AtoB")
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    sample_steps = {p.split("+step+")[1].split("+")[0] for p in images if p.endswith(".png")}
    assert len(sample_steps) >= 2
    assert "config.json" in [a.path for a in client.list_artifacts(run.info.run_id)]

    ckpt_dirs = checkpoint_dirs(tmp_path / "checkpoints" / "e2e")
    assert 1 <= len(ckpt_dirs) <= 3  # num_to_keep
    state = final_checkpoint(tmp_path, "e2e")
    assert state["step"] == 12 and state["mlflow_run_id"] == run.info.run_id
    assert set(state["nets"]) == {"G_A", "G_B", "D_A", "D_B"}

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    models = {
        m.name: m
        for m in mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], output_format="list"
        )
    }
    assert set(models) == {"generator_AtoB", "generator_BtoA"}
    registered = {m.name for m in client.search_registered_models()}
    assert {"e2e-AtoB", "e2e-BtoA"} <= registered
    metrics = client.get_run(run.info.run_id).data.metrics
    assert any(k.startswith("system/") for k in metrics)
    # The start-up timeline, from the command's start to the first step, in the order reached.
    milestones = ("resolved", "ray", "mlflow", "fit", "worker", "ready", "first_batch")
    times = [metrics[f"startup/{m}_s"] for m in (*milestones, "first_step")]
    assert times[0] > 0 and times == sorted(times), times
    assert client.get_metric_history(run.info.run_id, "startup/first_step_s")[0].step == 1
    (tmp_path / "loaded").mkdir()
    net = mlflow.pytorch.load_model(
        models["generator_AtoB"].model_uri, dst_path=str(tmp_path / "loaded")
    )
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # The logged model holds the final weights.
    assert torch.equal(net.state_dict()["model.1.weight"], state["nets"]["G_A"]["model.1.weight"])


@pytest.mark.browser
def test_the_run_in_mlflows_ui(e2e_run):
    """The MLflow UI in headless Chromium, opened at the link the run printed: the training
    layout (not the GenAI one), the loss charts, the sample grid at two steps, the
    registered models. A failure leaves failure.png and failure.html in the test's folder."""
    from PIL import Image

    from tests.browser import act_when, body_text, chromium, wait_until
    from tests.conftest import running_mlflow_server

    home, res = e2e_run
    link = re.search(r"MLflow\s.*?(/#/experiments/\S+)", res.stdout)
    assert link, res.stdout[-3000:]
    page = link.group(1)
    assert "workflowType=machine_learning" in page
    client, (run,) = runs_of(home)
    out = home / "browser"
    out.mkdir()
    with running_mlflow_server(home) as uri, chromium(out) as driver:
        driver.get(uri + page)
        # The run's overview in the training layout, with the registered models.
        text = wait_until(driver, lambda d: "e2e-AtoB" in body_text(d) and body_text(d), 60,
                          "the run page listing the registered model")  # fmt: skip
        assert "Model metrics" in text and "Evaluation runs" not in text, text[:2000]
        assert "e2e-BtoA" in text and "pipeline.train" in text
        # The loss curves.
        base, _, query = page.partition("?")
        driver.get(f"{uri}{base}/model-metrics?{query}")
        # The loss section alone (sections render when in view).
        act_when(driver, lambda d: d.find_elements(
            "css selector", "input[placeholder*='Search metric charts']"),
            lambda search: search.send_keys("loss/"), 60, "the charts")  # fmt: skip
        wait_until(driver, lambda d: all(k in body_text(d) for k in ("G_A", "D_B", "cycle_A")),
                   60, "the loss charts")  # fmt: skip
        charts = driver.find_elements("css selector", ".js-plotly-plot, svg.main-svg")
        assert charts, "no chart drawn"
        # The sample grid, at two different steps, shown as images.
        driver.get(f"{uri}{base}/artifacts?{query}")
        act_when(driver, lambda d: d.find_elements("xpath", "//*[text()='images']"),
                 lambda tree: tree.click(), 60, "the artifact tree")  # fmt: skip

        def sample_steps(d) -> list[int]:
            found = sorted({int(m) for m in re.findall(r"samples\+step\+(\d+)\+", body_text(d))})
            return found if len(found) >= 2 else []

        steps = wait_until(driver, sample_steps, 30, "samples at two steps in the artifact tree")
        for step in steps[:2]:
            act_when(driver, lambda d, s=step: [
                e for e in d.find_elements("xpath", f"//*[contains(text(), 'samples+step+{s}+')]")
                if e.text.endswith(".png")], lambda name: name.click(), 30,
                f"the step {step} sample")  # fmt: skip
            width = wait_until(driver, lambda d: max([d.execute_script(
                "return arguments[0].naturalWidth", i) for i in d.find_elements(
                "css selector", "img[src^='blob:']")] or [0]), 30, f"the step {step} image")  # fmt: skip
            (png,) = home.glob(f"mlartifacts/**/images/samples+step+{step}+*.png")
            assert width == Image.open(png).width  # the logged grid itself, row labels too


def wait_for(predicate, seconds: float, what: str):
    """The first true value of ``predicate()``, polled for up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def start_train(args: list[str], env: dict, stdout=subprocess.PIPE) -> subprocess.Popen:
    """``python -m pipeline.train ARGS`` in the background (output merged into ``stdout``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", *args],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _train_workers() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


def test_worker_killed_from_outside_then_ctrl_c_then_resume(ray_head, scenes, tmp_path):
    """A training worker gets SIGKILL from outside: Ray restarts the group from the latest
    checkpoint. Then Ctrl-C stops the driver: the MLflow run is marked KILLED, never left
    RUNNING. A resume ends at the planned step, in the one MLflow run, with no gap in its
    curves. A staging folder an earlier killed worker left behind is removed."""
    import os
    import shutil
    import signal

    from pipeline.checkpoints import STAGING_PREFIX
    from tests.test_staging import dead_pid

    # Workers stage checkpoints in their Ray node's temp folder.
    orphan = Path(ray_head.temp) / "cyclegan-staging" / f"{STAGING_PREFIX}{dead_pid()}-test"
    orphan.mkdir(parents=True)
    (orphan / "checkpoint.pt").write_bytes(os.urandom(1000))
    seed_mlflow_store(tmp_path)
    env = {**os.environ, **ray_head.env, "CYCLEGAN_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--preset", "tiny", "--data", scenes, "--num-workers", "2", "--name", "victim",
            "--epochs", "50", "--set", "train.checkpoint_every=5", "--set",
            "train.num_to_keep=100", "--set", "tracking.log_model=false"]  # fmt: skip
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = start_train(args, env, stdout=out)
    run_dir = tmp_path / "checkpoints" / "victim"
    try:
        wait_for(lambda: len(checkpoint_dirs(run_dir)) >= 1, 300, "a first checkpoint")
        workers = wait_for(lambda: len(_train_workers()) == 2 and _train_workers(), 60, "2 workers")
        before = {w.pid for w in workers}
        workers[-1].send_signal(signal.SIGKILL)
        workers[-1].wait(30)
        # The group restarts (new worker processes) and checkpoints again.
        wait_for(lambda: any(w.pid not in before for w in _train_workers()), 300, "a restart")
        done = len(checkpoint_dirs(run_dir))
        wait_for(lambda: len(checkpoint_dirs(run_dir)) > done, 300, "a checkpoint after it")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(orphan, ignore_errors=True)
    first = log.read_text()
    assert f"removed {orphan}" in first
    # The restarted group continued from the newest checkpoint, not from the start.
    assert re.search(r"resuming from \S+ \(step [1-9]\d*\)", first), first[-3000:]
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and client.get_run(runs[0].info.run_id).info.status == "KILLED"

    stopped_at = final_checkpoint(tmp_path, "victim")["step"]
    planned = stopped_at + 10
    res = train_cli(["--resume", "victim", "--set", f"train.max_steps={planned}"], tmp_path,
                    ray_head.env)  # fmt: skip
    assert res.returncode == 0, explain(res)
    assert final_checkpoint(tmp_path, "victim")["step"] == planned
    client, runs = runs_of(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/G_A")}
    log_every = 2  # the tiny preset's train.log_every
    assert set(range(log_every, planned + 1, log_every)) <= steps


def test_nonfinite_loss_stops_naming_the_step(ray_head, scenes, tmp_path):
    res = train_cli(
        [
            "--preset",
            "tiny",
            "--data",
            scenes,
            "--name",
            "nan",
            "--max-steps",
            "10",
            "--set",
            "train.checkpoint_every=2",
            "--set",
            "scaling.max_failures=0",
        ],
        tmp_path,
        {**ray_head.env, **FAULT_HOOKS, "CYCLEGAN_FAULT_NAN_STEP": "3"},
    )
    assert res.returncode != 0
    assert "non-finite loss at step 3" in res.stderr
    assert re.search(r"on images A \d{6}\.png and B \d{6}\.png", res.stderr), res.stderr[-2000:]
    state = final_checkpoint(tmp_path, "nan")  # the step-2 checkpoint is kept
    assert state["step"] == 2
    assert all(
        torch.isfinite(v).all()
        for net in state["nets"].values()
        for v in net.values()
        if v.is_floating_point()
    )
    _, runs = runs_of(tmp_path)
    assert runs[0].info.status == "FAILED"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "valid presets: demo, paper, paper128, tiny"),
        (["--set", "loss.lambda_X=1"], "valid keys of loss:"),
        (["--set", "loss.lambda_A=-1"], "loss.lambda_A: must be >= 0"),
        (["--set", "data.crop_size=512"], "data.crop_size"),
        (["--resume", "ghost"], "no run called 'ghost'"),
    ],
)
def test_bad_arguments_fail_fast(args, message, tmp_path):
    res = train_cli(args, tmp_path, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr


def test_unpaired_data_is_evaluated_with_fid_and_kid(
    ray_head, unpaired_scenes, inception_weights, tmp_path
):
    res = train_cli(
        ["--preset", "tiny", "--data", unpaired_scenes, "--max-steps", "4",
         "--set", f"train.fid_weights={inception_weights}", "--set", "train.eval_limit=4",
         "--set", "tracking.log_model=false"],
        tmp_path, ray_head.env,
    )  # fmt: skip
    assert res.returncode == 0, explain(res)
    # One worker runs Ray Data in its own process: Ray Data's banners stay out of the output.
    assert "Progress bars disabled" not in res.stdout + res.stderr
    client, runs = runs_of(tmp_path)
    metrics = runs[0].data.metrics
    for key in ("eval/fid_AtoB", "eval/fid_BtoA", "eval/kid_AtoB", "eval/kid_BtoA"):
        assert key in metrics and math.isfinite(metrics[key]), sorted(metrics)
    assert "eval/class_iou" not in metrics  # no paired ground truth here
    assert metrics["eval/fid_AtoB"] > 0


def test_bad_data_is_a_clear_error(ray_head, tmp_path):
    res = train_cli(
        ["--preset", "tiny", "--data", str(tmp_path / "nothing")], tmp_path, ray_head.env
    )
    assert res.returncode == 2
    assert "manifest.json not found" in res.stderr


def test_unplaceable_workers_fail_with_a_message(ray_head, scenes, tmp_path):
    res = train_cli(
        [
            "--preset",
            "tiny",
            "--data",
            scenes,
            "--num-workers",
            "9",
            "--set",
            "scaling.placement_timeout_s=1",
        ],
        tmp_path,
        ray_head.env,
    )
    assert res.returncode == 2
    assert "cannot place the training workers" in res.stderr


def test_existing_name_is_not_reused(ray_head, scenes, tmp_path):
    (tmp_path / "checkpoints" / "taken").mkdir(parents=True)
    res = train_cli(
        ["--preset", "tiny", "--data", scenes, "--name", "taken"], tmp_path, ray_head.env
    )
    assert res.returncode == 2
    assert "--resume taken" in res.stderr
