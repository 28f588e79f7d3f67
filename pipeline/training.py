"""A training run on Ray Train, driven from one process: open the MLflow run, build the
datasets and the TorchTrainer from a ``RunPlan``, fit, log the models, close the run."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import time
from dataclasses import dataclass, field

from pipeline import console, cpu_priority, ray_cluster, runs, storage
from pipeline.plan import RunPlan, public_config


@dataclass
class TrainResult:
    name: str
    run_id: str
    checkpoint_path: str | None
    step: int
    metrics: dict = field(default_factory=dict)
    """The last metrics the workers reported (losses, ``eval/...`` where evaluated)."""


def open_mlflow_run(plan: RunPlan, parent_run_id: str | None = None) -> str:
    """Create the run's MLflow run (or reopen it on resume) and record it in the run folder."""
    from pipeline import tracking

    cfg = plan.config
    tags = {
        "ray.run_name": plan.name,
        "checkpoint.storage": storage.redact(plan.run_uri),
        "data.uri": storage.redact(plan.data_uri),
        "data.count_A": str(plan.counts["A"]),
        "data.count_B": str(plan.counts["B"]),
        "preset": cfg.preset,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(tracking.standard_tags("pipeline.train"))
    if cfg.storage.resume:
        run_id = runs.read_info(plan.storage_uri, plan.name)["mlflow_run_id"]
        tracking.reopen_run(cfg, run_id, tags)
        return run_id
    run_id = tracking.start_run(cfg, plan.name, tags)
    runs.write_info(
        plan.storage_uri, plan.name, {"mlflow_run_id": run_id, "config": public_config(cfg)}
    )
    return run_id


def trainer_class(private: bool) -> type:
    """Ray Train's TorchTrainer; on a Ray the run started for itself (``private``), one without
    Ray Train's placement-group cleaner. That detached actor asks the State API (through the
    dashboard and the GCS) every second whether the controller still lives, to free the
    workers' placement group if it died; a private Ray ends with the run, placement group and
    all. Measured on 2 cores at 32 px: the cleaner and the dashboard's state module took about
    2% of a core, and with Ray's processes at idle priority (``scaling.idle_helpers``) a query
    now and then timed out and Ray Train warned."""
    from ray.train.torch import TorchTrainer

    if not private:
        return TorchTrainer
    try:  # internal to Ray Train: where it moved or went, the trainer keeps its callbacks
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return TorchTrainer

    class PrivateRayTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            found = super()._create_default_callbacks()
            return [c for c in found if not isinstance(c, PlacementGroupCleanerCallback)]

    return PrivateRayTrainer


def build_trainer(plan: RunPlan, use_gpu: bool, callbacks: list | None, private: bool = False):
    """The run's TorchTrainer; ``private``: on a Ray this run started for itself."""
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )

    from pipeline.reading import build_datasets
    from pipeline.worker import train_loop

    cfg = plan.config
    fs, path = storage.resolve(plan.storage_uri)
    storage_kwargs = (
        {"storage_path": path, "storage_filesystem": fs}
        if storage.is_remote(plan.storage_uri)
        else {"storage_path": os.path.abspath(path)}
    )
    return trainer_class(private)(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cfg.scaling.cpus_per_worker,
                **cfg.scaling.extra_resources(),
            },
        ),
        run_config=RunConfig(
            name=plan.name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            # Ray Train's own INFO lines (worker-group start, every report) only with --verbose.
            logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "WARNING"),
            callbacks=callbacks or [],
            **storage_kwargs,
        ),
        datasets=build_datasets(plan.manifest, cfg.data, cfg.train.seed),
        dataset_config=DataConfig(
            # One worker reads each dataset whole, in its own process: no streaming_split, so
            # no split coordinator (an actor per domain to start, and a hop through it for
            # every block).
            datasets_to_split="all" if cfg.scaling.num_workers > 1 else [],
            execution_options=ExecutionOptions(preserve_order=cfg.data.deterministic),
        ),
    )


