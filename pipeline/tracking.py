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
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from cyclegan.config import ModelConfig
from pipeline.config import Config, default_tracking_uri
from pipeline.overrides import flatten

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500  # MLflow's limit on a param value
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TAG = (EXPERIMENT_KIND, "custom_model_development")
"""The experiment tag MLflow's UI reads to open an experiment in its model-training layout
(runs, charts, artifacts) rather than the GenAI one (traces, evaluations)."""


def standard_tags(entry_point: str) -> dict[str, str]:
    """MLflow's own source tags (shown by its UI): the command, the user, the git commit."""
    import getpass

    from mlflow.utils import mlflow_tags

    tags = {
        mlflow_tags.MLFLOW_SOURCE_NAME: entry_point,
        mlflow_tags.MLFLOW_SOURCE_TYPE: "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL",
    }
    with contextlib.suppress(Exception):  # no user name in some containers
        tags[mlflow_tags.MLFLOW_USER] = getpass.getuser()
    commit = git_commit()
    if commit:
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = commit
    return tags


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
        if EXPERIMENT_KIND not in exp.tags:  # made by an older version or by hand
            mlflow_client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND_TAG)
        return exp.experiment_id
    location = None
    uri = cfg.tracking.uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(
        cfg.tracking.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND_TAG])
    )


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

    def flush(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass(eq=False)  # compared by identity: a queued image is an array
class _Write:
    """One queued write of an ``MlflowSink``: a metric batch, or an image (``image`` set)."""

    step: int
    metrics: list[Metric] | None = None
    image: np.ndarray | None = None
    key: str = ""
    timestamp: int = 0  # ms, when the image was handed over

    @property
    def kind(self) -> str:
        return "metric batches" if self.image is None else "images"


def _rejected(exc: Exception) -> bool:
    """Whether a write was refused for good (a 4xx from the server, or MLflow's own checks):
    retrying it would hold up the queue forever. Timeouts, throttling and 5xx are retried."""
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, OSError):
        return True  # e.g. an image key with a character MLflow does not take
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    else:  # requests.HTTPError from an artifact upload
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _step_ranges(steps: list[int]) -> str:
    """``"3-5, 9"`` for the steps 3, 4, 5, 9."""
    ordered = sorted(set(steps))
    parts, start = [], ordered[0]
    for prev, step in zip(ordered, [*ordered[1:], None], strict=True):
        if step is None or step != prev + 1:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
            start = step
    return ", ".join(parts)


