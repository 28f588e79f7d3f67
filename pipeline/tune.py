"""Search CycleGAN hyperparameters with Ray Tune; every trial is a real training run.

    python -m pipeline.tune --preset demo --num-samples 8
    python -m pipeline.tune --preset demo --space loss.lambda_cyc=loguniform:1:30 \\
        --space loss.pool_size=choice:0,10,50,100 --space optim.lr=loguniform:5e-5:5e-4
    python -m pipeline.tune --preset paper128 --data s3://bucket/cityscapes --num-workers 2 --gpu
    python -m pipeline.tune --resume SWEEP          # continue an interrupted sweep
    python -m pipeline.train --config runs/tune/SWEEP/best_config.yaml   # train the winner

Each trial runs the same pipeline as ``pipeline.train`` (same data path, step, checkpoints,
MLflow logging, as a child run of the sweep's MLflow run) and reports the evaluation on the
paired test split (``eval/class_iou`` of photo->labels by default). ASHA stops weak trials early.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import yaml

from pipeline import config as C
from pipeline import exit_with
from pipeline.config import Config
from pipeline.train import (
    add_config_flags,
    build_config,
    check_fid_weights,
    config_args,
    new_run_name,
    run_dir_exists,
)

SWEEP_INFO = "sweep.json"
# Steps per trial when neither --max-steps nor train.max_steps says: the demo sweep then takes
# minutes on a laptop CPU. Other presets train each trial in full.
TRIAL_STEPS = {"demo": 1000}
DEFAULT_SPACE = ("loss.lambda_cyc=loguniform:1:30", "loss.pool_size=choice:0,10,50,100")
VIRTUAL_KEYS = {"loss.lambda_cyc": ("loss.lambda_A", "loss.lambda_B")}


def _value(text: str):
    """A space value: a number where it reads as one (YAML would keep ``2e-3`` a string)."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return yaml.safe_load(text)


def parse_space(items: list[str], pbt: bool = False) -> dict:
    """``KEY=KIND:ARGS`` items as a Tune param space. Kinds: ``loguniform:LO:HI``,
    ``uniform:LO:HI``, ``randint:LO:HI``, ``choice:V1,V2,...``, ``grid:V1,V2,...``.
    ``loss.lambda_cyc`` sets both cycle weights. With ``pbt``, the mutations PBT draws from:
    a grid or choice becomes the list of its values (PBT moves to a neighbouring value)."""
    from ray import tune

    space = {}
    for item in items:
        key, sep, spec = item.partition("=")
        kind, _, args = spec.partition(":")
        if not sep or not kind:
            raise ValueError(f"--space {item!r}: expected section.field=kind:args")
        _check_key(key)
        try:
            if kind in ("loguniform", "uniform", "randint"):
                lo, hi = (float(x) for x in args.split(":"))
                fn = {"loguniform": tune.loguniform, "uniform": tune.uniform}.get(kind)
                space[key] = fn(lo, hi) if fn else tune.randint(int(lo), int(hi))
            elif kind in ("choice", "grid"):
                values = [_value(v) for v in args.split(",") if v.strip()]
                if not values:
                    raise ValueError("no values")
                if pbt:
                    space[key] = values
                elif kind == "choice":
                    space[key] = tune.choice(values)
                else:
                    space[key] = tune.grid_search(values)
            else:
                raise ValueError(
                    f"unknown kind {kind!r} (loguniform, uniform, randint, choice, grid)"
                )
        except ValueError as exc:
            raise ValueError(f"--space {item!r}: {exc}") from None
    return space


def _check_key(key: str) -> None:
    if key in VIRTUAL_KEYS:
        return
    section, _, name = key.partition(".")
    C.merge(C.tiny(), {section: {}})  # raises naming the valid sections
    valid = C._field_types(type(getattr(C.tiny(), section)))
    if name not in valid:
        raise ValueError(
            f"--space: unknown key {key}; valid keys of {section}: {', '.join(sorted(valid))}"
        )


def apply_params(base: dict, params: dict) -> Config:
    """The base config tree with one trial's sampled values."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        for target in VIRTUAL_KEYS.get(key, (key,)):
            section, _, name = target.partition(".")
            tree.setdefault(section, {})[name] = value
    return C.from_dict(tree)


def trial_fn(config: dict) -> None:
    """One trial: a full training run whose reports feed Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import run

    cfg = apply_params(config["base"], config["params"])
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{config['sweep']}-{trial_id}"
    # A restored sweep re-runs unfinished trials: continue their training runs.
    resume = run_dir_exists(cfg, name)
    cfg = C.merge(cfg, {"storage": {"name": name, "resume": resume}})
    run(cfg, callbacks=[TuneReportCallback()], parent_run_id=config["parent_run_id"])


