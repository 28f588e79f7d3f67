"""Train a CycleGAN on Ray Train, tracked in MLflow.

    make train                                   # demo preset on the built-in scenes
    python -m pipeline.train --preset demo
    python -m pipeline.train --preset paper --data s3://bucket/horse2zebra \\
        --storage s3://bucket/runs --num-workers 8 --gpu
    python -m pipeline.train --resume NAME       # continue a stopped run
    python -m pipeline.train --preset demo --set loss.lambda_A=5 --set train.precision=fp32
    ray job submit --working-dir . -- python -m pipeline.train --preset demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field

from pipeline import config as C
from pipeline import exit_with
from pipeline.config import Config

RUN_INFO = "cyclegan_run.json"


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that build a run's config (shared with pipeline.tune)."""
    p.add_argument("--preset", default="demo", help=f"one of {', '.join(C.PRESETS)} (default demo)")
    p.add_argument("--config", help="YAML or JSON file with the same tree as the resolved config")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field (repeatable)")  # fmt: skip
    p.add_argument("--data", help="dataset root (local folder, s3://, gs://)")
    p.add_argument("--storage", help="where run folders and checkpoints go (local, s3://, gs://)")
    p.add_argument("--num-workers", type=int, help="training workers (DDP ranks) per run")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpu", action="store_true", help="one GPU per worker")
    dev.add_argument("--cpu", action="store_true", help="train on CPUs even if GPUs exist")
    p.add_argument("--epochs", type=int, help="epochs at constant lr (decay epochs keep the ratio)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")


def check_fid_weights(cfg: Config) -> None:
    weights = cfg.train.fid_weights
    if weights and weights != "download" and not os.path.isfile(weights):
        raise ValueError(
            f"train.fid_weights: {weights} is not a file (an inception_v3 state dict, or "
            "'download' for torchvision's weights)"
        )


def config_args(args: argparse.Namespace) -> argparse.Namespace:
    """Another command's flags as ``build_config`` reads them: its ``--name`` names a sweep or
    an ablation, not a training run."""
    return argparse.Namespace(**{**vars(args), "name": None, "resume": None, "register": None})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train CycleGAN with Ray Train; track it in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_flags(p)
    p.add_argument("--name", help="name of a new run (default: PRESET-DATE-TIME plus 4 hex digits)")
    p.add_argument(
        "--resume", metavar="NAME", help="continue the run NAME from its latest checkpoint"
    )
    p.add_argument(
        "--register", metavar="MODEL", help="register the generators as MODEL-AtoB/-BtoA"
    )
    return p