def final_checkpoint(plan: RunPlan, result) -> tuple[object | None, int]:
    """The run's final checkpoint and step. Ray's result names the newest checkpoint it
    recorded; a worker or node lost just after writing a newer one leaves that one unrecorded
    (the restarted workers resume from it, see ``worker.restore``), so when the run folder
    holds a newer one, the newest whole checkpoint there is the run's final state."""
    from ray.train import Checkpoint

    from pipeline import checkpoints

    recorded = result.checkpoint
    step = int((result.metrics or {}).get("step", 0))
    fs, run_dir = storage.resolve(plan.run_uri)
    folders = checkpoints.checkpoint_folders(fs, run_dir, plan.run_uri)
    newest = max((posixpath.basename(f.rstrip("/")) for f in folders), default=None)
    if newest is None or (
        recorded is not None and posixpath.basename(recorded.path.rstrip("/")) >= newest
    ):
        return recorded, step
    path, ckpt = checkpoints.newest_loadable(fs, run_dir, plan.run_uri)
    return Checkpoint(path, filesystem=fs), int(ckpt["step"])


def _storage_failure(plan: RunPlan, exc: BaseException) -> storage.StorageError | None:
    """A storage failure of ``fit`` as the user's error, naming the store and how to go on."""
    kind = storage.error_kind(exc)
    if kind not in ("unreachable", "no_space", "access_denied"):
        return None
    remote = storage.is_remote(plan.storage_uri)
    where = plan.storage_uri if kind != "unreachable" or remote else plan.data_uri
    return storage.StorageError(
        where,
        kind,
        "training stopped; the checkpoints completed before are kept: continue "
        f"with `python -m pipeline.train --resume {plan.name}` once this is fixed",
    )


def train(
    plan: RunPlan, callbacks: list | None = None, parent_run_id: str | None = None
) -> TrainResult:
    """Train ``plan`` to the end; returns where things went. Raises on failure.

    ``callbacks`` go to Ray Train's RunConfig (Tune's report callback in a sweep);
    ``parent_run_id`` nests the MLflow run under a sweep's run."""
    import ray

    cfg = plan.config
    if not plan.started_at:
        plan = dataclasses.replace(plan, started_at=time.time(), startup={})
    plan.mark("resolved")
    console.quiet_ray()
    workers_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # What the driver needs next (torch, Ray Train, MLflow) loads while Ray starts.
    started_here = ray_cluster.connect(
        cfg,
        workers_cpus,
        address=plan.address,
        import_ahead=("pipeline.worker", "pipeline.reading"),
    )
    restore_env = ray_cluster.train_controller_env(started_here)
    plan.mark("ray")
    from pipeline import tracking  # MLflow: loaded while Ray started (import_ahead)

    try:
        use_gpu = ray_cluster.check_resources(cfg, local=started_here)
        plan = dataclasses.replace(plan, run_id=open_mlflow_run(plan, parent_run_id))
        experiment = tracking.client(cfg).get_run(plan.run_id).info.experiment_id
        joined = "" if started_here else ray.get_runtime_context().gcs_address
        dashboard = ray_cluster.dashboard_url()
        header = console.header(plan, experiment, use_gpu, storage.redact(joined), dashboard)
        print(header, flush=True)
        plan.mark("mlflow")
        try:
            trainer = build_trainer(plan, use_gpu, callbacks, private=started_here)
            plan.mark("fit")
            idle = started_here and cfg.scaling.idle_helpers
            with cpu_priority.helpers_idle(idle, cfg.scaling.num_workers):
                result = trainer.fit()
            checkpoint, step = final_checkpoint(plan, result)
            if checkpoint is not None and cfg.tracking.log_model:
                tracking.log_generators(cfg, plan.run_id, checkpoint)
        except BaseException as exc:
            # The MLflow run never stays RUNNING: Ctrl-C (or a kill that Python sees) marks it
            # KILLED, any other failure FAILED; `--resume` reopens it either way.
            interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
            tracking.finish_run(cfg, plan.run_id, "KILLED" if interrupted else "FAILED")
            failure = None if interrupted else _storage_failure(plan, exc)
            if failure is not None:
                raise failure from exc
            raise
        tracking.finish_run(cfg, plan.run_id, "FINISHED")
        path = checkpoint.path if checkpoint else None
        return TrainResult(plan.name, plan.run_id, path, step, dict(result.metrics or {}))
    finally:
        restore_env()
        if started_here:
            ray.shutdown()