PBT_KEYS = ("loss.lambda_cyc", "loss.lambda_A", "loss.lambda_B", "loss.lambda_identity",
            "loss.lambda_gan", "optim.lr")  # fmt: skip
DEFAULT_PBT_SPACE = ("loss.lambda_cyc=loguniform:1:30", "optim.lr=loguniform:5e-5:5e-4")


def _check_pbt(cfg: Config, space: list[str]) -> None:
    """PBT copies a running trial's state into another and perturbs it: only values that can
    change mid-run qualify, and a trial is one process (Tune must see its checkpoints)."""
    for item in space:
        key = item.partition("=")[0]
        if key not in PBT_KEYS:
            raise ValueError(
                f"--space {item}: PBT changes values mid-run, which {key} cannot do; "
                f"PBT searches {', '.join(PBT_KEYS)} (use ASHA for the others)"
            )
    if cfg.scaling.num_workers != 1:
        raise ValueError(
            "--scheduler pbt: each trial trains in one process (Tune handles its checkpoints); "
            "use --num-workers 1"
        )


def _pbt_data(cfg: Config) -> dict:
    """What every PBT trial reads: the Ray Datasets (built once) and the dataset's facts."""
    from pipeline.data import build_datasets
    from pipeline.shards import read_manifest

    data_uri = cfg.data.resolved_uri()
    manifest = read_manifest(data_uri)
    datasets, counts = build_datasets(data_uri, cfg.data, cfg.train.seed)
    paired = manifest.paired_test and {"testA", "testB"} <= set(manifest.datasets)
    return {"datasets": datasets, "counts": counts, "uri": data_uri, "paired": paired}


def pbt_trial_fn(config: dict, data: dict) -> None:
    """One PBT trial: the training loop in this process, reporting checkpoints to Tune; a
    trial restarted from another's checkpoint continues in its own MLflow child run."""
    import ray.tune

    from pipeline import tracking
    from pipeline.worker import TuneRuntime, train_loop

    cfg = apply_params(config["base"], config["params"])
    ctx = ray.tune.get_context()
    name = f"{config['sweep']}-{ctx.get_trial_id()}"
    tags = {"mlflow.parentRunId": config["parent_run_id"], "ray.run_name": name}
    run_file = os.path.join(ctx.get_trial_dir(), "mlflow_run_id")
    if os.path.exists(run_file):
        with open(run_file) as f:
            run_id = f.read().strip()
        tracking.reopen_run(cfg, run_id, tags)
    else:
        run_id = tracking.start_run(cfg, name, tags)
        with open(run_file, "w") as f:
            f.write(run_id)
    loop_config = {
        "config": cfg.to_dict(),
        "run_id": run_id,
        "counts": data["counts"],
        "data_uri": data["uri"],
        "paired": data["paired"],
        "tracking_uri": cfg.tracking.resolved_uri(),
        "threads_per_worker": max(1, int(cfg.scaling.cpus_per_worker)),
    }
    try:
        train_loop(loop_config, TuneRuntime(data["datasets"]))
    except Exception:
        tracking.finish_run(cfg, run_id, "FAILED")
        raise
    tracking.finish_run(cfg, run_id, "FINISHED")


def _storage_paths(cfg: Config, sweep: str) -> tuple[dict, str]:
    from pipeline.storage import is_remote, join, resolve

    root = join(cfg.storage.resolved_uri(), "tune")
    fs, path = resolve(root)
    if is_remote(root):
        return {"storage_path": path, "storage_filesystem": fs}, join(root, sweep)
    os.makedirs(path, exist_ok=True)
    return {"storage_path": os.path.abspath(path)}, os.path.join(os.path.abspath(path), sweep)


