"""The data path: Ray Data decode + augment against a DataLoader baseline on the same JPEG
shards, each measurement in a fresh process pinned to N CPUs."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time

import torch

from pipeline import config as C
from pipeline.bench.common import in_fresh_process, summarize


def make_jpeg_dataset(root: str, count: int, size: int, seed: int = 0) -> str:
    """Rendered scene photos as JPEG shards (dataset trainA) under ``root``; reused if there."""
    from PIL import Image

    from pipeline.images import encode_image
    from pipeline.scenes import render_scene
    from pipeline.shards import (
        DatasetError,
        ShardWriter,
        build_manifest,
        read_manifest,
        remove_unlisted_shards,
        start_dataset,
        write_manifest,
    )
    from pipeline.storage import StorageError

    source = f"bench:scenes-jpeg size={size} count={count} seed={seed}"
    with contextlib.suppress(DatasetError, StorageError):
        if read_manifest(root).source == source:
            return root
    generation = start_dataset(root, overwrite=True)
    with ShardWriter(root, "trainA", generation=generation) as writer:
        for i in range(count):
            photo = Image.fromarray(render_scene(i, size, seed)[1])
            writer.add(f"{i:06d}.jpg", encode_image(photo, "JPEG"), size, size, "JPEG")
        entry = writer.close()
    manifest = build_manifest(source, {"trainA": entry})
    write_manifest(root, manifest)
    remove_unlisted_shards(root, manifest)
    return root


class ParquetJpegs(torch.utils.data.Dataset):
    """The baseline's dataset: the same shards, read with pyarrow, decoded with PIL."""

    def __init__(self, paths: list[str], transform):
        import pyarrow.parquet as pq

        self.paths, self.transform = paths, transform
        self.n = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        self.images: list[bytes] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        import pyarrow.parquet as pq
        from PIL import Image

        if self.images is None:  # loaded once per DataLoader worker process
            self.images = [
                b
                for p in self.paths
                for b in pq.read_table(p, columns=["image"])["image"].to_pylist()
            ]
        return self.transform(Image.open(io.BytesIO(self.images[i])).convert("RGB"))


def _torch_batches(root: str, cfg, cores: int, batch_size: int):
    from torchvision import transforms as T

    from pipeline.shards import read_manifest

    transform = T.Compose(
        [
            T.Resize((cfg.load_size, cfg.load_size), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(cfg.crop_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    dataset = ParquetJpegs(read_manifest(root).shard_paths("trainA"), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=cores, persistent_workers=True
    )
    while True:
        for batch in loader:
            yield len(batch)


def _ray_batches(root: str, cfg, batch_size: int):
    from cyclegan.transforms import to_input
    from pipeline.data import DomainStream
    from pipeline.reading import domain_dataset, use_cache
    from pipeline.shards import read_manifest

    manifest = read_manifest(root)
    ds = domain_dataset(manifest, "A", cfg, seed=0, cache=use_cache(manifest, cfg.cache_mb))
    # The training worker's own reader: local shuffle, seeded crop + flip per image.
    stream = DomainStream(ds, "A", manifest.count("trainA"), cfg, 0, 0, cfg.shuffle_buffer)
    try:
        while True:
            yield len(to_input(stream.next_batch(batch_size)[1]))
    finally:
        stream.close()


def _data_process(path: str, root: str, cfg_dict: dict, cores: int, args: dict) -> dict:
    """One measurement in a fresh process pinned to ``cores`` CPUs (Ray's too: it inherits)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    torch.set_num_threads(cores)
    cfg = C.DataConfig(**cfg_dict)
    if path == "ray":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        from pipeline.ray_cluster import RAY_SYSTEM_CONFIG

        ray.init(
            num_cpus=cores,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=RAY_SYSTEM_CONFIG,
        )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # As in training: data.deterministic keeps the order of the blocks.
        context.execution_options.preserve_order = cfg.deterministic
        batches = _ray_batches(root, cfg, args["batch_size"])
    else:
        batches = _torch_batches(root, cfg, cores, args["batch_size"])
    try:
        t_start = time.perf_counter()
        for _ in range(args["warmup_batches"]):
            next(batches)
        t0, images = time.perf_counter(), 0
        while time.perf_counter() - t0 < args["seconds"]:
            images += next(batches)
        seconds = time.perf_counter() - t0
    finally:
        batches.close()
    # Ray (when started) shuts down as this process exits, after the result is sent.
    return {"images": images, "seconds": seconds, "startup_s": t0 - t_start}


def bench_data(args: argparse.Namespace) -> dict:
    cfg = C.DataConfig(load_size=args.load_size, crop_size=args.crop_size, cache_mb=args.cache_mb)
    root = args.root or os.path.join(C.home(), "bench", f"jpeg-{args.source_size}")
    t0 = time.perf_counter()
    make_jpeg_dataset(root, args.images, args.source_size)
    print(
        f"[bench] data: {args.images} JPEGs of {args.source_size} px at {root} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    workers = [int(n) for n in args.workers.split(",")]
    if max(workers) > len(os.sched_getaffinity(0)):
        raise ValueError(f"--workers: at most {len(os.sched_getaffinity(0))} CPUs here")
    opts = {k: getattr(args, k) for k in ("batch_size", "seconds", "warmup_batches")}
    rates: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for n in workers:
            for path in ("ray", "torch"):
                out = in_fresh_process(_data_process, path, root, cfg.__dict__, n, opts)
                rate = out["images"] / out["seconds"]
                rates.setdefault(f"{path}/{n}", []).append(rate)
                print(
                    f"[bench] round {r + 1}: {path} {n} CPU(s): {rate:.1f} images/s "
                    f"(start-up {out['startup_s']:.1f} s)",
                    flush=True,
                )
    results = {}
    for n in workers:
        ray_r, torch_r = rates[f"ray/{n}"], rates[f"torch/{n}"]
        results[str(n)] = {
            "ray_images_per_s": summarize(ray_r),
            "torch_images_per_s": summarize(torch_r),
            "ray_per_core": statistics.median(ray_r) / n,
            "torch_per_core": statistics.median(torch_r) / n,
            "ray_over_torch": summarize([a / b for a, b in zip(ray_r, torch_r, strict=True)]),
        }
    return {
        "command": "data",
        "root": root,
        "config": {**cfg.__dict__, **opts},
        "images": args.images,
        "source_size": args.source_size,
        "cpus": results,
    }


def print_data(res: dict) -> None:
    print(
        f"\n{'CPUs':<6}{'Ray img/s':>11}{'per core':>10}{'DataLoader img/s':>18}"
        f"{'per core':>10}{'Ray/DataLoader':>16}"
    )
    for n, v in res["cpus"].items():
        print(
            f"{n:<6}{v['ray_images_per_s']['median']:>11.1f}{v['ray_per_core']:>10.1f}"
            f"{v['torch_images_per_s']['median']:>18.1f}{v['torch_per_core']:>10.1f}"
            f"{v['ray_over_torch']['median']:>15.2f}x"
        )
