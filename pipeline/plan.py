"""A training run resolved on the driver: the one ``RunPlan`` handed to workers and trials.

``resolve(cfg)`` turns a config into absolute URIs, reads the dataset's manifest once (counts,
pairing), checks what can be checked before Ray starts, and decides the run name and the
threads per worker. Nothing downstream reads the environment or the manifest for these again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import pyarrow.compute as pc

from cyclegan.config import AugmentConfig
from pipeline import config as C
from pipeline import runs, storage
from pipeline.config import Config
from pipeline.ray_cluster import LOCAL
from pipeline.shards import Manifest, read_columns, read_manifest


@dataclass(frozen=True)
class RunPlan:
    """Everything a worker needs to know about its run, decided once."""

    config: Config
    """The run's config: data, storage and tracking URIs absolute, run name set."""
    counts: dict[str, int]
    """Training images per domain, from the manifest."""
    paired: bool
    """The dataset has a paired test split (testA/testB of the same scenes): label scores."""
    threads_per_worker: int
    """torch threads of each training worker."""
    address: str
    """The Ray cluster to join (empty: start a local one)."""
    run_id: str = ""
    """The MLflow run, once the driver has created (or reopened) it."""
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    """The dataset's manifest as read by the driver."""
    started_at: float = 0.0
    """When the run was asked for (epoch seconds): the command's process start, or the call
    of ``train``; the start-up timeline counts from here."""
    sweep_trial: bool = False
    """The run is one trial of a sweep: its scheduler may stop it at any report, and Tune then
    ends its processes without the loop's ``finally``, so rank 0 sends the MLflow writes queued
    so far before each report."""
    startup: dict[str, float] = field(default_factory=dict, compare=False)
    """The driver's start-up milestones (seconds after ``started_at``); rank 0 logs them with
    its own as ``startup/*`` metrics."""

    @property
    def name(self) -> str:
        return self.config.storage.name

    @property
    def data_uri(self) -> str:
        return self.config.data.uri

    @property
    def storage_uri(self) -> str:
        return self.config.storage.uri

    @property
    def tracking_uri(self) -> str:
        return self.config.tracking.uri

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_uri, self.name)

    def mark(self, milestone: str) -> None:
        """Record that the driver reached ``milestone`` now (see ``startup``)."""
        if self.started_at:
            self.startup[milestone] = round(time.time() - self.started_at, 3)

    def with_config(self, cfg: Config) -> RunPlan:
        """The same run facts with another config (a trial's sampled values, its name)."""
        return dataclasses.replace(self, config=cfg)

    def public_dict(self) -> dict:
        """The plan as printed and logged: the config with credentials in URIs masked."""
        return {
            "config": public_config(self.config),
            "run": {
                "counts": dict(self.counts),
                "paired_test": self.paired,
                "threads_per_worker": self.threads_per_worker,
                "ray_address": storage.redact(self.address) or "(a local Ray started here)",
            },
        }


def public_config(cfg: Config) -> dict:
    """``cfg.to_dict()`` with user-info and secret parameters of every string masked: the one
    form of a config that is printed, logged to MLflow, or written to a file."""

    def mask(tree):
        if isinstance(tree, dict):
            return {k: mask(v) for k, v in tree.items()}
        return storage.redact(tree) if isinstance(tree, str) else tree

    return mask(cfg.to_dict())


def check_fid_weights(cfg: Config) -> None:
    """A ``train.fid_weights`` file must hold an Inception v3 the evaluation can use: found
    before training starts, not at its first evaluation."""
    weights = cfg.train.fid_weights
    if not weights or weights == "download":
        return
    from cyclegan.metrics import read_inception_weights  # torchvision: only when needed

    if not os.path.isfile(weights):
        raise ValueError(
            f"train.fid_weights: {weights} is not a file (pt_inception-2015-12-05-*.pth, "
            "a torchvision inception_v3 state dict, or 'download' for the FID network's weights)"
        )
    try:
        read_inception_weights(weights)
    except ValueError as exc:
        raise ValueError(f"train.fid_weights: {exc}") from None


def check_dataset(manifest: Manifest, cfg: AugmentConfig) -> dict[str, int]:
    """Image counts of trainA/trainB; raises naming the dataset when one is missing or empty,
    or when the crop does not fit the stored images."""
    counts = {}
    for domain in ("A", "B"):
        name = f"train{domain}"
        if name not in manifest.datasets:
            raise ValueError(
                f"dataset {manifest.root}: no {name} (has {', '.join(sorted(manifest.datasets))})"
            )
        counts[domain] = manifest.count(name)
        if counts[domain] == 0:
            raise ValueError(f"dataset {manifest.root}: {name} has zero images")
        if cfg.preprocess in ("crop", "none"):
            table = read_columns(manifest, name, ["width", "height"])
            smallest = min(pc.min(table["width"]).as_py(), pc.min(table["height"]).as_py())
            if cfg.preprocess == "crop" and smallest < cfg.crop_size:
                raise ValueError(
                    f"data.crop_size: {cfg.crop_size} is larger than the smallest side "
                    f"({smallest} px) of the images in {manifest.root}/{name}"
                )
    return counts


def resolve(cfg: Config) -> RunPlan:
    """The run of ``cfg``; raises with the field, file or URI named when it cannot run."""
    cfg = C.with_defaults(cfg)
    address = cfg.scaling.address or os.environ.get("RAY_ADDRESS", "")
    name = cfg.storage.name or runs.new_run_name(cfg.preset)
    cfg = C.merge(cfg, {"storage": {"name": name}})
    if not cfg.storage.resume and runs.exists(cfg.storage.uri, name):
        raise ValueError(
            f"--name {name}: a run of that name exists under {storage.redact(cfg.storage.uri)}; "
            f"continue it with --resume {name} or choose another name"
        )
    check_fid_weights(cfg)
    # Fail on a bad dataset or an unreachable store before any Ray start-up.
    for uri, write in ((cfg.data.uri, False), (cfg.storage.uri, True)):
        if storage.is_remote(uri):
            storage.check_access(uri, write)
    manifest = read_manifest(cfg.data.uri)
    counts = check_dataset(manifest, cfg.data)
    workers = cfg.scaling.num_workers
    for domain, count in counts.items():
        if count < workers:
            raise ValueError(
                f"dataset {storage.redact(cfg.data.uri)}: train{domain} has {count} image(s), "
                f"fewer than the {workers} training workers (scaling.num_workers); every worker "
                "needs at least one image of each domain"
            )
    cores = os.cpu_count() or 1
    # A local Ray is ours alone: split the cores among the workers. On a cluster each worker
    # gets the CPUs it reserved.
    private = not address or address == LOCAL
    threads = cores // cfg.scaling.num_workers if private else int(cfg.scaling.cpus_per_worker)
    return RunPlan(
        config=cfg,
        counts=counts,
        paired=manifest.paired_test and {"testA", "testB"} <= set(manifest.datasets),
        threads_per_worker=max(1, threads),
        address=address,
        manifest=manifest,
    )
