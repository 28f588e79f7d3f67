"""Hyperparameter search over training runs with Ray Tune: the space grammar, the trials
(each a real training run of the same pipeline), the sweep and its summary.

Each ASHA/FIFO trial is a full ``training.train`` run (a TorchTrainer of its own, whose reports
reach Tune through Ray Train's callback). A PBT trial is the training loop in the trial's own
process, so Tune sees its checkpoints and can copy a strong trial into a weak one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import yaml

from pipeline import config as C
from pipeline import overrides, runs, storage, tracking
from pipeline.config import Config
from pipeline.plan import RunPlan, public_config, resolve

SWEEP_INFO = "sweep.json"
# Steps per trial when neither --max-steps nor train.max_steps says: the demo sweep then takes
# minutes on a laptop CPU. Other presets train each trial in full.
TRIAL_STEPS = {"demo": 1000}
DEFAULT_SPACE = ("loss.lambda_cyc=loguniform:1:30", "loss.pool_size=choice:0,10,50,100")
PBT_KEYS = ("loss.lambda_cyc", "loss.lambda_A", "loss.lambda_B", "loss.lambda_identity",
            "loss.lambda_gan", "optim.lr")  # fmt: skip
DEFAULT_PBT_SPACE = ("loss.lambda_cyc=loguniform:1:30", "optim.lr=loguniform:5e-5:5e-4")
TRIAL_CPU = 0.1  # an ASHA trial's own driver only orchestrates its TorchTrainer
KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep searches; the searched part is stored in ``sweep.json`` for a resume."""

    space: tuple[str, ...] = ()
    """``KEY=KIND:ARGS`` items (empty: the default space of the scheduler)."""
    metric: str = "eval/class_iou"
    mode: str = "max"
    scheduler: str = "asha"
    num_samples: int = 4
    max_concurrent: int = 2
    grace_period: int = 2
    perturbation_interval: int = 2
    synch: bool = False
    """PBT: every trial waits at each perturbation point for the others (the same exploit
    decisions on every run, however the trials' speeds differ)."""


def parse_space(items: list[str], pbt: bool = False) -> dict:
    """``KEY=KIND:ARGS`` items as a Tune param space. Kinds: ``loguniform:LO:HI``,
    ``uniform:LO:HI``, ``randint:LO:HI``, ``choice:V1,V2,...``, ``grid:V1,V2,...``; keys are
    those of ``--set`` (``loss.lambda_cyc`` sets both cycle weights) and values are read as
    ``--set`` reads them. With ``pbt``, a grid or choice becomes the list PBT moves along."""
    from ray import tune

    space = {}
    for item in items:
        key, sep, spec = item.partition("=")
        kind, _, args = spec.partition(":")
        if not sep or not kind:
            raise ValueError(f"--space {item!r}: expected section.field=kind:args")
        overrides.check_key(key.strip(), "--space")
        try:
            if kind in ("loguniform", "uniform", "randint"):
                lo, hi = (float(x) for x in args.split(":"))
                fn = {"loguniform": tune.loguniform, "uniform": tune.uniform}.get(kind)
                space[key] = fn(lo, hi) if fn else tune.randint(int(lo), int(hi))
            elif kind in ("choice", "grid"):
                values = [overrides.parse_value(v) for v in args.split(",") if v.strip()]
                if not values:
                    raise ValueError("no values")
                if pbt:
                    space[key] = values
                else:
                    space[key] = (tune.choice if kind == "choice" else tune.grid_search)(values)
            else:
                raise ValueError(f"unknown kind {kind!r} ({', '.join(KINDS)})")
        except ValueError as exc:
            raise ValueError(f"--space {item!r}: {exc}") from None
    return space