class MlflowSink(NullSink):
    """Logs to one MLflow run from a background thread, so that a tracking server that is
    down or hangs never stalls the training loop that calls the sink.

    ``log_metrics`` and ``log_image`` only queue a write and return. One writer thread sends
    the queue in order (consecutive metric batches merged into one request) and retries a
    failed request until it goes through; a write the server rejects (4xx) is dropped. The
    queue is bounded: at ``max_pending`` metric batches (``max_pending_images`` images) the
    oldest one is dropped. ``close()`` waits up to ``flush_timeout_s`` for the queue to
    drain, then reports once, with their steps, the writes that were lost. The first failure
    of an outage is reported once, and so is the recovery.
    """

    RETRY_MAX_S = 5.0  # the longest wait between two tries of a failed request
    METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        system_metrics: bool = False,
        *,
        max_pending: int = 4096,
        max_pending_images: int = 8,
        flush_timeout_s: float = 30.0,
        client: MlflowClient | None = None,
    ):
        # Fail fast when the server is away (the defaults retry for minutes): a request in
        # flight when close() gives up would hold the writer thread that long.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if max_pending < 1 or max_pending_images < 1 or flush_timeout_s < 0:
            raise ValueError(
                f"MlflowSink: max_pending ({max_pending}) and max_pending_images "
                f"({max_pending_images}) must be >= 1, flush_timeout_s ({flush_timeout_s}) >= 0"
            )
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self._client: MlflowClient | None = client
        self.max_pending, self.max_pending_images = max_pending, max_pending_images
        self.flush_timeout_s = flush_timeout_s
        self.failures = 0  # failed tries since the last request that went through
        self._rejections, self._rejection = 0, None  # writes refused for good; the last error
        # Guarded by _cond: the queue, the request in flight, and what was lost.
        self._cond = threading.Condition()
        self._queue: deque[_Write] = deque()
        self._queued_images = 0
        self._in_flight: list[_Write] = []
        self._lost: dict[str, list[int]] = {"metric batches": [], "images": []}
        self._lost_why: Counter[str] = Counter()
        self._closing = False
        self._gave_up = threading.Event()
        self._writer = threading.Thread(target=self._write_queue, name="mlflow-sink", daemon=True)
        self._writer.start()
        self._system = None
        if system_metrics:
            self._start_system_metrics(tracking_uri)

    @property
    def client(self) -> MlflowClient:
        """Made by the writer thread as it starts: a client of a local store opens its database
        then (most of a second), while the worker goes on getting ready."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _start_system_metrics(self, tracking_uri: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            mlflow.set_tracking_uri(tracking_uri)
            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=10)
            self._system.start()
        except Exception as exc:
            log.warning("system metrics are off: %s", exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._put(_Write(step, metrics=batch))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        # A copy: the caller may reuse its array before the writer sends this one.
        now = int(time.time() * 1000)
        self._put(_Write(step, image=np.array(image, copy=True), key=key, timestamp=now))

    def flush(self) -> bool:
        """Wait up to ``flush_timeout_s`` until every write queued so far went through; True
        when they did. At once False while the server is failing: an outage never stalls."""
        deadline = time.monotonic() + self.flush_timeout_s
        with self._cond:
            while (self._queue or self._in_flight) and not (self.failures or self._closing):
                if (remaining := deadline - time.monotonic()) <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return not (self._queue or self._in_flight)

    def close(self) -> None:
        """Wait up to ``flush_timeout_s`` for the queue to drain; report what was lost."""
        if self._system is not None:
            with contextlib.suppress(Exception):
                self._system.finish()
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._writer.join(self.flush_timeout_s)
        unsure: list[_Write] = []
        with self._cond:
            if self._writer.is_alive():  # still waiting on the server: leave it behind
                self._gave_up.set()
                why = f"still queued when close gave up after {self.flush_timeout_s:g} s"
                self._lose(list(self._queue), why)
                unsure, self._in_flight = self._in_flight, []  # may still arrive: told apart
                self._queue.clear()
            counts = [f"{len(steps)} {kind} could not be written (steps {_step_ranges(steps)})"
                      for kind, steps in self._lost.items() if steps]  # fmt: skip
            if counts:
                counts[-1] += ": " + ", ".join(f"{n} {why}" for why, n in self._lost_why.items())
            if unsure:
                counts.append(f"{len(unsure)} {unsure[0].kind} may not have been written (steps "
                              f"{_step_ranges([w.step for w in unsure])}): in flight when close "
                              "gave up")  # fmt: skip
            if counts:
                _warn(f"[tracking] {'; '.join(counts)}")

    def _put(self, write: _Write) -> None:
        """Queue one write without waiting; a full queue drops its oldest write of that kind."""
        image = write.image is not None
        with self._cond:
            if self._closing:
                raise RuntimeError(f"MlflowSink of run {self.run_id} is closed (step {write.step})")
            queued = self._queued_images if image else len(self._queue) - self._queued_images
            if queued >= (self.max_pending_images if image else self.max_pending):
                oldest = next(w for w in self._queue if (w.image is not None) == image)
                self._queue.remove(oldest)
                self._queued_images -= image
                self._lose([oldest], "dropped while the queue was full")
            self._queue.append(write)
            self._queued_images += image
            self._cond.notify()

    def _lose(self, writes: list[_Write], why: str) -> None:
        for write in writes:
            self._lost[write.kind].append(write.step)
            self._lost_why[why] += 1

    def _write_queue(self) -> None:
        """The writer thread: sends the queue in order until close() has it drained."""
        # The client first, before anything is queued: ready when the first metrics come.
        with contextlib.suppress(Exception):  # a failing store is reported by the first send
            _ = self.client
        while not self._gave_up.is_set():
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                writes = self._in_flight = self._take()
            rejected = writes if self._send(writes) else []
            if len(rejected) > 1:  # one bad batch must not take its neighbours along
                rejected = [w for w in writes if not self._gave_up.is_set() and self._send([w])]
            if rejected and self._rejections == 0:
                _warn(f"[tracking] MLflow rejected the {rejected[0].kind} of step "
                      f"{rejected[0].step}, dropped: {self._rejection}")  # fmt: skip
            self._rejections += len(rejected)
            with self._cond:
                if self._in_flight:  # else close() gave up on them and counted them lost
                    self._lose(rejected, "rejected by the server")
                self._in_flight = []
                self._cond.notify_all()  # for flush()

    def _take(self) -> list[_Write]:
        """The next request's writes (under the lock): one image, or metric batches in a row."""
        writes = [self._queue.popleft()]
        if writes[0].image is not None:
            self._queued_images -= 1
            return writes
        count = len(writes[0].metrics)
        while self._queue and self._queue[0].image is None:
            count += len(self._queue[0].metrics)
            if count > self.METRICS_PER_REQUEST:
                break
            writes.append(self._queue.popleft())
        return writes

    def _send(self, writes: list[_Write]) -> bool:
        """Try one request until it goes through, close() gives up on it, or the server
        rejects it (returns True)."""
        what = "metric logging" if writes[0].image is None else "image logging"
        wait = 0.5
        while True:
            try:
                if writes[0].image is None:
                    metrics = [m for w in writes for m in w.metrics]
                    self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                else:
                    w = writes[0]
                    self.client.log_image(self.run_id, w.image, key=w.key, step=w.step,
                                          timestamp=w.timestamp, synchronous=True)  # fmt: skip
            except Exception as exc:
                if _rejected(exc):
                    self._rejection = exc
                    return True
                if self.failures == 0:
                    _warn(f"[tracking] MLflow {what} failed, training goes on: {exc}")
                self.failures += 1
                if self._gave_up.wait(wait):
                    return False
                wait = min(2 * wait, self.RETRY_MAX_S)
                continue
            if self.failures:
                _warn(f"[tracking] MLflow reachable again after {self.failures} failed writes; "
                      f"sending the {len(self._queue)} queued writes")  # fmt: skip
                self.failures = 0
            return False