def _write(uri: str, name: str, text: str) -> None:
    from pipeline.storage import join, resolve

    fs, path = resolve(join(uri, name))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _exists(uri: str, name: str) -> bool:
    import pyarrow.fs as pafs

    from pipeline.storage import join, resolve

    fs, path = resolve(join(uri, name))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read(uri: str, name: str) -> str:
    from pipeline.storage import join, resolve

    fs, path = resolve(join(uri, name))
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.tune",
        description="Hyperparameter search over training runs with Ray Tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_config_flags(p)
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND:ARGS",
                   help=f"a searched field (repeatable; default: {' '.join(DEFAULT_SPACE)})")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=4, help="trials (per grid point)")
    p.add_argument("--scheduler", choices=("asha", "pbt", "fifo"), default="asha",
                   help="asha stops weak trials early; pbt copies strong trials into weak ones "
                   "and perturbs lr/loss weights (one process per trial)")  # fmt: skip
    p.add_argument("--perturbation-interval", type=int, default=2,
                   help="PBT: reports (checkpoints) between exploit/explore steps")  # fmt: skip
    p.add_argument("--grace-period", type=int, default=2, help="ASHA: reports before a stop")
    p.add_argument("--metric", default="eval/class_iou", help="reported metric to optimise")
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument("--name", help="sweep name (default tune-DATE-TIME plus 4 hex digits)")
    p.add_argument("--resume", metavar="SWEEP", help="continue an interrupted sweep")
    return p


def connect(cfg: Config, max_concurrent: int) -> bool:
    import ray

    from pipeline.train import worker_env

    if ray.is_initialized():
        return False
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS")
    env = worker_env(cfg)
    if address:
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env={"env_vars": env})
        return False
    from pipeline.data import RAY_SYSTEM_CONFIG

    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRIAL_CPU
    ray.init(
        num_cpus=(os.cpu_count() or 1) + math.ceil(max_concurrent * per_trial),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env},
        _system_config=RAY_SYSTEM_CONFIG,
    )
    return True


def _check_metric(metric: str, cfg: Config, paired: bool) -> None:
    """Refuse an objective no trial would report, before any trial starts."""
    from cyclegan.train_step import LOSS_NAMES
    from pipeline.evaluate import PAIRED_METRICS, UNPAIRED_METRICS

    evals = PAIRED_METRICS if paired else UNPAIRED_METRICS if cfg.train.fid_weights else ()
    known = [f"eval/{m}" for m in evals] + list(LOSS_NAMES)
    if metric in known:
        return
    why = ""
    if metric.startswith("eval/") and not evals:
        why = (
            f" (the dataset {cfg.data.resolved_uri()} has no paired test split; set "
            "train.fid_weights to evaluate FID/KID)"
        )
    raise ValueError(f"--metric {metric}: trials do not report it{why}; choose one of {known}")


TRIAL_CPU = 0.1  # the trial's own driver only orchestrates its TorchTrainer


def sweep(args: argparse.Namespace) -> dict:
    import ray
    from ray import tune

    from pipeline import tracking
    from pipeline.data import check_dataset
    from pipeline.shards import read_manifest

    name = args.resume or args.name or new_run_name(C.tiny()).replace("tiny", "tune", 1)
    cfg = build_config(config_args(args))
    budget = TRIAL_STEPS.get(cfg.preset)
    if budget and not args.max_steps and not cfg.train.max_steps:
        cfg = C.merge(cfg, {"train": {"max_steps": budget}})
    storage_kwargs, sweep_uri = _storage_paths(cfg, name)
    if args.resume:
        try:
            info = json.loads(_read(sweep_uri, SWEEP_INFO))
        except FileNotFoundError:
            raise ValueError(f"--resume {name}: no sweep at {sweep_uri}") from None
        cfg = C.from_dict(info["base"])
    else:
        if _exists(sweep_uri, SWEEP_INFO):
            raise ValueError(f"--name {name}: a sweep of that name exists; use --resume {name}")
        parse_space(args.space or list(DEFAULT_SPACE))  # bad spaces fail before anything else
        manifest = read_manifest(cfg.data.resolved_uri())
        check_dataset(manifest, cfg.data)
        _check_metric(args.metric, cfg, manifest.paired_test)
        check_fid_weights(cfg)
        if args.scheduler == "pbt":
            _check_pbt(cfg, args.space or list(DEFAULT_PBT_SPACE))
        info = {
            "base": cfg.to_dict(),
            "space": args.space
            or list(DEFAULT_PBT_SPACE if args.scheduler == "pbt" else DEFAULT_SPACE),
            "metric": args.metric,
            "mode": args.mode,
            "scheduler": args.scheduler,
            "parent_run_id": tracking.start_run(cfg, name, {"sweep": name, "kind": "tune"}),
        }
        _write(sweep_uri, SWEEP_INFO, json.dumps(info, indent=2))
    space = parse_space(info["space"])
    metric, mode, parent = info["metric"], info["mode"], info["parent_run_id"]
    print(f"[tune] sweep {name} at {sweep_uri}; MLflow parent run {parent}", flush=True)

    pbt = info.get("scheduler") == "pbt"
    started = connect(cfg, args.max_concurrent)
    try:
        if pbt:
            trainable = tune.with_resources(
                tune.with_parameters(pbt_trial_fn, data=_pbt_data(cfg)),
                {"CPU": cfg.scaling.cpus_per_worker},
            )
        else:
            trainable = tune.with_resources(trial_fn, {"CPU": TRIAL_CPU})
        param_space = {
            "base": cfg.to_dict(),
            "params": space,
            "sweep": name,
            "parent_run_id": parent,
        }
        if args.resume:
            tuner = tune.Tuner.restore(
                sweep_uri, trainable, resume_errored=True, param_space=param_space
            )
        else:
            scheduler = None
            if args.scheduler == "asha":
                scheduler = tune.schedulers.ASHAScheduler(
                    time_attr="training_iteration",
                    grace_period=args.grace_period,
                    reduction_factor=2,
                    max_t=10**6,
                )
            elif pbt:
                scheduler = tune.schedulers.PopulationBasedTraining(
                    time_attr="training_iteration",
                    perturbation_interval=args.perturbation_interval,
                    hyperparam_mutations={"params": parse_space(info["space"], pbt=True)},
                    quantile_fraction=0.5 if args.num_samples <= 4 else 0.25,
                )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    scheduler=scheduler,
                    num_samples=args.num_samples,
                    max_concurrent_trials=args.max_concurrent,
                ),
                run_config=tune.RunConfig(name=name, **storage_kwargs),
            )
        results = tuner.fit()
        return summarize(cfg, results, name, sweep_uri, metric, mode, parent)
    finally:
        if started:
            ray.shutdown()