def apply_params(base: dict, params: dict) -> Config:
    """The base config tree with one trial's sampled values."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        overrides.set_keys(tree, key, value)
    return C.from_dict(tree)


def check_metric(metric: str, cfg: Config, paired: bool) -> None:
    """Refuse an objective no trial would report, before any trial starts."""
    from cyclegan.train_step import LOSS_NAMES
    from pipeline.scoring import PAIRED_METRICS, UNPAIRED_METRICS

    evals = PAIRED_METRICS if paired else UNPAIRED_METRICS if cfg.train.fid_weights else ()
    known = [f"eval/{m}" for m in evals] + list(LOSS_NAMES)
    if metric in known:
        return
    why = ""
    if metric.startswith("eval/") and not evals:
        why = (
            f" (the dataset {storage.redact(cfg.data.uri)} has no paired test split; set "
            "train.fid_weights to evaluate FID/KID)"
        )
    raise ValueError(f"--metric {metric}: trials do not report it{why}; choose one of {known}")


def check_pbt(cfg: Config, space: list[str]) -> None:
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


# trials


def _trial_plan(config: dict, resume_if_exists: bool) -> RunPlan:
    import ray.tune

    plan: RunPlan = config["plan"]
    name = f"{config['sweep']}-{ray.tune.get_context().get_trial_id()}"
    cfg = apply_params(config["base"], config["params"])
    # A restored sweep re-runs unfinished trials: continue their training runs.
    resume = resume_if_exists and runs.exists(plan.storage_uri, name)
    cfg = C.merge(cfg, {"storage": {"name": name, "resume": resume}})
    return dataclasses.replace(plan.with_config(cfg), sweep_trial=True)


def trial_fn(config: dict) -> None:
    """One ASHA/FIFO trial: a full training run whose reports feed Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.training import train

    plan = _trial_plan(config, resume_if_exists=True)
    train(plan, callbacks=[TuneReportCallback()], parent_run_id=config["parent_run_id"])


def pbt_trial_fn(config: dict, datasets: dict) -> None:
    """One PBT trial: the training loop in this process, reporting checkpoints to Tune; a
    trial restarted from another's checkpoint continues in its own MLflow child run."""
    import ray.tune

    from pipeline.worker import TuneRuntime, train_loop

    plan = _trial_plan(config, resume_if_exists=False)
    cfg = plan.config
    tags = {"mlflow.parentRunId": config["parent_run_id"], "ray.run_name": plan.name}
    run_file = os.path.join(ray.tune.get_context().get_trial_dir(), "mlflow_run_id")
    if os.path.exists(run_file):
        with open(run_file) as f:
            run_id = f.read().strip()
        tracking.reopen_run(cfg, run_id, tags)
    else:
        run_id = tracking.start_run(cfg, plan.name, tags)
        with open(run_file, "w") as f:
            f.write(run_id)
    try:
        train_loop({"plan": dataclasses.replace(plan, run_id=run_id)}, TuneRuntime(datasets))
    except Exception:
        tracking.finish_run(cfg, run_id, "FAILED")
        raise
    tracking.finish_run(cfg, run_id, "FINISHED")


# the sweep


def _tune_storage(storage_uri: str, sweep: str) -> tuple[dict, str]:
    """Tune's RunConfig storage arguments and the sweep's folder URI."""
    root = storage.join(storage_uri, "tune")
    fs, path = storage.resolve(root)
    if storage.is_remote(root):
        return {"storage_path": path, "storage_filesystem": fs}, storage.join(root, sweep)
    os.makedirs(path, exist_ok=True)
    return {"storage_path": os.path.abspath(path)}, os.path.join(os.path.abspath(path), sweep)


def _write(uri: str, name: str, text: str) -> None:
    fs, path = storage.resolve(storage.join(uri, name))
    storage.write_bytes_atomic(fs, path, text.encode())


def _read(uri: str, name: str) -> str | None:
    fs, path = storage.resolve(storage.join(uri, name))
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def _scheduler(settings: SweepSettings, space: list[str]):
    from ray import tune

    if settings.scheduler == "asha":
        return tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            grace_period=settings.grace_period,
            reduction_factor=2,
            max_t=10**6,
        )
    if settings.scheduler == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations={"params": parse_space(space, pbt=True)},
            quantile_fraction=0.5 if settings.num_samples <= 4 else 0.25,
            synch=settings.synch,
        )
    return None


def start_sweep(
    cfg: Config, name: str, settings: SweepSettings, sweep_uri: str, paired: bool
) -> dict:
    """Check everything a sweep needs, open its MLflow parent run and write ``sweep.json``."""
    if _read(sweep_uri, SWEEP_INFO) is not None:
        raise ValueError(f"--name {name}: a sweep of that name exists; use --resume {name}")
    pbt = settings.scheduler == "pbt"
    space = list(settings.space) or list(DEFAULT_PBT_SPACE if pbt else DEFAULT_SPACE)
    parse_space(space)  # bad spaces fail before anything else
    check_metric(settings.metric, cfg, paired)
    if pbt:
        check_pbt(cfg, space)
    info = {
        "base": cfg.to_dict(),
        "settings": {**dataclasses.asdict(settings), "space": space},
        "parent_run_id": tracking.start_run(cfg, name, {"sweep": name, "kind": "tune"}),
    }
    _write(sweep_uri, SWEEP_INFO, json.dumps({**info, "base": public_config(cfg)}, indent=2))
    return info