def log_generator(
    net, cfg: ModelConfig, name: str, size: int, *, step: int = 0, registered: str | None = None
):
    """Log one generator to the active MLflow run as the model ``name``; returns MLflow's
    ModelInfo. The model is a pt2 graph (torch.export, no pickle) that takes any batch and any
    image size of at least 4 px, for ``mlflow.pytorch.load_model``; its ``extra_files`` hold the
    state dict and architecture that :mod:`pipeline.models` loads as a ResnetGenerator."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline.exporters import PaddedGenerator
    from pipeline.models import write_generator_files

    def images(channels: int) -> Schema:
        return Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))])

    # A batch of 2: torch.export fixes a dimension that is 1 in the example.
    example = np.zeros((2, cfg.input_nc, size, size), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="cyclegan-generator-") as tmp:
        return mlflow.pytorch.log_model(
            PaddedGenerator(net).eval(),  # pads to a multiple of 4 without a shape branch
            name=name,
            serialization_format="pt2",
            signature=ModelSignature(inputs=images(cfg.input_nc), outputs=images(cfg.output_nc)),
            input_example=example,
            extra_files=write_generator_files(net, cfg, tmp),
            # Given, not inferred: inferring loads the model in a subprocess.
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            registered_model_name=registered,
            step=step,
        )


def log_generators(cfg: Config, run_id: str, checkpoint) -> None:
    """Log G_A (A->B) and G_B (B->A) of a Ray checkpoint as MLflow models (see
    :func:`log_generator`), and register them when ``tracking.register`` is set."""
    from cyclegan.checkpoint import load_checkpoint
    from cyclegan.networks import ResnetGenerator
    from pipeline.checkpoints import CHECKPOINT_FILE

    with checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    mlflow.set_tracking_uri(cfg.tracking.uri or default_tracking_uri())
    for net_name, model_name, m in (
        ("G_A", "generator_AtoB", cfg.model),
        ("G_B", "generator_BtoA", cfg.model.reversed()),
    ):
        net = ResnetGenerator(m.input_nc, m.output_nc, m.ngf, m.n_blocks, m.norm)
        net.load_state_dict(state["nets"][net_name])
        net.eval()
        registered = (
            f"{cfg.tracking.register}-{model_name.split('_')[1]}" if cfg.tracking.register else None
        )
        with mlflow.start_run(run_id=run_id):
            log_generator(
                net,
                m,
                model_name,
                cfg.data.crop_size,
                step=int(state["step"]),
                registered=registered,
            )
