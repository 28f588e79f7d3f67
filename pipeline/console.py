"""What the commands print: a short header before a run, a summary after it, and Ray's own
output kept to what matters to the user unless ``--verbose``.

Ray prints much that is about Ray (Ray Data's execution plans and progress bars per pass, its
workers' log prefixes in colour, Ray Train's report dumps); :func:`quiet_ray` turns those off
before Ray starts, so the progress lines of the training workers are what a user reads.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline import config as C
from pipeline import overrides, storage

VERBOSE_ENV = "CYCLEGAN_VERBOSE"
"""Set (to 1) by ``--verbose``: Ray's own output stays on, here and in the workers."""

# Ray's loggers whose INFO lines are about Ray's machinery, not the user's run.
# Tune's own lines (trial status, PBT's exploits) stay: they are the sweep's story.
RAY_LOGGERS = ("ray.data", "ray.train", "ray.air", "ray.util")
MLFLOW_LOGGERS = ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_ray(is_verbose: bool | None = None) -> None:
    """Before Ray starts: no colour codes unless stdout is a terminal, and without
    ``--verbose`` no Ray Data banners or progress bars and only warnings from Ray's loggers.
    Workers get the same through the environment (``worker_env``)."""
    if is_verbose is None:
        is_verbose = verbose()
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if is_verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    # MLflow's own "View run ... at" lines: the header already gives the run's link.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's tqdm bars while it logs and registers the models at the end of a run.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.update(quiet_env())
    quiet_ray_loggers()
    quiet_ray_data()


def quiet_ray_loggers(root: bool = False) -> None:
    """Only warnings from Ray's loggers; with ``root`` (a training worker, where Ray Train
    logs each report through a logger named after its file) from the root logger too."""
    if verbose():
        return
    # MLflow's "Creating initial MLflow database tables..." on a new local store, and its
    # system-metrics monitor's start and stop lines.
    names = [*RAY_LOGGERS, *MLFLOW_LOGGERS, *([""] if root else [])]
    for logger in map(logging.getLogger, names):
        # Never lower a stricter level: Ray Data's loggers in a worker are already at ERROR
        # (``RAY_DATA_LOG_LEVEL``, see quiet_env), which keeps "Progress bars disabled" out.
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def quiet_env() -> dict[str, str]:
    """What Ray's worker processes need to stay as quiet as the driver: their Ray Data
    contexts start with progress bars off, and Ray Data's loggers there (in the training
    workers and split coordinators that run the datasets: "Progress bars disabled", "Dataset
    ... execution finished") keep only errors."""
    if verbose():
        return {}
    return {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "ERROR"}


def quiet_ray_data() -> None:
    """Ray Data without its execution banners and progress bars (its context travels with
    the datasets to the processes that run them)."""
    if verbose():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def config_diff(cfg: C.Config) -> list[str]:
    """``section.key=value`` for every value of ``cfg`` that differs from its preset (URIs
    with credentials masked); the run name and resume flag are left out."""
    from pipeline.plan import public_config

    base = overrides.flatten(public_config(C.preset(cfg.preset)))
    mine = overrides.flatten(public_config(cfg))
    skip = {"storage.name", "storage.resume", "preset"}
    return [f"{k}={v}" for k, v in mine.items() if k not in skip and base.get(k) != v]


def mlflow_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to see the run: the server's run page, or how to open a local store's UI."""
    # The query opens MLflow's UI in its model-training layout; without it MLflow 3 starts in
    # the GenAI one (traces, evaluations) unless the user switched before.
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{storage.redact(tracking_uri).rstrip('/')}/{page}"
    return f"`make ui`, then http://127.0.0.1:5000/{page}"


def header(plan, experiment_id: str, use_gpu: bool, joined: str = "", dashboard: str = "") -> str:
    """The lines printed before training starts."""
    cfg = plan.config
    test = plan.manifest.datasets if plan.manifest is not None else {}
    tests = "/".join(str(test.get(f"test{d}", {}).get("count", 0)) for d in ("A", "B"))
    workers = cfg.scaling.num_workers
    lines = [
        f"[train] run {plan.name} (preset {cfg.preset})",
        f"  data        {storage.redact(plan.data_uri)}: {plan.counts['A']} A / "
        f"{plan.counts['B']} B training images, {tests} test"
        + (" (paired: label scores)" if plan.paired else ""),
        f"  checkpoints {storage.redact(plan.run_uri)}",
        f"  MLflow      {mlflow_link(plan.tracking_uri, experiment_id, plan.run_id)}",
        f"  workers     {workers} x {'GPU' if use_gpu else f'{plan.threads_per_worker} threads'}"
        + (f" on the Ray cluster at {joined}" if joined else ""),
    ]
    if dashboard:
        lines.append(f"  Ray         dashboard {dashboard}")
    diff = config_diff(cfg)
    if diff:
        lines.append("  config      " + ("\n              ".join(diff)))
    else:
        lines.append("  config      the preset's")
    return "\n".join(lines)


def summary(result) -> str:
    """The lines printed after a run: final losses, held-out scores, where the model is."""
    metrics = result.metrics or {}
    losses = ", ".join(f"{k.removeprefix('loss/')} {v:.3f}" for k, v in sorted(metrics.items())
                       if k.startswith("loss/"))  # fmt: skip
    scores = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in sorted(metrics.items())
                       if k.startswith("eval/"))  # fmt: skip
    lines = [f"[train] done: run {result.name}, step {result.step}, MLflow run {result.run_id}"]
    if losses:
        lines.append(f"  final losses  {losses}")
    if scores:
        lines.append(f"  held-out      {scores}")
    if result.checkpoint_path:
        lines.append(f"  checkpoint    {storage.redact(str(result.checkpoint_path))}")
    lines.append(
        f"  next          python -m pipeline.translate --model {result.name} ... | "
        f"python -m pipeline.evaluate --model {result.name}"
    )
    return "\n".join(lines)