def sweep(cfg: Config, name: str, settings: SweepSettings, resume: bool = False) -> dict:
    """Run (or, with ``resume``, continue) the sweep ``name`` over ``cfg``; returns the summary."""
    # Long on purpose: the one place a Tuner is built; new and resumed sweeps share every line but three.
    cfg = C.with_defaults(cfg)
    budget = TRIAL_STEPS.get(cfg.preset)
    if budget and not cfg.train.max_steps:
        cfg = C.merge(cfg, {"train": {"max_steps": budget}})
    storage_kwargs, sweep_uri = _tune_storage(cfg.storage.uri, name)
    if resume:
        saved = _read(sweep_uri, SWEEP_INFO)
        if saved is None:
            raise ValueError(f"--resume {name}: no sweep at {storage.redact(sweep_uri)}")
        info = json.loads(saved)
        info["base"] = C.merge(C.from_dict(info["base"]), {"tracking": {"uri": cfg.tracking.uri}})
        info["base"] = info["base"].to_dict()
        settings = SweepSettings(**{**info["settings"], "space": tuple(info["settings"]["space"])})
        base = C.from_dict(info["base"])
        plan = resolve(C.merge(base, {"storage": {"name": name, "resume": True}}))
    else:
        pbt = settings.scheduler == "pbt"
        parse_space(list(settings.space) or list(DEFAULT_PBT_SPACE if pbt else DEFAULT_SPACE))
        # The sweep's name is a folder of its own (tune/NAME), not a run: resolve as a resume.
        plan = resolve(C.merge(cfg, {"storage": {"name": name, "resume": True}}))
        info = start_sweep(cfg, name, settings, sweep_uri, plan.paired)
        base = cfg
    parent, space = info["parent_run_id"], list(info["settings"]["space"])
    print(f"[tune] sweep {name} at {storage.redact(sweep_uri)}; MLflow parent run {parent}")
    import ray  # after the checks: a sweep refused for its flags never waits for Ray's import
    from ray import tune

    from pipeline import ray_cluster

    pbt = settings.scheduler == "pbt"
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + TRIAL_CPU
    started = ray_cluster.connect(cfg, settings.max_concurrent * per_trial, address=plan.address)
    try:
        if pbt:
            from pipeline.reading import build_datasets

            datasets = build_datasets(plan.manifest, base.data, base.train.seed)
            trainable = tune.with_resources(
                tune.with_parameters(pbt_trial_fn, datasets=datasets),
                {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.extra_resources()},
            )
        else:
            trainable = tune.with_resources(trial_fn, {"CPU": TRIAL_CPU})
        param_space = {
            "base": info["base"],
            "params": parse_space(space),
            "sweep": name,
            "parent_run_id": parent,
            "plan": plan,
        }
        if resume:
            tuner = tune.Tuner.restore(
                sweep_uri, trainable, resume_errored=True, param_space=param_space
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=settings.metric,
                    mode=settings.mode,
                    scheduler=_scheduler(settings, space),
                    num_samples=settings.num_samples,
                    max_concurrent_trials=settings.max_concurrent,
                ),
                run_config=tune.RunConfig(name=name, **storage_kwargs),
            )
        with storage.credentials_hidden():
            results = tuner.fit()
        return summarize(base, results, name, sweep_uri, settings, parent)
    finally:
        if started:
            ray.shutdown()


def summarize(
    cfg: Config, results, name: str, sweep_uri: str, settings: SweepSettings, parent: str
) -> dict:
    """Print the table, write the best config, log both to the sweep's MLflow run."""
    metric, mode = settings.metric, settings.mode
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
    tree = public_config(apply_params(best.config["base"], best_params))
    tree["storage"].update(name="", resume=False)  # a new run, not the trial's
    best_yaml = yaml.safe_dump(tree, sort_keys=False)
    table = markdown_table(rows)
    _write(sweep_uri, "best_config.yaml", best_yaml)
    _write(sweep_uri, "results.md", table)
    summary = {
        "sweep": name,
        "metric": metric,
        "mode": mode,
        "best_value": best.metrics[metric],
        "best_params": best_params,
        "best_config": f"{storage.redact(sweep_uri)}/best_config.yaml",
        "best_run": storage.redact(
            storage.join(cfg.storage.uri, f"{name}-{best.metrics.get('trial_id')}")
        ),
        "trials": len(rows),
        "table": table,
    }
    tracking.log_summary(
        cfg,
        parent,
        {"results.md": table, "best_config.yaml": best_yaml},
        {f"best/{metric}": float(best.metrics[metric])},
        {f"best.{k}": str(v) for k, v in best_params.items()},
        "tune",
    )
    tracking.finish_run(cfg, parent, "FINISHED")
    return summary


def markdown_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"
