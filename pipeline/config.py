"""The one typed config tree of a training run, its presets, and its file/CLI overrides.

A config is built from a preset function (``demo()``, ``paper()``, ...), then a config file
(YAML or JSON, the same tree), then ``--set section.field=value`` overrides, then the CLI's
first-class flags. Every section validates itself when built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cyclegan.config import (
    AugmentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    _check,
    _check_finite,
    _check_range,
)

MAX_WORKERS = 4096
MAX_BATCH = 4096
MAX_CPUS_PER_WORKER = 1024
MAX_PLACEMENT_TIMEOUT_S = 7 * 24 * 3600.0
RESOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
"""A run name: letters, digits, ``-_.``, no leading dot, at most 128 characters (a folder name
on every store, never a path)."""


def home() -> str:
    """Where the embedded defaults live (absolute): ``$CYCLEGAN_HOME`` or ``./runs``."""
    return os.path.abspath(os.environ.get("CYCLEGAN_HOME", "runs"))


def default_data_uri() -> str:
    """The built-in scenes dataset under the home."""
    return os.path.join(home(), "data", "scenes")


def default_storage_uri() -> str:
    """Where run folders go when ``storage.uri`` is empty."""
    return os.path.join(home(), "checkpoints")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store in the home."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(home(), "mlflow.db")
    return without_credentials(uri)


@dataclass
class DataConfig(AugmentConfig):
    """Where the shards are and how batches are formed (plus the preprocessing fields)."""

    uri: str = ""
    """Dataset root written by pipeline.prepare / pipeline.synth (empty: the built-in scenes)."""
    batch_size: int = 1
    """Images per domain per worker per step (1 to 4096; the paper uses 1)."""
    shuffle_buffer: int = 64
    """Rows of the local shuffle buffer on each worker (0 disables it)."""
    num_samples: int = 4
    """Held-out test images per domain shown in the sample grids."""
    deterministic: bool = True
    """Keep Ray Data's row order so a seed reproduces the batches (1 worker)."""
    cache_mb: int = 1024
    """Keep the encoded training images in Ray's object store when trainA and trainB together
    hold at most this many MiB: passes after the first skip listing and reading the shards
    (0: always stream from storage)."""
    read_timeout_s: float = 600.0
    """A training worker that receives no image of a domain for this long stops the run with an
    error naming the domain, instead of waiting forever (0: wait forever)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self.batch_size, 1, MAX_BATCH, "data.batch_size")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _check(self.num_samples >= 1, "data.num_samples", "must be >= 1")
        _check(self.cache_mb >= 0, "data.cache_mb", "must be >= 0")
        _check(
            math.isfinite(self.read_timeout_s) and self.read_timeout_s >= 0,
            "data.read_timeout_s",
            "must be a number >= 0",
        )


@dataclass
class TrainConfig:
    """The training loop: length, seeds, intervals, numerics."""

    max_steps: int = 0
    """Stop after this many steps (0: run all epochs of optim.n_epochs + n_epochs_decay)."""
    seed: int = 0
    """Seed of weights, pools, augmentation and shuffling."""
    log_every: int = 50
    """Steps between metric logs."""
    sample_every: int = 500
    """Steps between sample grids."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is also written at each epoch end)."""
    num_to_keep: int = 3
    """Checkpoints kept by Ray Train (older ones are deleted)."""
    precision: str = "auto"
    """fp32, bf16 (autocast) or auto (bf16 on CUDA and on CPUs with AMX/AVX512-BF16)."""
    channels_last: bool = False
    """Run the nets in channels_last memory format."""
    compile: bool = False
    """Wrap the nets in torch.compile."""
    eval_every: int = 0
    """Steps between evaluations (0: at each epoch end). Data with a paired test split gets the
    label scores; other data gets FID/KID when ``fid_weights`` is set."""
    eval_limit: int = 50
    """Test images (pairs) scored per evaluation."""
    fid_weights: str = ""
    """Inception weights for FID/KID during training on data without a paired test split: the
    standard FID network's ``pt_inception-2015-12-05-*.pth`` (published-comparable scores) or a
    torchvision ``inception_v3`` state dict; ``download`` fetches the standard ones once;
    empty: no evaluation on such data."""
    on_nonfinite: str = "stop"
    """What a NaN/Inf loss does: stop (the run fails naming the step) or skip (step discarded)."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.eval_limit >= 1, "train.eval_limit", "must be >= 1")
        for name in ("log_every", "sample_every", "checkpoint_every", "num_to_keep"):
            _check(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _check(
            self.precision in ("auto", "fp32", "bf16"), "train.precision", "use auto, fp32 or bf16"
        )
        _check(self.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", "use stop or skip")


@dataclass
class ScalingConfig:
    """How many Ray Train workers and what each one gets."""

    num_workers: int = 1
    """Training workers (DDP ranks, 1 to 4096); each gets one GPU when use_gpu."""
    use_gpu: bool | None = None
    """Train on GPUs (None: when the cluster has them)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker (> 0, at most 1024); the rest of the cluster decodes
    data."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    worker_resources: str = ""
    """Further Ray resources each training worker needs, ``NAME=AMOUNT[,NAME=AMOUNT...]``: a
    custom resource that only some nodes declare (``ray start --resources``) places the
    workers on those nodes."""
    address: str = ""
    """Ray cluster address (empty: $RAY_ADDRESS, else a local Ray started in-process)."""
    idle_helpers: bool = False
    """On a Ray the run starts for itself, put Ray's own processes (services, helper actors,
    data tasks) in Linux's idle scheduling class, so they never preempt the training step
    (see ``pipeline.cpu_priority``); no effect on a cluster the run joins. Off by default:
    measured on 2 cores at 32 px, its gain with the raylet at normal priority was within the
    machine's noise (with the raylet idle too it was larger, but new workers were born idle)."""
    placement_timeout_s: float = 300.0
    """On a remote cluster, how long to wait for an autoscaler to add the nodes workers need
    (0 to 604800 s, a week)."""

    def __post_init__(self) -> None:
        _check_finite(self, "scaling")
        _check_range(self.num_workers, 1, MAX_WORKERS, "scaling.num_workers")
        _check(
            0 < self.cpus_per_worker <= MAX_CPUS_PER_WORKER,
            "scaling.cpus_per_worker",
            f"must be > 0 and <= {MAX_CPUS_PER_WORKER}, got {self.cpus_per_worker}",
        )
        _check_range(
            self.placement_timeout_s, 0, MAX_PLACEMENT_TIMEOUT_S, "scaling.placement_timeout_s"
        )
        _check(self.max_failures >= -1, "scaling.max_failures", "must be >= -1 (-1: unlimited)")
        self.extra_resources()  # raises naming the field

    def extra_resources(self) -> dict[str, float]:
        """``worker_resources`` as a dict; raises naming the field when it does not parse."""
        out: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in self.worker_resources.split(","))):
            name, eq, amount = item.partition("=")
            try:
                value = float(amount) if eq else math.nan
            except ValueError:
                value = math.nan
            _check(
                bool(RESOURCE_NAME.fullmatch(name.strip())) and 0 < value < math.inf,
                "scaling.worker_resources",
                f"{item!r} is not NAME=AMOUNT (a resource name and a positive number)",
            )
            _check(
                name.strip() not in ("CPU", "GPU", "memory"),
                "scaling.worker_resources",
                f"{name.strip()} is set by scaling.cpus_per_worker / scaling.use_gpu",
            )
            out[name.strip()] = value
        return out


