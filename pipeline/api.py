"""The Python API: what the commands do, as functions that return results.

    from pipeline.api import train, translate, evaluate, load_generator

    run = train(preset="tiny", data="runs/data/scenes", max_steps=200,
                set={"loss.lambda_cyc": 5.0})
    print(run.name, run.run_id, run.checkpoint_path, run.metrics["loss/G"])
    out = translate(run.name, "photos/", "out/", direction="BtoA")
    scores = evaluate(run.name)["metrics"]
    G = load_generator(run.name, "AtoB")          # a torch module in eval mode

Every keyword is the command's flag of the same name (``max_steps`` is ``--max-steps``), and
the commands call these same functions, so a run started either way is the same run. Errors
are the commands' errors: ``ValueError`` (and its kin) name the bad flag, key or file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.flags import (
    add_config_flags,
    arch_from_flags,
    build_config,
    for_runs_of,
    load_config,
)

if TYPE_CHECKING:
    from torch import nn

    from pipeline.training import TrainResult


def config_namespace(options: Mapping[str, Any], **extra_flags: Any) -> argparse.Namespace:
    """The namespace the config flags would give, with ``options`` set (``set`` as a mapping
    of keys to values or a list of ``KEY=VALUE``); unknown options raise naming them."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    for flag, default in {"name": None, "resume": None, "register": None, **extra_flags}.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=default)
    args = parser.parse_args([])
    for key, value in options.items():
        if not hasattr(args, key):
            valid = ", ".join(sorted(vars(args)))
            raise TypeError(f"unknown option {key!r}; options: {valid}")
        if key == "set":
            value = _set_list(value)
        setattr(args, key, value)
    return args