def _deep_update(tree: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


def build_config(args: argparse.Namespace, saved: dict | None = None) -> Config:
    """Preset (or a resumed run's saved config), then file, then --set, then flags."""
    cfg = C.from_dict(saved) if saved else C.preset(args.preset)
    tree: dict = {}
    if args.config:
        _deep_update(tree, C.load_file(args.config))
    for item in args.set:
        _deep_update(tree, C.parse_override(item))
    flags: dict = {}
    if args.data:
        flags.setdefault("data", {})["uri"] = args.data
    if args.storage:
        flags.setdefault("storage", {})["uri"] = args.storage
    if args.num_workers is not None:
        flags.setdefault("scaling", {})["num_workers"] = args.num_workers
    if args.gpu or args.cpu:
        flags.setdefault("scaling", {})["use_gpu"] = bool(args.gpu)
    if args.name:
        flags.setdefault("storage", {})["name"] = args.name
    if args.resume:
        flags.setdefault("storage", {}).update(name=args.resume, resume=True)
    if args.max_steps is not None:
        flags.setdefault("train", {})["max_steps"] = args.max_steps
    if args.register:
        flags.setdefault("tracking", {})["register"] = args.register
    if args.address:
        flags.setdefault("scaling", {})["address"] = args.address
    _deep_update(tree, flags)
    cfg = C.merge(cfg, tree)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError("--epochs: must be >= 1")
        decay = round(args.epochs * cfg.optim.n_epochs_decay / max(cfg.optim.n_epochs, 1))
        cfg = C.merge(cfg, {"optim": {"n_epochs": args.epochs, "n_epochs_decay": decay}})
    return cfg


# run folders


def _storage(cfg: Config):
    from pipeline.storage import resolve

    return resolve(cfg.storage.resolved_uri())


def run_dir_exists(cfg: Config, name: str) -> bool:
    import pyarrow.fs as pafs

    fs, root = _storage(cfg)
    return fs.get_file_info(f"{root.rstrip('/')}/{name}").type != pafs.FileType.NotFound


def read_run_info(cfg: Config, name: str) -> dict:
    fs, root = _storage(cfg)
    path = f"{root.rstrip('/')}/{name}/{RUN_INFO}"
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(
            f"--resume {name}: no run called {name!r} under {cfg.storage.resolved_uri()} "
            f"(runs there: {', '.join(list_runs(cfg)) or 'none'})"
        ) from None


def write_run_info(cfg: Config, name: str, info: dict) -> None:
    fs, root = _storage(cfg)
    fs.create_dir(f"{root.rstrip('/')}/{name}", recursive=True)
    with fs.open_output_stream(f"{root.rstrip('/')}/{name}/{RUN_INFO}") as f:
        f.write(json.dumps(info, indent=2).encode())


def list_runs(cfg: Config) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = _storage(cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def new_run_name(cfg: Config) -> str:
    return f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# Ray


def worker_env(cfg: Config) -> dict[str, str]:
    """Variables every Ray worker needs: tracking, storage credentials, embedded paths."""
    from pipeline.storage import storage_env
    from pipeline.tracking import tracking_env

    env = {"CYCLEGAN_HOME": C.home(), **tracking_env(cfg), **storage_env()}
    env.update({k: v for k, v in os.environ.items() if k.startswith("CYCLEGAN_FAULT_")})
    return env


def connect_ray(cfg: Config) -> bool:
    """Connect to the configured cluster or start a local one; True when started here."""
    import ray

    env = worker_env(cfg)
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        # Inside `ray job submit` the job's runtime env already holds some of these variables;
        # combine the two instead of failing on the overlap.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return False
    # Logical CPUs beyond the cores: training workers reserve theirs and Ray Data still gets
    # one per core, so the data tasks can always be scheduled next to the workers.
    cores = os.cpu_count() or 1
    logical = cores + math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    from pipeline.data import RAY_SYSTEM_CONFIG

    ray.init(
        num_cpus=logical,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        _system_config=RAY_SYSTEM_CONFIG,
    )
    return True


def _placement_problems(cfg: Config, use_gpu: bool) -> list[str]:
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 0)
    n, per = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    problems = []
    if use_gpu and n > gpus:
        problems.append(f"{n} workers need {n} GPUs, the cluster has {gpus:g}")
    if n * per > cpus:
        problems.append(f"{n} workers x {per:g} CPUs = {n * per:g} CPUs, the cluster has {cpus:g}")
    return problems


def check_resources(cfg: Config, local: bool) -> bool:
    """Whether to use GPUs. Raises a clear error when the workers cannot all be placed: at once
    on a local Ray, after ``scaling.placement_timeout_s`` on a cluster (autoscalers add nodes)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else gpus > 0
    deadline = time.monotonic() + (0 if local else cfg.scaling.placement_timeout_s)
    warned = False
    while problems := _placement_problems(cfg, use_gpu):
        message = "scaling.num_workers: cannot place the training workers: " + "; ".join(problems)
        if time.monotonic() >= deadline:
            raise ValueError(message)
        if not warned:
            # Ask the autoscaler (if any) for the workers' bundles; reading resources alone
            # creates no demand, so no node would ever be added.
            from ray.autoscaler.sdk import request_resources

            bundle = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
            request_resources(bundles=[bundle] * cfg.scaling.num_workers)
            print(
                f"[train] {message}; waiting up to {cfg.scaling.placement_timeout_s:g}s "
                "for the cluster to grow",
                file=sys.stderr,
                flush=True,
            )
            warned = True
        time.sleep(min(5.0, cfg.scaling.placement_timeout_s))
    return use_gpu


@dataclass
class TrainResult:
    name: str
    run_id: str
    checkpoint_path: str | None
    step: int
    metrics: dict = field(default_factory=dict)
    """The last metrics the workers reported (losses, ``eval/...`` where evaluated)."""


def run(
    cfg: Config, callbacks: list | None = None, parent_run_id: str | None = None
) -> TrainResult:
    """Train ``cfg`` to the end; returns where things went. Raises on failure.

    ``callbacks`` go to Ray Train's RunConfig (Tune's report callback in a sweep);
    ``parent_run_id`` nests the MLflow run under a sweep's run."""
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import tracking
    from pipeline.data import build_datasets, check_dataset
    from pipeline.shards import read_manifest
    from pipeline.storage import StorageError, check_access, error_kind, is_remote
    from pipeline.worker import train_loop

    name = cfg.storage.name or new_run_name(cfg)
    if cfg.storage.resume:
        info = read_run_info(cfg, name)
    elif run_dir_exists(cfg, name):
        raise ValueError(
            f"--name {name}: a run of that name exists under {cfg.storage.resolved_uri()}; "
            f"continue it with --resume {name} or choose another name"
        )
    # Fail on a bad dataset or an unreachable store before any Ray start-up.
    data_uri = cfg.data.resolved_uri()
    for uri, write in ((data_uri, False), (cfg.storage.resolved_uri(), True)):
        if is_remote(uri):
            check_access(uri, write)
    manifest = read_manifest(data_uri)
    check_dataset(manifest, cfg.data)
    check_fid_weights(cfg)
    paired = manifest.paired_test and {"testA", "testB"} <= set(manifest.datasets)
    started_here = connect_ray(cfg)
    try:
        use_gpu = check_resources(cfg, local=started_here)
        datasets, counts = build_datasets(data_uri, cfg.data, cfg.train.seed)
        storage_uri = cfg.storage.resolved_uri()
        tags = {
            "ray.run_name": name,
            "checkpoint.storage": f"{storage_uri.rstrip('/')}/{name}",
            "data.uri": data_uri,
            "data.count_A": str(counts["A"]),
            "data.count_B": str(counts["B"]),
            "preset": cfg.preset,
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        commit = tracking.git_commit()
        if commit:
            tags["git.commit"] = commit
        if cfg.storage.resume:
            run_id = info["mlflow_run_id"]
            tracking.reopen_run(cfg, run_id, tags)
        else:
            run_id = tracking.start_run(cfg, name, tags)
            write_run_info(cfg, name, {"mlflow_run_id": run_id, "config": cfg.to_dict()})
        print(
            f"[train] run {name}, MLflow run {run_id} at {cfg.tracking.resolved_uri()}", flush=True
        )

        fs, path = _storage(cfg)
        storage_kwargs = (
            {"storage_path": path, "storage_filesystem": fs}
            if is_remote(storage_uri)
            else {"storage_path": os.path.abspath(path)}
        )
        cores = os.cpu_count() or 1
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "config": cfg.to_dict(),
                "run_id": run_id,
                "counts": counts,
                "data_uri": data_uri,
                "paired": paired,
                "tracking_uri": cfg.tracking.resolved_uri(),
                "threads_per_worker": max(1, cores // cfg.scaling.num_workers)
                if started_here
                else max(1, int(cfg.scaling.cpus_per_worker)),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=name,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                callbacks=callbacks or [],
                **storage_kwargs,
            ),
            datasets=datasets,
            dataset_config=DataConfig(
                execution_options=ExecutionOptions(preserve_order=cfg.data.deterministic)
            ),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            tracking.finish_run(cfg, run_id, "FAILED")
            kind = error_kind(exc)
            if kind in ("unreachable", "no_space", "access_denied"):
                where = storage_uri if kind != "unreachable" or is_remote(storage_uri) else data_uri
                raise StorageError(
                    where,
                    kind,
                    "training stopped; the checkpoints completed before are kept: continue "
                    f"with `python -m pipeline.train --resume {name}` once this is fixed",
                ) from exc
            raise
        checkpoint = result.checkpoint
        step = int(result.metrics.get("step", 0)) if result.metrics else 0
        if checkpoint is not None and cfg.tracking.log_model:
            tracking.log_generators(cfg, run_id, checkpoint)
        tracking.finish_run(cfg, run_id, "FINISHED")
        return TrainResult(
            name, run_id, checkpoint.path if checkpoint else None, step, dict(result.metrics or {})
        )
    finally:
        if started_here:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        saved = None
        if args.resume:
            probe = build_config(args)
            saved = read_run_info(probe, args.resume)["config"]
        cfg = build_config(args, saved)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("[train] resolved config:\n" + json.dumps(cfg.to_dict(), indent=2), flush=True)
    from pipeline.shards import DatasetError
    from pipeline.storage import StorageError

    try:
        result = run(cfg)
    except (ValueError, DatasetError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import traceback

        from pipeline.storage import redact

        print(redact(traceback.format_exc()), file=sys.stderr)
        print(f"error: training failed: {redact(str(exc))}", file=sys.stderr)
        return 1
    print(
        f"[train] done: run {result.name}, step {result.step}, MLflow run {result.run_id}, "
        f"checkpoint {result.checkpoint_path}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    exit_with(main())
