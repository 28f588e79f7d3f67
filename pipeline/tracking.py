"""MLflow tracking: one run per training run, written by the driver and by rank 0 only.

The driver creates (or, on resume, reopens) the run and logs params and tags; rank 0 logs
metrics and sample grids through an ``MlflowSink``; every other rank gets a ``NullSink``. A
tracking failure never stops training: the sink reports it once and keeps trying.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline.config import Config, default_tracking_uri, flatten

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value


def tracking_env(cfg: Config) -> dict[str, str]:
    """Environment variables workers need to reach the tracking store, plus MLflow's own
    system-metrics settings (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, ...) where set."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_SYSTEM_METRICS_")}
    return {**env, "MLFLOW_TRACKING_URI": cfg.tracking.uri or default_tracking_uri()}


def client(cfg: Config) -> MlflowClient:
    """A client of the config's tracking store (``tracking.uri`` resolved by the driver)."""
    return MlflowClient(tracking_uri=cfg.tracking.uri or default_tracking_uri())


def ensure_experiment(cfg: Config) -> str:
    """The experiment's id, created on first use; a local SQLite store keeps the artifacts in
    ``mlartifacts/`` beside its file."""
    mlflow_client = client(cfg)
    exp = mlflow_client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = cfg.tracking.uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def start_run(cfg: Config, run_name: str, tags: dict[str, str]) -> str:
    """Create the MLflow run of a new training run (or sweep); log params, tags and
    config.json, all from the config with credentials masked."""
    from pipeline.plan import public_config

    mlflow_client = client(cfg)
    run = mlflow_client.create_run(ensure_experiment(cfg), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    public = public_config(cfg)
    params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(public).items()}
    items = list(params.items())
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params
        mlflow_client.log_batch(
            run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]]
        )
    mlflow_client.log_dict(run_id, public, "config.json")
    return run_id


def reopen_run(cfg: Config, run_id: str, tags: dict[str, str]) -> None:
    """Mark a resumed run as running again and refresh its tags."""
    mlflow_client = client(cfg)
    mlflow_client.get_run(run_id)  # raises a clear MlflowException when the run is gone
    mlflow_client.update_run(run_id, status="RUNNING")
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, value)


def finish_run(cfg: Config, run_id: str, status: str) -> None:
    try:
        client(cfg).set_terminated(run_id, status=status)
    except Exception as exc:  # the run's outcome must still reach the user
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


def log_summary(
    cfg: Config,
    run_id: str,
    texts: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str],
    who: str,
) -> None:
    """The results of a parent run (a sweep, an ablation): text artifacts, metrics and tags.
    A failure is reported on stderr and does not raise: the results are on storage either way."""
    try:
        mlflow_client = client(cfg)
        for name, text in texts.items():
            mlflow_client.log_text(run_id, text, name)
        for key, value in metrics.items():
            mlflow_client.log_metric(run_id, key, float(value))
        for key, value in tags.items():
            mlflow_client.set_tag(run_id, key, value)
    except Exception as exc:
        print(f"[{who}] could not log results to MLflow: {exc}", file=sys.stderr)


def _warn(message: str) -> None:
    # Written directly: Ray Train's patched print would show the line twice.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class NullSink:
    """The sink of every rank but 0, and of unit tests."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MlflowSink(NullSink):
    """Logs to one MLflow run; reports the first failure, then keeps trying quietly."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = False):
        # Fail fast when the server is away (the defaults retry for minutes and would stall
        # the training loop that calls this sink).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.failures = 0
        self._system = None
        if system_metrics:
            self._start_system_metrics(tracking_uri)

    def _start_system_metrics(self, tracking_uri: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mlflow.set_tracking_uri(tracking_uri)
            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=10)
            self._system.start()
        except Exception as exc:
            log.warning("system metrics are off: %s", exc)

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
            if self.failures:
                _warn(f"[tracking] MLflow reachable again after {self.failures} failed writes")
                self.failures = 0
        except Exception as exc:
            if self.failures == 0:
                _warn(f"[tracking] MLflow {what} failed, training goes on: {exc}")
            self.failures += 1

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._guard(
            "metric logging", self.client.log_batch, self.run_id, metrics=batch, synchronous=True
        )

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._guard("image logging", self.client.log_image, self.run_id, image, key=key, step=step)

    def close(self) -> None:
        if self._system is not None:
            with contextlib.suppress(Exception):
                self._system.finish()


def log_generators(cfg: Config, run_id: str, checkpoint) -> None:
    """Log G_A (A->B) and G_B (B->A) of a Ray checkpoint as MLflow models (pickle format, with
    the ``cyclegan`` package as code), and register them when ``tracking.register`` is set."""
    import cyclegan
    from cyclegan.checkpoint import load_checkpoint
    from cyclegan.networks import ResnetGenerator
    from pipeline.checkpoints import CHECKPOINT_FILE

    with checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    size = cfg.data.crop_size
    mlflow.set_tracking_uri(cfg.tracking.uri or default_tracking_uri())
    for net_name, model_name, m in (
        ("G_A", "generator_AtoB", cfg.model),
        ("G_B", "generator_BtoA", cfg.model.reversed()),
    ):
        net = ResnetGenerator(m.input_nc, m.output_nc, m.ngf, m.n_blocks, m.norm)
        net.load_state_dict(state["nets"][net_name])
        net.eval()
        example = np.zeros((1, m.input_nc, size, size), dtype=np.float32)
        registered = (
            f"{cfg.tracking.register}-{model_name.split('_')[1]}" if cfg.tracking.register else None
        )
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                net,
                name=model_name,
                serialization_format="pickle",
                code_paths=[str(Path(cyclegan.__file__).parent)],
                input_example=example,
                registered_model_name=registered,
                step=int(state["step"]),
            )