def _set_list(value: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{k}={_text(v)}" for k, v in value.items()]
    if isinstance(value, str):
        return [value]
    return list(value)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


# training


def train(**options: Any) -> TrainResult:
    """Train (or with ``resume=NAME`` continue) a run; options as ``python -m pipeline.train``.
    Returns the run's name, MLflow run id, final checkpoint, step and last metrics."""
    return train_from_args(config_namespace(options))


def process_started_at() -> float:
    """When this process started (epoch seconds)."""
    import psutil  # Ray's own dependency

    return psutil.Process().create_time()


def train_from_args(args: argparse.Namespace) -> TrainResult:
    from pipeline import console
    from pipeline.plan import resolve
    from pipeline.training import train as train_plan

    console.quiet_ray(args.verbose)
    plan = resolve(load_config(args))
    # From the command's start: Python's and the imports' start-up count too.
    return train_plan(dataclasses.replace(plan, started_at=process_started_at()))


def tune(space: Iterable[str], **options: Any) -> dict:
    """A sweep over ``space`` (``["loss.lambda_cyc=grid:5,10", ...]``, as ``--space``); other
    options as ``python -m pipeline.tune``. Returns the summary: ``best_params``,
    ``best_value``, ``metric``, ``best_config``, ``best_run``, ``trials`` and the ``table``."""
    from pipeline.search import SweepSettings

    defaults = {f.name: f.default for f in SweepSettings.__dataclass_fields__.values()}
    settings = {k: options.pop(k) for k in list(options) if k in defaults and k != "space"}
    args = config_namespace(options)
    return tune_from_args(args, SweepSettings(space=tuple(space), **settings))


def tune_from_args(args: argparse.Namespace, settings) -> dict:
    from pipeline import console, runs
    from pipeline.search import sweep

    console.quiet_ray(args.verbose)
    name = args.resume or args.name or runs.new_run_name("tune")
    return sweep(build_config(for_runs_of(args)), name, settings, bool(args.resume))


# using a trained model


def translate(model: str, input: str, output: str, direction: str = "AtoB", **options: Any) -> dict:
    """Translate every image under ``input`` into ``output`` with ``model`` (a run name, a
    checkpoint, ``runs:/``, ``models:/`` or an official ``.pth``); options as
    ``python -m pipeline.translate`` (``batch_size``, ``load_size``, ``num_actors``, ``format``,
    ``overwrite``, ``address``, ...). Returns the keys written, failures, images/s."""
    import ray

    from pipeline import ray_cluster
    from pipeline.config import Config
    from pipeline.translation import list_inputs
    from pipeline.translation import translate as translate_images

    address = options.pop("address", None)
    arch = options.pop("arch", None)
    options.setdefault("fmt", options.pop("format", "same"))
    list_inputs(input, direction, options.get("split"))  # fails in a second on a typo
    started_here = ray_cluster.connect(Config(), address=address)
    try:
        return translate_images(model, direction, input, output, arch=arch, **options)
    finally:
        if started_here:
            ray.shutdown()


def evaluate(model: str, data: str | None = None, **options: Any) -> dict:
    """Score ``model`` on ``data``'s test split (default: the data it was trained on): label
    scores on paired data, FID/KID otherwise; options as ``python -m pipeline.evaluate``
    (``split``, ``size``, ``fid_weights``, ``limit``, ``direction``, ``out``, ...). Returns
    ``metrics``, image counts and ``report`` (the folder of index.html)."""
    args = argparse.Namespace(
        model=model, data=data, **{**EVALUATE_DEFAULTS, **_known(options, EVALUATE_DEFAULTS)}
    )
    result, _, out = evaluate_from_args(args)
    return {**result, "report": out}


EVALUATE_DEFAULTS = {
    "split": "test", "size": None, "fid_weights": None, "limit": None, "out": None,
    "storage": None, "direction": None, "batch_size": 8, "mlflow_run": None,
    "trust_pickle": False, "ngf": None, "n_blocks": None, "norm": None,
}  # fmt: skip


def _known(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; options: {', '.join(defaults)}")
    return dict(options)


def evaluate_from_args(args: argparse.Namespace) -> tuple[dict, dict, str]:
    """Load the generators, score them and write the report: (result, model info, out dir)."""
    import torch

    from pipeline import config as C
    from pipeline.eval_report import evaluate as score
    from pipeline.models import load_generators
    from pipeline.storage import redact

    arch = arch_from_flags(args)
    directions = [args.direction] if args.direction else ["AtoB", "BtoA"]
    nets, _, info = load_generators(
        args.model, directions, storage=args.storage, arch=arch, trust_pickle=args.trust_pickle
    )
    if args.size is not None and args.size < 0:
        raise ValueError(f"--size: must be >= 0, got {args.size}")
    size = (args.size or None) if args.size is not None else info.get("crop_size")
    data_uri = args.data or _trained_on(info)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = {d: n.to(device) for d, n in nets.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(C.home(), "eval", f"{report_name(info)}-{stamp}")
    print(
        f"[evaluate] {', '.join(nets)} of {args.model} ({info['kind']}, "
        f"step {info.get('step') or 0}) on {redact(data_uri)} {args.split}, "
        f"size {size or 'as stored'}, device {device}",
        flush=True,
    )
    description = {
        "model": args.model,
        "kind": info["kind"],
        "step": info.get("step"),
        "mlflow_run_id": args.mlflow_run or info.get("mlflow_run_id"),
    }
    result = score(
        nets,
        data_uri,
        split=args.split,
        size=size,
        fid_weights=args.fid_weights,
        limit=args.limit,
        batch_size=args.batch_size,
        out_dir=out,
        description=description,
    )
    return result, info, out


def report_name(info: dict) -> str:
    """A short folder name for a model: run name and step, MLflow run id, or file stem."""
    import re

    if info["kind"] == "mlflow":
        name = f"mlflow-{(info.get('mlflow_run_id') or 'model')[:12]}"
    else:
        parts = [p for p in re.split(r"[/\\]", str(info["path"])) if p]
        if info["kind"] == "checkpoint" and len(parts) >= 3:
            run = parts[-3] if parts[-2].startswith("checkpoint_") else parts[-2]
            name = f"{run}-step{info.get('step') or 0}"
        else:
            name = os.path.splitext(parts[-1])[0] if parts else "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _trained_on(info: dict) -> str:
    from pipeline import config as C

    uri = ((info.get("config") or {}).get("data") or {}).get("uri") or ""
    return uri or C.default_data_uri()


def load_generator(source: str, direction: str = "AtoB", **options: Any) -> nn.Module:
    """The generator of ``source`` (what ``translate`` accepts) that translates ``direction``,
    in eval mode on the CPU: ``G(x)`` maps NCHW images in [-1, 1] to the other domain.
    Options: ``storage``, ``tracking_uri``, ``trust_pickle``, ``arch``."""
    from pipeline.models import load_generator as load

    net, _, _ = load(source, direction, **options)
    return net