def summarize(
    cfg: Config, results, name: str, sweep_uri: str, metric: str, mode: str, parent: str
) -> dict:
    """Print the table, write the best config, log both to the sweep's MLflow run."""
    from pipeline import tracking

    rows = []
    for r in results:
        params = (r.config or {}).get("params", {})
        rows.append(
            {
                "trial": (r.metrics or {}).get("trial_id", "?"),
                **{k: params.get(k) for k in sorted(params)},
                metric: (r.metrics or {}).get(metric),
                "steps": (r.metrics or {}).get("step"),
                "status": "error" if r.error else "ok",
            }
        )
    ok = [r for r in results if r.metrics and r.metrics.get(metric) is not None]
    if not ok:
        tracking.finish_run(cfg, parent, "FAILED")
        raise RuntimeError(f"no trial of sweep {name} reported {metric}")
    best = results.get_best_result(metric=metric, mode=mode, scope="last")
    best_params = best.config["params"]
    best_cfg = apply_params(best.config["base"], best_params)
    tree = best_cfg.to_dict()
    tree["storage"].update(name="", resume=False)  # a new run, not the trial's
    best_yaml = yaml.safe_dump(tree, sort_keys=False)
    trial_run = f"{name}-{best.metrics.get('trial_id')}"
    table = _table(rows)
    _write(sweep_uri, "best_config.yaml", best_yaml)
    _write(sweep_uri, "results.md", table)
    summary = {
        "sweep": name,
        "metric": metric,
        "mode": mode,
        "best_value": best.metrics[metric],
        "best_params": best_params,
        "best_config": f"{sweep_uri}/best_config.yaml",
        "best_run": f"{cfg.storage.resolved_uri().rstrip('/')}/{trial_run}",
        "trials": len(rows),
    }
    try:
        client = tracking._client(cfg)
        client.log_text(parent, table, "results.md")
        client.log_text(parent, best_yaml, "best_config.yaml")
        client.log_metric(parent, f"best/{metric}", float(best.metrics[metric]))
        for key, value in best_params.items():
            client.set_tag(parent, f"best.{key}", str(value))
    except Exception as exc:  # the sweep's results are on disk either way
        print(f"[tune] could not log results to MLflow: {exc}", file=sys.stderr)
    tracking.finish_run(cfg, parent, "FINISHED")
    print(table)
    print(f"[tune] best {metric} = {summary['best_value']:.4f} with {best_params}")
    print(f"[tune] best config: {summary['best_config']}")
    print(f"[tune] best trial's checkpoints: {summary['best_run']}")
    return summary


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.shards import DatasetError
    from pipeline.storage import StorageError

    started = time.time()
    try:
        summary = sweep(args)
    except (ValueError, DatasetError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[tune] {summary['trials']} trials in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    exit_with(main())
