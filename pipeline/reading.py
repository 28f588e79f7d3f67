"""The Ray Data side of the data path: each domain's training images as a streaming dataset
(read from the shards or from a cache in the object store, then decoded and resized by Ray Data
tasks), and the settings of Ray Data's executor for those datasets.

It imports no torch: Ray Data's coordinators and the dataset manager of Ray Train load this
module to run the datasets it makes, and torch's import would cost each of those processes
about 1.5 s of CPU and 200 MB (the decode tasks load torch only where an image needs resizing).
The training worker's side (crop, flip, batches in lockstep) is :mod:`pipeline.data`.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from cyclegan.config import AugmentConfig, load_size
from pipeline.images import BadImage, decode_resized
from pipeline.shards import Manifest, read_columns

log = logging.getLogger(__name__)

DOMAINS = ("A", "B")


def train_name(domain: str) -> str:
    return f"train{domain}"


def decode_resize_batch(batch: dict[str, np.ndarray], cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: encoded bytes -> resized HxWx3 uint8 arrays. A row that fails to decode is
    dropped with a warning naming its key, never crashing the task."""
    images, keys = [], []
    for key, data in zip(batch["key"], batch["image"], strict=True):
        try:
            img = decode_resized(bytes(data), str(key), load_size(cfg))
        except BadImage as exc:
            log.warning("skipping unreadable image %s: %s", key, exc.reason)
            continue
        images.append(img)
        keys.append(str(key))
    if images and len({im.shape for im in images}) == 1:
        stacked = np.stack(images)
    else:
        stacked = np.empty(len(images), dtype=object)
        stacked[:] = images
    return {"key": np.array(keys, dtype=object), "image": stacked}


@contextlib.contextmanager
def _data_context():
    """Ray Data's settings for the datasets made in the block.

    Per-operator resource reservation is off: with it on, Ray Data keeps the decode step of a
    small pipeline to about one task at a time (measured: one decode worker busy of two, and
    the pass ~25% slower on 2 CPUs). Memory stays bounded by the object-store budget."""
    context = ray.data.DataContext.get_current()
    saved = context.op_resource_reservation_enabled, context.custom_execution_callback_classes
    context.op_resource_reservation_enabled = False
    # A new list: the datasets keep a copy of the context that shares it.
    context.custom_execution_callback_classes = [*saved[1], PacedScheduling]
    try:
        yield
    finally:
        context.op_resource_reservation_enabled, context.custom_execution_callback_classes = saved


class PacedScheduling(ExecutionCallback):
    """At most one step of Ray Data's scheduling loop every ``MIN_STEP_S``.

    The loop waits for a task to finish only while tasks run; when the pipeline is held back
    (its output buffer full, the trainer slower than decoding) it runs no task and spins,
    taking most of a core in the process that runs it (the split coordinator that feeds the
    training workers): measured on 2 cores at 32 px, the coordinator used 57% of a core and
    the training worker got 1.24 cores of 2. A few milliseconds between idle steps are
    nothing next to a train step."""

    MIN_STEP_S = 0.02

    def __init__(self) -> None:
        self._last = 0.0

    def on_execution_step(self, executor) -> None:
        wait = self.MIN_STEP_S - (time.perf_counter() - self._last)
        if wait > 0:
            time.sleep(wait)
        self._last = time.perf_counter()


DECODE_CPUS = 0.5
"""CPUs each decode task asks for: training workers must leave at least this much free."""

CACHE_BLOCK_ROWS = 256
"""Rows per cached block: small enough that a pass decodes on several CPUs at once."""


def domain_dataset(
    manifest: Manifest, domain: str, cfg: AugmentConfig, seed: int, cache: bool = False
) -> ray.data.Dataset:
    """A streaming Ray Dataset of one domain's training images, decoded and resized.

    With ``cache`` the encoded rows are read once into Ray's object store, in blocks of
    ``CACHE_BLOCK_ROWS``; every pass then starts from there instead of listing and reading the
    shards again, which for a small dataset costs more than decoding it.
    """
    name = train_name(domain)
    with _data_context():
        if cache:
            # Read here with pyarrow and put into the object store in shard order, so a seed
            # reproduces the passes. No Ray tasks: for a dataset this small, starting read tasks
            # would take longer than the read (measured: 3-4 s per domain against milliseconds).
            table = read_columns(manifest, name, ["key", "image"])
            ds = ray.data.from_arrow(
                [
                    table.slice(start, CACHE_BLOCK_ROWS)
                    for start in range(0, max(table.num_rows, 1), CACHE_BLOCK_ROWS)
                ]
            )
        else:
            ds = ray.data.read_parquet(
                manifest.shard_paths(name), filesystem=manifest.filesystem, num_cpus=0.25
            ).select_columns(["key", "image"])
        return ds.randomize_block_order(seed=seed).map_batches(
            decode_resize_batch,
            fn_kwargs={"cfg": cfg},
            batch_format="numpy",
            batch_size=16,
            num_cpus=DECODE_CPUS,
        )


def use_cache(manifest: Manifest, cache_mb: int) -> bool:
    """Whether both training domains fit the cache budget of ``cache_mb`` MiB."""
    size = sum(manifest.datasets.get(train_name(d), {}).get("bytes", 0) for d in DOMAINS)
    return cache_mb > 0 and size <= cache_mb * 2**20


def build_datasets(manifest: Manifest, cfg, seed: int) -> dict:
    """``{"A": ds, "B": ds}`` for TorchTrainer(datasets=...) from a checked manifest; ``cfg`` is
    a DataConfig (its ``cache_mb`` decides whether the encoded rows are cached)."""
    cache = use_cache(manifest, cfg.cache_mb)
    return {d: domain_dataset(manifest, d, cfg, seed + i, cache) for i, d in enumerate(DOMAINS)}