@dataclass
class StorageConfig:
    """Where Ray Train keeps the run folders and their checkpoints."""

    uri: str = ""
    """Local folder or s3:// / gs:// URI (empty: $CYCLEGAN_HOME/checkpoints)."""
    name: str = ""
    """Run name: letters, digits and ``-_.``, no leading dot, at most 128 characters (empty: a
    new unique name)."""
    resume: bool = False
    """Continue the run called `name` from its latest checkpoint."""

    def __post_init__(self) -> None:
        _check(
            not self.name or RUN_NAME.fullmatch(self.name) is not None,
            "storage.name",
            f"{self.name!r} is not a run name (letters, digits and -_. only, no leading dot, "
            "at most 128 characters)",
        )


@dataclass
class TrackingConfig:
    """MLflow tracking."""

    uri: str = ""
    """Tracking URI (empty: $MLFLOW_TRACKING_URI, else SQLite in $CYCLEGAN_HOME/mlflow.db)."""
    experiment: str = "cyclegan"
    """MLflow experiment name."""
    register: str = ""
    """Register the final generators under this model name (empty: do not register)."""
    system_metrics: bool = True
    """Log CPU/memory/GPU use of the driver and rank 0."""
    log_model: bool = True
    """Log the final generators as an MLflow model."""


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preset: str = "paper"
    """Name of the preset this config started from."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def without_credentials(uri: str) -> str:
    """``uri`` without a user and password (``http://user:pass@host`` -> ``http://host``); they
    go to ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` of this process, where
    MLflow reads them (set ones win), so no config, param, file or Ray job ever holds them."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme not in ("http", "https"):
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if user:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def with_defaults(cfg: Config) -> Config:
    """``cfg`` with every empty URI replaced by its embedded default, made absolute: the one
    place the environment (``$CYCLEGAN_HOME``, ``$MLFLOW_TRACKING_URI``) is read for a run."""

    def local_abs(uri: str) -> str:
        return uri if "://" in uri else os.path.abspath(uri)

    tracking = without_credentials(cfg.tracking.uri or default_tracking_uri())

    return merge(
        cfg,
        {
            "data": {"uri": local_abs(cfg.data.uri or default_data_uri())},
            "storage": {"uri": local_abs(cfg.storage.uri or default_storage_uri())},
            "tracking": {"uri": tracking},
        },
    )


# presets


def paper() -> Config:
    """The paper's 256 px settings: 9 blocks, ngf/ndf 64, lsgan, lambda 10, pool 50, 100+100 epochs."""
    return Config(preset="paper")


def paper128() -> Config:
    """The paper's 128 px (Cityscapes-style) settings: 6 residual blocks."""
    cfg = Config(preset="paper128")
    cfg.model.n_blocks = 6
    cfg.data = DataConfig(load_size=143, crop_size=128)
    return cfg


def demo() -> Config:
    """The built-in scenes at 64 px with a small generator: a few minutes on a laptop CPU."""
    return Config(
        model=ModelConfig(ngf=32, ndf=32, n_blocks=6),
        optim=OptimConfig(n_epochs=3, n_epochs_decay=2),
        data=DataConfig(load_size=72, crop_size=64, batch_size=1, num_samples=4),
        train=TrainConfig(log_every=25, sample_every=250, checkpoint_every=500),
        preset="demo",
    )


def tiny() -> Config:
    """A few seconds of training at 32 px: for tests and smoke runs."""
    return Config(
        model=ModelConfig(ngf=8, ndf=8, n_blocks=1, n_layers_D=2),
        optim=OptimConfig(n_epochs=1, n_epochs_decay=1),
        data=DataConfig(load_size=36, crop_size=32, shuffle_buffer=8, num_samples=2),
        train=TrainConfig(log_every=2, sample_every=4, checkpoint_every=5, precision="fp32"),
        tracking=TrackingConfig(system_metrics=False),
        preset="tiny",
    )


PRESETS = {"demo": demo, "paper": paper, "paper128": paper128, "tiny": tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# building from dicts, files and overrides


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, tp, where: str):
    """``value`` as type ``tp`` (bool, int, float, str, or one of those or None)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto")):
            return None
        tp = args[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        return str(value)
    raise TypeError(f"{where}: unsupported field type {tp}")


def _section_dict(section, values: dict, name: str):
    """A copy of dataclass instance ``section`` with ``values`` applied, validated."""
    types_ = _field_types(type(section))
    current = dataclasses.asdict(section)
    for key, value in values.items():
        if key not in types_:
            raise ValueError(
                f"unknown key {name}.{key}; valid keys of {name}: {', '.join(sorted(types_))}"
            )
        current[key] = _coerce(value, types_[key], f"{name}.{key}")
    return type(section)(**current)


def merge(cfg: Config, tree: dict) -> Config:
    """``cfg`` with the nested dict ``tree`` applied (unknown sections/keys raise)."""
    sections = {f.name for f in dataclasses.fields(Config) if f.name != "preset"}
    out = dataclasses.replace(cfg)
    for name, values in tree.items():
        if name == "preset":
            continue
        if name not in sections:
            raise ValueError(
                f"unknown config section {name!r}; valid sections: {', '.join(sorted(sections))}"
            )
        if not isinstance(values, dict):
            raise ValueError(
                f"config section {name!r} must be a mapping, got {type(values).__name__}"
            )
        setattr(out, name, _section_dict(getattr(out, name), values, name))
    return out


def from_dict(tree: dict) -> Config:
    """Rebuild a config from ``to_dict()`` output (its preset first, then every value)."""
    return merge(preset(tree.get("preset", "paper")), tree)


def load_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON config file as a nested dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        text = path.read_text()
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(
            f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path}: top level must be a mapping of sections")
    return tree
